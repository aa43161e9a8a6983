"""The served model's holder: the alias poller reads the registry only when the store changed, and loads a
version with the garbage collector paused."""

from __future__ import annotations

import gc

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


def test_no_garbage_collection_runs_while_a_version_loads_and_the_collector_resumes(settings, monkeypatch):
    import registry.flavor
    from registry.bundle import ModelBundle

    collections, loading = [], []

    def watched(real):  # the real step, marked
        def step(*args, **kwargs):
            loading.append(True)
            try:
                return real(*args, **kwargs)
            finally:
                loading.pop()
        return step

    def watch(phase, info):
        if phase == "start" and loading:
            collections.append(info["generation"])

    register(settings, 0.45)
    promote(settings, NAME)
    monkeypatch.setattr(registry.flavor, "read_bundle", watched(registry.flavor.read_bundle))
    monkeypatch.setattr(ModelBundle, "warm_up", watched(ModelBundle.warm_up))
    thresholds = gc.get_threshold()
    gc.set_threshold(50, 2, 2)  # a collection every 50 allocations, a full one often
    gc.callbacks.append(watch)
    try:
        holder = ModelHolder(settings, NAME, ServingMetrics())
        assert holder.refresh() and holder.current.version == "1"
        assert collections == [] and gc.isenabled()
        monkeypatch.setattr(registry.flavor, "read_bundle", lambda *a, **k: 1 / 0)
        register(settings, 0.40, scale=1.1)
        promote(settings, NAME, force=True)
        assert not holder.refresh() and "division by zero" in holder.last_error and gc.isenabled()
    finally:
        gc.callbacks.remove(watch)
        gc.set_threshold(*thresholds)
