"""The served model's holder: the alias poller reads the registry only when the store changed, loads a
version with the garbage collector paused, and frees the retired version part by part."""

from __future__ import annotations

import gc
import weakref

import registry.models
from registry.models import promote
from serving.holder import ModelHolder, ServedModel, release_in_parts
from serving.metrics import ServingMetrics
from tests.test_registry_bundle import make_bundle
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


class Node:
    def __init__(self, **parts) -> None:
        vars(self).update(parts)


def test_a_retired_object_is_taken_apart_but_never_what_something_else_still_holds():
    shared = Node(items={"x": 1})
    inner = Node(items={str(i): Node(value=i) for i in range(100)}, shared=shared, listed=[Node()])
    inner_parts = vars(inner)  # the node's attribute dict: not a reference to the node
    watched = Node(value=1)
    freed = weakref.ref(watched)
    box = [Node(inner=inner, watched=watched)]
    del inner, watched
    release_in_parts(box, depth=3)
    assert box == [] and inner_parts == {} and freed() is None  # taken apart; a weakly referenced one dropped whole
    assert vars(shared) == {"items": {"x": 1}}  # held elsewhere: untouched


def test_a_model_a_request_still_holds_is_left_whole_and_a_retired_one_is_freed(settings):
    bundle = make_bundle()
    in_flight = ServedModel(NAME, "1", bundle, 0.0)
    before = bundle.recommend("m1", "u3", 5)
    release_in_parts([in_flight])
    assert in_flight.bundle is bundle and bundle.recommend("m1", "u3", 5) == before

    register(settings, 0.45)
    promote(settings, NAME)
    holder = ModelHolder(settings, NAME, ServingMetrics())
    assert holder.refresh()
    retired = weakref.ref(holder.current.bundle.model)
    register(settings, 0.40, scale=1.1)
    promote(settings, NAME, force=True)
    assert holder.refresh() and holder.current.version == "2" and retired() is None
