"""The served model's holder: the alias poller reads the registry only when the store changed."""

from __future__ import annotations

import registry.models
from registry.models import promote
from serving.holder import ModelHolder
from serving.metrics import ServingMetrics
from tests.test_serving_api import NAME, register


def test_the_poller_skips_the_registry_read_while_the_sqlite_store_is_unchanged(settings, monkeypatch):
    reads = []
    real_resolve = registry.models.resolve

    def counted(*args, **kwargs):  # the real read, counted
        reads.append(args)
        return real_resolve(*args, **kwargs)

    monkeypatch.setattr(registry.models, "resolve", counted)
    register(settings, 0.45)
    promote(settings, NAME)
    holder = ModelHolder(settings, NAME, ServingMetrics())
    assert holder.refresh() and holder.current.version == "1" and len(reads) == 1
    assert not holder.refresh() and not holder.refresh() and len(reads) == 1  # nothing moved: no read
    register(settings, 0.40, scale=1.1)
    promote(settings, NAME, force=True)
    assert holder.refresh() and holder.current.version == "2" and len(reads) == 2
    assert not holder.refresh() and len(reads) == 2
    promote(settings, NAME, "1", force=True)
    assert holder.refresh() and holder.current.version == "1" and len(reads) == 3
