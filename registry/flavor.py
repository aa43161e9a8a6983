"""The ``fedstream`` pyfunc flavor: any :class:`~registry.bundle.ModelBundle` as a standard MLflow model.

Design notes: `registry/README.md`, `registry/flavor.py`.
"""

from __future__ import annotations

import bisect
import itertools
import math
import pickle
import pickletools
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import mlflow.pyfunc
import msgspec
import numpy as np
import pandas as pd

from registry.bundle import ModelBundle
from registry.signing import loading_key, sign, verified_payload
from streams.schemas import Click, InvalidEvent, decode_event

BUNDLE_ARTIFACT = "bundle"
BUNDLE_FILE = "bundle.pkl"
BUNDLE_PATH = f"artifacts/{BUNDLE_FILE}"  # where pyfunc puts it inside the model directory
STEP_BYTES = 8 * 1024  # pickle bytes the C unpickler is handed per call back (~0.3 ms of a bundle's objects)
COPY_BYTES = 256 * 1024  # most bytes copied at once into a large payload (4 MB of fresh memory: ~4 ms of page faults)
FLAVOR_REQUIREMENTS = ["fedstream", "numpy==1.26.4", "crc32c", "msgspec", "cloudpickle", "pandas"]


def clicks_from_frame(frame: pd.DataFrame) -> list[Click]:
    """Validate each row of a DataFrame as a click event; raise ``InvalidEvent`` naming the bad row."""
    clicks: list[Click] = []
    for row_number, row in enumerate(frame.to_dict("records")):
        payload = {"type": "click", **{k: _plain(v) for k, v in row.items() if not _missing(v) and k != "type"}}
        try:
            event = decode_event(msgspec.json.encode(payload))
        except InvalidEvent as bad:
            raise InvalidEvent(bad.reason, f"row {row_number}: {bad.detail}") from None
        except (TypeError, msgspec.EncodeError) as exc:
            raise InvalidEvent("wrong_type", f"row {row_number}: {exc}") from None
        clicks.append(event)
    return clicks


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


class BundlePythonModel(mlflow.pyfunc.PythonModel):
    """pyfunc adapter: loads ``bundle.pkl`` and predicts click probabilities for a DataFrame of clicks."""

    def __init__(self) -> None:
        self.bundle: ModelBundle | None = None

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.bundle = read_bundle(context.artifacts[BUNDLE_ARTIFACT], loading_key())

    def predict(self, context, model_input, params=None):  # noqa: ANN001 (pyfunc signature)
        if self.bundle is None:
            raise RuntimeError("bundle not loaded: load through mlflow.pyfunc.load_model")
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        return self.bundle.predict(clicks_from_frame(frame))


def write_bundle(bundle: ModelBundle, path: str | Path, key: bytes) -> Path:
    """Pickle a bundle (cloudpickle, so classes defined in scripts travel by value), signed with ``key``."""
    path = Path(path)
    path.write_bytes(sign(cloudpickle.dumps(bundle), key))
    return path


# an argument prefixed by its length: pickletools' code for it -> (bytes of the length, signed)
LENGTH_PREFIXES = {pickletools.TAKEN_FROM_ARGUMENT1: (1, False), pickletools.TAKEN_FROM_ARGUMENT4: (4, True),
                   pickletools.TAKEN_FROM_ARGUMENT4U: (4, False), pickletools.TAKEN_FROM_ARGUMENT8U: (8, False)}


def opcode_end(payload: memoryview, at: int) -> int | None:
    """Where the opcode at ``at`` and its argument end, or None (unknown, a text argument, past the end)."""
    opcode = pickletools.code2op.get(chr(payload[at]))
    if opcode is None:
        return None
    size = 0 if opcode.arg is None else opcode.arg.n
    if size >= 0:
        end = at + 1 + size
    elif size in LENGTH_PREFIXES:
        width, signed = LENGTH_PREFIXES[size]
        length = int.from_bytes(payload[at + 1:at + 1 + width], "little", signed=signed)
        end = at + 1 + width + length if length >= 0 and at + 1 + width <= len(payload) else None
    else:
        return None
    return end if end is not None and end <= len(payload) else None


def unframed_spans(payload: memoryview) -> list[tuple[int, int]]:
    """``(start, end)`` spans of a pickle that hold all of it but its FRAME headers (protocol 4+), in order.

    A frame is only a reading hint: the C unpickler reads each one whole before running its opcodes, so a
    64 KiB frame is ~2 ms with the GIL held; without the headers it reads what it is handed. Between frames
    are only payloads of 64 KiB or more and runs under 4 bytes, stepped over opcode by opcode. A pickle laid
    out otherwise (protocols 0-3 have no frames) is one span, read as it is.
    """
    whole = [(0, len(payload))]
    if len(payload) < 2 or payload[0] != pickle.PROTO[0] or payload[1] < 4:
        return whole
    spans, at = [], 0
    while at < len(payload):
        if payload[at] == pickle.FRAME[0]:
            start, end = at + 9, opcode_end(payload, at)
            end = None if end is None else end + int.from_bytes(payload[at + 1:at + 9], "little")
        else:
            start, end = at, opcode_end(payload, at)
        if end is None or end > len(payload):
            return whole
        spans.append((start, end))
        at = end
    return spans


