"""Model artifacts are code: unsigned bundles are refused before unpickling; per-user state is optional."""

from __future__ import annotations

import dataclasses
import pickle
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from fedstream.settings import Settings, load_settings
from registry.models import load_bundle, promote, register_version
from registry.signing import KEY_FILE, MAGIC, TAG_BYTES, UntrustedArtifact
from registry.tracking import activate
from serving.holder import ModelHolder
from serving.metrics import ServingMetrics
from tests.test_registry_bundle import make_bundle

NAME = "fedstream-ctr"


class Payload:
    """What an attacker would put in the artifact store: unpickling it creates a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, Path, bytes]:
    """One registered champion (registering is slow); each test puts back the genuine artifact after itself."""
    settings = load_settings(data_dir=tmp_path_factory.mktemp("signing") / "data", feature_bits=16)
    register_version(settings, make_bundle(), name=NAME, metrics={"prequential_logloss": 0.4, "window_events": 5000},
                     lineage={"events_seen": 5000})
    promote(settings, NAME)
    [artifact] = list(settings.data_path.rglob("bundle.pkl"))
    return settings, artifact, artifact.read_bytes()


@pytest.fixture
def registered(signed) -> Iterator[tuple[Settings, Path]]:
    settings, artifact, genuine = signed
    yield settings, artifact
    artifact.write_bytes(genuine)


def refused_everywhere(settings: Settings, marker: Path, match: str) -> None:
    import mlflow.pyfunc

    with pytest.raises(UntrustedArtifact, match=match):
        load_bundle(settings, f"models:/{NAME}@champion")
    with activate(settings), pytest.raises(UntrustedArtifact, match=match):
        mlflow.pyfunc.load_model(f"models:/{NAME}/1")
    holder = ModelHolder(settings, NAME, ServingMetrics())
    assert not holder.refresh() and holder.current is None and "refusing to unpickle" in holder.last_error
    assert not marker.exists()  # the payload never ran


def test_registered_versions_are_signed_with_a_0600_key_created_on_first_use(registered):
    settings, artifact = registered
    assert artifact.read_bytes().startswith(MAGIC)
    key_file = settings.data_path / KEY_FILE
    assert oct(key_file.stat().st_mode & 0o777) == "0o600" and len(key_file.read_text()) == 64
    assert load_bundle(settings, f"models:/{NAME}@champion").description == make_bundle().description


def test_an_unsigned_artifact_is_refused_before_unpickling(registered, tmp_path):
    (settings, artifact), marker = registered, tmp_path / "pwned"
    artifact.write_bytes(pickle.dumps(Payload(marker)))
    refused_everywhere(settings, marker, "not signed by fedstream")


def test_a_tampered_artifact_is_refused_before_unpickling(registered, tmp_path):
    (settings, artifact), marker = registered, tmp_path / "pwned"
    header = artifact.read_bytes()[:len(MAGIC) + TAG_BYTES]  # a genuine signature, someone else's payload
    artifact.write_bytes(header + pickle.dumps(Payload(marker)))
    refused_everywhere(settings, marker, "signature does not match")


def test_an_artifact_signed_with_another_key_is_refused(registered, tmp_path):
    settings, _ = registered
    other = settings.model_copy(update={"registry": settings.registry.model_copy(
        update={"signing_key": SecretStr("another-key-of-this-platform-0123456789")})})
    refused_everywhere(other, tmp_path / "pwned", "signed with another key")
    assert load_bundle(settings, f"models:/{NAME}/1") is not None


def test_per_user_state_can_be_left_out_of_a_version():
    from online.reco import Recommender
    from registry.models import without_user_state
    from streams.features import FeatureContext
    from tests.test_registry_bundle import make_catalog, make_clicks

    context, _ = make_catalog()
    recommender = Recommender()
    for click in make_clicks(400, seed=4):
        context.observe(click)
        recommender.observe(click)
    bundle = make_bundle(recommender=recommender)
    bundle = dataclasses.replace(bundle, context=FeatureContext.from_state(context.state()))
    assert recommender.size()["users"] > 0 and any(m.recent for m in bundle.context.merchants.values())

    stripped = without_user_state(bundle)
    assert stripped.recommender.size()["users"] == 0 and not any(m.recent for m in stripped.context.merchants.values())
    assert stripped.recommender.size()["items"] == recommender.size()["items"]  # item-item knowledge stays
    assert {m: len(c.catalog) for m, c in stripped.context.merchants.items()} == \
        {m: len(c.catalog) for m, c in bundle.context.merchants.items()}
    assert recommender.size()["users"] > 0  # the live bundle is untouched
    assert len(stripped.recommend("m1", "u3", 5)) == 5
