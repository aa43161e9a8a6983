"""fedstream: the platform's shell: one typed settings object, structured logs and the `fedstream` command.

The product itself lives in the sibling packages: ``streams`` (events in, features),
``online`` (incremental learners), ``federated`` (TFF rounds across merchants),
``registry`` (MLflow tracking and model versions), ``serving`` (HTTP API) and
``drift`` (detectors and reports).
"""

__version__ = "0.1.0"
