"""Typed settings, defined once.

Precedence (lowest to highest): defaults here, then an optional TOML config file
(``FEDSTREAM_CONFIG`` or ``--config``), then ``FEDSTREAM_*`` environment variables.
Nested fields use ``__``: ``FEDSTREAM_TOPICS__CLICKS__PARTITIONS=16``.

Example:
    >>> import os
    >>> os.environ["FEDSTREAM_FEATURE_BITS"] = "18"
    >>> load_settings().feature_bits
    18
    >>> del os.environ["FEDSTREAM_FEATURE_BITS"]
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict


class Topic(BaseModel):
    """A Kafka topic and its fixed partition count (partitions cannot be added later on tansu)."""

    name: str
    partitions: int = Field(ge=1)


class Topics(BaseModel):
    """The platform's topics. Clicks and orders are keyed by merchant_id, so partitions = units of scale."""

    clicks: Topic = Topic(name="fedstream.clicks", partitions=8)
    orders: Topic = Topic(name="fedstream.orders", partitions=8)
    catalog: Topic = Topic(name="fedstream.catalog", partitions=4)
    dead_letter: Topic = Topic(name="fedstream.dead-letter", partitions=2)
    drift: Topic = Topic(name="fedstream.drift", partitions=1)

    def all(self) -> list[Topic]:
        return [self.clicks, self.orders, self.catalog, self.dead_letter, self.drift]


class KafkaClientSettings(BaseModel):
    """Client knobs. Short session timeouts make group joins take ~1 s instead of ~23 s on tansu."""

    session_timeout_ms: int = 6000
    heartbeat_interval_ms: int = 1000
    request_timeout_ms: int = 15000
    bootstrap_timeout_ms: int = 10000
    producer_max_block_ms: int = 10000
    max_payload_bytes: int = 1_000_000
    producer_linger_ms: int = 5
    producer_batch_size: int = 256 * 1024


class ServingSettings(BaseModel):
    """The HTTP API (``serving/``), including its limits on hostile input."""

    host: str = "127.0.0.1"
    port: int = 8080
    model_name: str = "fedstream-ctr"
    swap_poll_seconds: float = 5.0
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024, description="Longest request body (413 past it).")
    rate_limit_per_second: float = Field(default=1000.0, gt=0, description="Requests per second per API key.")
    rate_limit_burst: int = Field(default=2000, ge=1, description="Requests per API key allowed in one burst.")
    max_catalog_items: int = Field(default=200_000, ge=1, description="Catalog items per merchant the API accepts.")
    max_categories: int = Field(default=2_000, ge=1, description="Distinct categories per merchant the API accepts.")
    inline_ranking_ms: float = Field(default=2.0, ge=0, description=(
        "A served version's rankings run on the event loop once 20 in a row took less CPU than this, and go back "
        "to the threadpool after one over it (0: always in the threadpool)."))
    rank_by: Literal["ranker", "expected_purchase"] = Field(
        default="ranker", description="Recommendations ranked by the version's ranker, or by expected purchase "
                                      "P(click)·P(order | click) when the version carries a multi-task model.")
    purchase_weight: float = Field(default=0.3, gt=0, description="w in w·log P(order | impression) - log(1 + rank).")
    purchase_depth: int = Field(default=30, ge=1, le=500, description="How many of the ranker's top items "
                                "expected purchase re-orders.")


class RegistrySettings(BaseModel):
    """Promotion policy for the ``champion`` alias (see ``registry.models.MetricPolicy``).

    A challenger replaces the champion when its ``promotion_metric`` (recorded at registration) beats the
    champion's by at least ``min_improvement`` and it was measured over at least ``min_events`` events.
    """

    promotion_metric: str = "prequential_logloss"
    greater_is_better: bool = False
    min_improvement: float = Field(default=0.0, ge=0, description="Absolute margin the challenger must win by.")
    min_events: int = Field(default=1000, ge=0, description="Events the challenger's metric must cover.")
    events_metric: str = Field(default="window_events", description="Metric (or lineage key) with that count.")
    history_limit: int = Field(default=100, ge=2, description="Alias moves kept in the model's tags.")
    user_state: bool = Field(
        default=True, description="Registered versions keep per-user state (recent categories, recommender "
                                  "histories); False strips it before logging (recommendations stop personalizing).")
    signing_key: SecretStr | None = Field(
        default=None, min_length=16,
        description="HMAC key that signs and verifies model artifacts; unset: <data_dir>/registry-signing.key.")


