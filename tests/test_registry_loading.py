"""Loading a version without stalling serving: the pickle is unpickled in steps, other threads running between.

The stepped load must give exactly the objects of ``pickle.loads`` (the old one-piece load): checked on seeded
hostile pickles (every protocol, shared and cyclic references, payloads around the frame size, tiny tails
outside frames, classes travelling by value) and on a served bundle's rankings and predictions.
"""

from __future__ import annotations

import pickle
import pickletools
import random

import cloudpickle
import numpy as np
import pytest

from registry.flavor import STEP_BYTES, SteppedPayload, read_bundle, unframed_spans, unpickle_in_steps, write_bundle
from registry.signing import MAGIC, TAG_BYTES, UntrustedArtifact, sign
from tests.test_registry_bundle import make_bundle, make_catalog, make_clicks

SIZES = (0, 1, 3, 4, 5, 8191, 8192, 8193, 65535, 65536, 65537, 70_000, 200_003)


def hostile_object(rng: random.Random, depth: int = 0):
    """A seeded tree of builtins with shared and cyclic references and payloads around the frame size."""
    kind = rng.randrange(9 if depth < 4 else 5)
    if kind == 0:
        return rng.choice((None, True, False, rng.randrange(-2**70, 2**70), rng.random(), float("inf")))
    if kind == 1:
        return "é\n" * (rng.choice(SIZES) // 2)
    if kind == 2:
        return bytes(rng.randrange(256) for _ in range(rng.choice(SIZES[:6]))) + b"\x95\x00" * rng.choice(SIZES)
    if kind == 3:
        return bytearray(b"\n" * rng.choice(SIZES))
    if kind == 4:
        return np.arange(rng.choice(SIZES), dtype=np.float32)
    children = [hostile_object(rng, depth + 1) for _ in range(rng.randrange(1, 6))]
    if kind == 5:
        return tuple(children)
    if kind == 6:
        shared = {"shared": children}
        return [shared, children, shared]
    if kind == 7:
        cycle: dict = {str(i): child for i, child in enumerate(children)}
        cycle["self"] = cycle
        return cycle
    return {frozenset({1, 2}): children, ("k", depth): set(map(str, range(rng.choice(SIZES[:4]))))}


def repickled(obj) -> bytes:
    return cloudpickle.dumps(obj, protocol=5)


@pytest.mark.parametrize("seed", range(12))
def test_a_stepped_load_gives_the_objects_of_pickle_loads_for_every_protocol(seed):
    rng = random.Random(seed)
    obj = hostile_object(rng)
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        blob = pickle.dumps(obj, protocol=protocol)
        assert repickled(unpickle_in_steps(blob)) == repickled(pickle.loads(blob)), protocol
        assert repickled(unpickle_in_steps(memoryview(b"pad" + blob)[3:])) == repickled(pickle.loads(blob))


def test_shared_and_cyclic_references_keep_their_identity():
    shared = {"weights": np.ones(100_000, np.float32)}
    obj = {"a": shared, "b": [shared, b"x" * 70_000], "c": None}
    obj["c"] = obj
    loaded = unpickle_in_steps(cloudpickle.dumps(obj))
    assert loaded["a"] is loaded["b"][0] and loaded["c"] is loaded
    assert np.array_equal(loaded["a"]["weights"], shared["weights"])


def test_classes_and_functions_travelling_by_value_load_in_steps():
    class Scaled:  # defined here: cloudpickle carries it by value
        def __init__(self, factor):
            self.factor = factor

        def __call__(self, x):
            return x * self.factor

    blob = cloudpickle.dumps([Scaled(3), lambda y: y + 1])
    scaled, increment = unpickle_in_steps(blob)
    assert scaled(2) == 6 and increment(1) == 2


def test_frames_are_dropped_and_a_layout_the_walk_does_not_expect_is_read_whole():
    blob = pickle.dumps([b"x" * 100_000, "y" * 100_000, [str(i) for i in range(30_000)]], protocol=5)
    frames = [arg for op, arg, _ in pickletools.genops(blob) if op.name == "FRAME"]
    spans = unframed_spans(memoryview(blob))
    assert len(frames) > 2 and sum(end - start for start, end in spans) == len(blob) - 9 * len(frames)
    tail = pickle.dumps(b"x" * 100_000, protocol=5)  # no frame at all: MEMOIZE, STOP after the payload (< 4 bytes)
    assert unframed_spans(memoryview(tail)) == [(0, 2), (2, len(tail) - 2), (len(tail) - 2, len(tail) - 1),
                                                (len(tail) - 1, len(tail))]
    assert unpickle_in_steps(tail) == b"x" * 100_000
    for legacy in (pickle.dumps(frames, protocol=2), pickle.dumps(frames, protocol=0)):
        assert unframed_spans(memoryview(legacy)) == [(0, len(legacy))]
    truncated = blob[:len(blob) // 2]
    assert unframed_spans(memoryview(truncated)) == [(0, len(truncated))]
    with pytest.raises(pickle.UnpicklingError):
        unpickle_in_steps(truncated)


class Reads(SteppedPayload):
    """Where in the stream the unpickler called back (the points where it can hand over the GIL)."""

    def __init__(self, payload) -> None:
        super().__init__(payload)
        self.calls: list[tuple[int, int]] = []

    def peek(self, size=0):
        self.calls.append((self.at, 0))
        return super().peek(size)

    def read(self, size=-1):
        self.calls.append((self.at, size))
        return super().read(size)

    def readinto(self, buffer):
        self.calls.append((self.at, len(buffer)))
        return super().readinto(buffer)


def test_the_unpickler_calls_back_at_least_every_step_of_a_bundle():
    blob = cloudpickle.dumps(served_bundle())
    reads = Reads(blob)
    pickle.load(reads)
    stride = [(after - before, size) for (before, size), (after, _) in zip(reads.calls, reads.calls[1:])]
    assert all(gap <= STEP_BYTES or gap == size for gap, size in stride)  # or one payload read whole
    stepped = reads.size - sum(gap for gap, _ in stride if gap > STEP_BYTES)  # all but the weights array
    assert stepped > 10 * STEP_BYTES and len(reads.calls) > stepped / STEP_BYTES
    one_piece = Reads(blob)
    one_piece.parts, one_piece.ends, one_piece.size = [memoryview(blob)], [len(blob)], len(blob)  # frames kept
    pickle.load(one_piece)
    assert len(one_piece.calls) < len(reads.calls) / 2


def served_bundle():
    """A bundle like the served ones: a trained scorer, a catalog and the two-stage recommender."""
    from online.ranking import ShopRecommender

    context, catalog = make_catalog(items=300)
    recommender = ShopRecommender()
    for event in [*catalog, *make_clicks(3000, items=300)]:
        recommender.observe(event)
        context.observe(event)
    return make_bundle("served", recommender=recommender)


def test_a_bundle_in_the_one_piece_format_loads_in_steps_and_ranks_and_predicts_the_same(tmp_path):
    key = b"k" * 32
    bundle = served_bundle()
    one_piece = tmp_path / "bundle.pkl"  # the format every registered version has: sign(cloudpickle.dumps(bundle))
    one_piece.write_bytes(sign(cloudpickle.dumps(bundle), key))
    assert write_bundle(bundle, tmp_path / "again.pkl", key).read_bytes() == one_piece.read_bytes()
    stepped, reference = read_bundle(one_piece, key), cloudpickle.loads(cloudpickle.dumps(bundle))
    clicks = make_clicks(200, seed=5)
    assert np.array_equal(stepped.predict(clicks), reference.predict(clicks))
    for merchant, user, item in (("m1", "u3", None), ("m2", "u7", "m2-i4"), ("m1", "nobody", "m1-i9")):
        assert stepped.recommend_items(merchant, user, 10, item_id=item) == \
            reference.recommend_items(merchant, user, 10, item_id=item)
    assert repickled(stepped) == repickled(reference)


def test_a_tampered_frame_header_is_refused_before_unpickling(tmp_path):
    key = b"k" * 32
    artifact = write_bundle(make_bundle(), tmp_path / "bundle.pkl", key)
    blob = bytearray(artifact.read_bytes())
    frame = blob.index(pickle.FRAME, len(MAGIC) + TAG_BYTES)
    blob[frame + 1] ^= 1  # a frame's length: the stepped reader would split the stream elsewhere
    artifact.write_bytes(bytes(blob))
    with pytest.raises(UntrustedArtifact, match="signature does not match"):
        read_bundle(artifact, key)