class SteppedPayload:
    """A verified pickle as the file the C unpickler reads: without its frames, ``STEP_BYTES`` at a time.

    ``pickle.loads`` of a 5 MB bundle is one C call that holds the GIL for all of its 20-150 ms. Reading a
    file with ``peek``, the unpickler calls back here for each step; a call back runs Python code, where the
    interpreter hands the GIL to a thread that has waited for it longer than the switch interval. Same
    unpickler, same opcodes: the same objects as ``pickle.loads``.
    """

    def __init__(self, payload: bytes | memoryview) -> None:
        view = memoryview(payload).cast("B")
        self.parts = [view[start:end] for start, end in unframed_spans(view)]
        self.ends = list(itertools.accumulate(len(part) for part in self.parts))
        self.size, self.at = (self.ends[-1] if self.ends else 0), 0

    def pieces(self, start: int, end: int) -> Iterator[memoryview]:
        """The unframed stream from ``start`` to ``end``, as views into the payload of at most ``COPY_BYTES``."""
        while start < end:
            index = bisect.bisect_right(self.ends, start)
            offset = self.ends[index] - len(self.parts[index])
            piece = self.parts[index][start - offset:min(end, self.ends[index], start + COPY_BYTES) - offset]
            start += len(piece)
            yield piece

    def peek(self, size: int = 0) -> bytes:
        return b"".join(self.pieces(self.at, min(self.at + STEP_BYTES, self.size)))

    def read(self, size: int = -1) -> bytes:
        end = self.size if size < 0 else min(self.at + size, self.size)
        chunk, self.at = b"".join(self.pieces(self.at, end)), end
        return chunk

    def readinto(self, buffer) -> int:  # noqa: ANN001 (any writable buffer)
        target, filled = memoryview(buffer).cast("B"), 0
        for piece in self.pieces(self.at, min(self.at + len(target), self.size)):
            target[filled:filled + len(piece)] = piece
            filled += len(piece)
        self.at += filled
        return filled

    def readline(self) -> bytes:
        end = self.at
        while end < self.size:
            window = b"".join(self.pieces(end, min(end + STEP_BYTES, self.size)))
            found = window.find(b"\n")
            if found >= 0:
                return self.read(end + found + 1 - self.at)
            end += len(window)
        return self.read()


def unpickle_in_steps(payload: bytes | memoryview) -> Any:
    """``pickle.loads(payload)`` (cloudpickle's ``loads`` is that) without holding the GIL for all of it."""
    return pickle.load(SteppedPayload(payload))


def read_bundle(path: str | Path, key: bytes) -> ModelBundle:
    """Verify the signature of a bundle artifact, and only then unpickle it (in steps: other threads run
    between them)."""
    payload = verified_payload(Path(path).read_bytes(), key, str(path))
    bundle = unpickle_in_steps(payload)
    if not isinstance(bundle, ModelBundle):
        raise TypeError(f"{path} holds a {type(bundle).__name__}, not a ModelBundle")
    return bundle


def log_bundle(bundle: ModelBundle, key: bytes, name: str = "model", **kwargs: Any):
    """Log a bundle signed with ``key`` into the active MLflow run with the fedstream flavor; returns ``ModelInfo``.

    ``pip_requirements`` is given explicitly so MLflow does not load the model in a subprocess to infer it.
    """
    with tempfile.TemporaryDirectory() as scratch:
        path = write_bundle(bundle, Path(scratch) / BUNDLE_FILE, key)
        kwargs.setdefault("pip_requirements", FLAVOR_REQUIREMENTS)
        kwargs.setdefault("metadata", {"fedstream_kind": bundle.kind, "feature_bits": bundle.feature_bits})
        return mlflow.pyfunc.log_model(
            name=name, python_model=BundlePythonModel(), artifacts={BUNDLE_ARTIFACT: str(path)}, **kwargs
        )


def save(bundle: ModelBundle, path: str | Path, key: bytes, **kwargs: Any) -> Path:
    """Save a bundle signed with ``key`` as an MLflow model directory (no tracking store needed), loadable
    by pyfunc inside ``registry.signing.trusting(key)`` (or with the environment's settings' key)."""
    with tempfile.TemporaryDirectory() as scratch:
        artifact = write_bundle(bundle, Path(scratch) / BUNDLE_FILE, key)
        kwargs.setdefault("pip_requirements", FLAVOR_REQUIREMENTS)
        mlflow.pyfunc.save_model(str(path), python_model=BundlePythonModel(),
                                 artifacts={BUNDLE_ARTIFACT: str(artifact)}, **kwargs)
    return Path(path)