class MlflowStackSettings(BaseModel):
    """The local production MLflow stack (``registry/stack.py``, ``make prod-stack``, the stack test).

    Names and secrets default to ``deploy/.env.example``'s, so the stack is the compose file's; it is
    throwaway (loopback only, deleted when stopped), so these are not secrets to protect.
    """

    database: str = "mlflow"
    db_user: str = "mlflow"
    db_password: str = "mlflow-db-secret"
    bucket: str = "mlflow"
    s3_access_key: str = "fedstream"
    s3_secret_key: str = "fedstream-minio-secret"
    workers: int = Field(default=1, ge=1, le=16, description="MLflow server workers (compose: MLFLOW_WORKERS=2).")
    start_timeout_s: float = Field(default=180.0, gt=0, description="Per service, until it answers.")


class DriftSettings(BaseModel):
    """Drift detector thresholds per merchant; defaults from ``benchmarks/drift.py --calibrate`` (rule:
    1.4x the highest drift-free statistic on the calibration seeds only, see ``drift/README.md``).

    Each detector has a cool-down (``cooldown_events`` of the merchant's own events) after it fires, and
    window tests need full windows, so one change is reported once, not on every following event.
    """

    error_metric: Literal["excess_logloss", "logloss", "zero_one"] = "excess_logloss"
    error_clip: float = Field(default=1e-3, gt=0, lt=0.5, description="p is clipped to [c, 1-c] for logloss.")
    warmup_events: int = Field(
        default=1000, ge=0, description="First errors per merchant not fed to error detectors (the model is learning)."
    )
    error_chunk: int = Field(
        default=16, ge=1, description="Error detectors test the sums of every N errors of a merchant (River's ADWIN costs "
        "~5 µs per value: 1/N of that; the tests see a new value every N predictions).")
    disabled: tuple[str, ...] = Field(
        default=("error.adwin", "label.ctr", "label.conversion", "feature.hour.psi", "feature.hour.ks"),
        description="Detectors not run. Default: those that never fired on the drift benchmark, drifted streams or "
        "not (drift/README.md); name one less to turn it back on.")
    adwin_delta: float = Field(default=1e-5, gt=0, lt=1)
    adwin_clock: int = Field(default=128, ge=1, description="ADWIN looks for a cut every N errors (a look costs ~80 µs).")
    adwin_min_increase: float = Field(default=0.01, ge=0, description="Absolute error rise ADWIN must show.")
    ph_threshold: float = Field(default=246.0, gt=0)
    ph_delta: float = Field(default=0.01, ge=0)
    ph_alpha: float = Field(default=1 - 1e-4, gt=0, le=1)
    ph_min_instances: int = Field(default=500, ge=1)
    label_reference: int = Field(default=5000, ge=10, description="Labels in the reference window.")
    label_window: int = Field(default=2500, ge=10, description="Labels in the current window.")
    label_z: float = Field(default=7.34, gt=0, description="Two-proportion z-test threshold (both directions).")
    label_min_relative_change: float = Field(default=0.2, ge=0)
    feature_reference: int = Field(default=3000, ge=10, description="Values in a feature's reference window.")
    feature_window: int = Field(default=1500, ge=10, description="Values in a feature's current window.")
    session_window: int = Field(
        default=300, ge=10, description="Sessions in the current window of per-session fields (hour, device); "
        "their windows are whole days, the reference the same number of days before.")
    check_every: int = Field(default=250, ge=1, description="Window tests run every N values.")
    psi_threshold: float = Field(default=0.25, gt=0)
    psi_thresholds: dict[str, float] = Field(
        default_factory=lambda: {"price": 0.183, "category": 0.189, "device": 0.145, "hour": 0.164},
        description="Per-field PSI thresholds overriding psi_threshold (calibrated).",
    )
    psi_bins: int = Field(default=10, ge=2)
    ks_threshold: float = Field(default=0.206, gt=0, le=1, description="KS distance D that counts as drift.")
    ks_alpha: float = Field(default=1e-6, gt=0, lt=1)
    chi2_alpha: float = Field(default=1e-8, gt=0, lt=1)
    chi2_min_effect: float = Field(default=0.2, ge=0, description="Cramér's V needed on top of the p-value.")
    chi2_min_effects: dict[str, float] = Field(default_factory=lambda: {"category": 0.245, "device": 0.223},
                                               description="Per-field Cramér's V overriding chi2_min_effect.")
    cooldown_events: int = Field(default=5000, ge=0)
    numeric_fields: tuple[str, ...] = ("price", "hour")
    categorical_fields: tuple[str, ...] = ("category", "device")
    hour_period_seconds: float = Field(
        default=86_400.0, gt=0, description="Hour-of-day and label windows span whole days: daily cycles are not drift."
    )
    # users' category choices vs their own history (drift.detectors.TasteShift): catches taste changes
    user_category: bool = Field(default=True, description="Run the feature.user_category.cusum detector.")
    user_category_pages: tuple[str, ...] = Field(
        default=("search", "category", "product", "cart", "recommendation"),
        description="Pages whose items follow the user's intent; on other pages only clicked items count.",
    )
    user_category_slack: float = Field(default=0.3, ge=0, description="CUSUM slack, in reference SDs per score.")
    user_category_threshold: float = Field(default=24.6, gt=0, description="CUSUM level that counts as drift.")
    user_category_reference: int = Field(default=3000, ge=2, description="Scores in the (lagging) reference.")
    user_category_min_reference: int = Field(default=100, ge=2, description="Scores before the CUSUM (re)arms.")
    user_category_lag: int = Field(default=200, ge=0, description="Newest scores kept out of the reference.")
    user_category_max_users: int = Field(default=20_000, ge=1, description="User histories kept per merchant.")
    # price level of shown items vs the same items' reference prices (drift.detectors.PriceIndex)
    price_index: bool = Field(default=True, description="Run feature.price.index (when price is a numeric field).")
    price_index_threshold: float = Field(default=0.05, gt=0, description="|median log price ratio| that is drift.")
    price_index_window: int = Field(default=200, ge=2, description="Impressions in the median.")
    price_index_max_items: int = Field(default=200_000, ge=1, description="Reference prices kept per merchant.")
    # events per day of a merchant, recent days vs the days before (drift.traffic.ArrivalRate)
    traffic_rate: bool = Field(default=True, description="Run the traffic.rate detector (events per period).")
    rate_threshold: float = Field(default=8.01, gt=0, description="|recent - reference mean events per period| in "
                                  "reference spreads (drift.traffic.ArrivalRate).")
    rate_window_periods: int = Field(default=3, ge=1, description="Recent whole periods (hour_period_seconds each).")
    rate_reference_periods: int = Field(default=7, ge=1, description="Whole periods before them in the reference.")
    rate_min_count: float = Field(default=20.0, ge=0, description="Reference events per period needed to test.")


