"""The ``fedstream`` pyfunc flavor: any :class:`~registry.bundle.ModelBundle` as a standard MLflow model.

Design notes: `registry/README.md`, `registry/flavor.py`.
"""

from __future__ import annotations

import math
import tempfile
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


def read_bundle(path: str | Path, key: bytes) -> ModelBundle:
    """Verify the signature of a bundle artifact, and only then unpickle it."""
    payload = verified_payload(Path(path).read_bytes(), key, str(path))
    bundle = cloudpickle.loads(payload)
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
