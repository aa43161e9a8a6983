"""fedstream: online learning per merchant stream.

* :mod:`online.learners` — logistic regression over the shared hashed features with SGD, lazy Adam and
  FTRL-Proximal (numpy, memory bounded by ``2**bits``), River protocol plus vectorized mini-batches.
* :mod:`online.river_models` — River's models behind the same interface; :func:`make_model` by name.
* :mod:`online.reco` — online candidate generation (decayed popularity, co-click/co-buy) and ranking.
* :mod:`online.prequential` — test-then-train metrics per merchant and the error stream for drift.
* :mod:`online.worker` — the Kafka consumer-group worker (``fedstream learn``), composing
  :mod:`online.checkpoints` (background atomic checkpoints) and :mod:`online.publishing` (MLflow snapshots).
"""