class OnlineSettings(BaseModel):
    """Online learners (``fedstream learn``)."""

    state_dtype: Literal["float64", "float32", "q2.13"] = Field(
        default="float64", description="Per-slot state of a fresh ftrl/adam/sgd learner: float64, float32 (half), or "
        "q2.13 (16-bit randomized-rounding weights over float32 statistics; online/README.md). --param dtype= wins.")
    store_endpoint_url: str | None = Field(
        default=None, description="S3 endpoint of an s3:// learner store (--store); unset: MLFLOW_S3_ENDPOINT_URL, then "
        "boto3's own (AWS_ENDPOINT_URL_S3, AWS). Credentials: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.")


class FederatedSettings(BaseModel):
    """Trust settings of federated training: worker/coordinator TLS material and the DP verdict.

    TLS files default to ``<data_dir>/federated/tls/`` (what ``fedstream federated certs`` writes); in
    production point them at the federation's CA and each site's own certificate and key.
    """

    tls_ca_file: Path | None = Field(default=None, description="Federation CA certificate (PEM).")
    worker_cert_file: Path | None = Field(default=None, description="A merchant worker's server certificate chain.")
    worker_key_file: Path | None = Field(default=None, description="Its private key.")
    coordinator_cert_file: Path | None = Field(default=None, description="The coordinator's client certificate.")
    coordinator_key_file: Path | None = Field(default=None, description="Its private key.")
    meaningful_epsilon: float = Field(
        default=10.0, gt=0, description="A DP run whose ε exceeds this is reported as giving no meaningful guarantee.")
    model_name: str = Field(
        default="fedstream-federated", min_length=1, pattern=r"^[^/@]+$",
        description="Registered model name of the federated global model (`federated run --register`).")


class MultiTaskSettings(BaseModel):
    """Click + purchase learning (``online.multitask``, ``online.attribution``): off unless ``enabled``."""

    enabled: bool = Field(default=False, description="The learner worker also learns P(order | click).")
    attribution_window_s: float = Field(default=86_400.0, gt=0, description="An order converts a click of the "
                                        "same user and item at most this long (event time) after it.")
    merchant_windows_s: dict[str, float] = Field(default_factory=dict,
                                                 description="Per-merchant windows overriding the default.")
    lateness_s: float = Field(default=60.0, ge=0, description="Watermark = latest event time minus this.")
    max_pending: int = Field(default=200_000, ge=1, description="Clicks held for attribution; beyond it the "
                             "oldest is resolved early as a negative.")


class Settings(BaseSettings):
    """Every setting of the platform. Instantiate through :func:`load_settings`."""

    model_config = SettingsConfigDict(env_prefix="FEDSTREAM_", env_nested_delimiter="__", extra="forbid")

    data_dir: Path = Path(".fedstream")
    bootstrap_servers: str | None = Field(
        default=None, description="Kafka bootstrap; unset means the embedded broker recorded in data_dir."
    )
    mlflow_tracking_uri: str | None = Field(
        default=None, description="MLflow tracking URI; unset means a sqlite store under data_dir."
    )
    mlflow_experiment: str = "fedstream"
    topics: Topics = Topics()
    kafka: KafkaClientSettings = KafkaClientSettings()
    serving: ServingSettings = ServingSettings()
    drift: DriftSettings = DriftSettings()
    registry: RegistrySettings = RegistrySettings()
    mlflow_stack: MlflowStackSettings = MlflowStackSettings()
    federated: FederatedSettings = FederatedSettings()
    multitask: MultiTaskSettings = MultiTaskSettings()
    online: OnlineSettings = OnlineSettings()
    feature_bits: int = Field(default=20, ge=8, le=28, description="Hashed feature space is 2**feature_bits.")
    seed: int = 7
    config_file: Path | None = Field(default=None, exclude=True)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # init (explicit overrides) > env > config file > defaults
        return (init_settings, env_settings, _TomlFileSource(settings_cls))

    @property
    def data_path(self) -> Path:
        """The data directory as an absolute path (created on demand)."""
        path = self.data_dir.expanduser().resolve()
        path.mkdir(parents=True, exist_ok=True)
        return path


class _TomlFileSource(PydanticBaseSettingsSource):
    """Reads the TOML file named by FEDSTREAM_CONFIG (or passed as config_file)."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = self.current_state.get("config_file") or os.environ.get("FEDSTREAM_CONFIG")
        if not path:
            return {}
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"fedstream config file not found: {path}")
        with path.open("rb") as handle:
            return tomllib.load(handle)


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Build settings from defaults, the config file, the environment and explicit overrides."""
    if config_file is not None:
        overrides["config_file"] = Path(config_file)
    return Settings(**overrides)
