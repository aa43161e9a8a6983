"""Per-merchant private example stores: each merchant's training data lives in its own directory.

Design notes: `federated/README.md`, `federated/stores.py`.

Example:
    >>> import tempfile
    >>> from streams.generator import GeneratorConfig, generate
    >>> root = tempfile.mkdtemp()
    >>> stores = build_stores(generate(GeneratorConfig(merchants=2, events=600, seed=3)), root, bits=12)
    >>> sorted(stores) == ["m00", "m01"] and stores["m00"].count("train") > stores["m00"].count("heldout")
    True
    >>> arrays = stores["m00"].load("train")
    >>> arrays["indices"].shape[1] == len(FIELDS) and arrays["indices"].dtype.name == "int32"
    True
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedstream.errors import ExpectedFailure
from fedstream.logs import get_logger
from online.attribution import attributed_labels
from streams.features import FIELDS, FeatureContext, Featurizer
from streams.schemas import Click, Event, Order

log = get_logger("federated.stores")

SPLITS = ("train", "heldout")
COLUMNS = {"indices": np.int32, "values": np.float32, "labels": np.float32, "timestamps": np.float64}
_SAFE_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


class StoreError(ExpectedFailure, RuntimeError):
    """A merchant store that is missing, unreadable or inconsistent (the merchant cannot take part)."""


@dataclass(frozen=True)
class MerchantStore:
    """One merchant's private examples on disk. Only the merchant (client) side opens the arrays."""

    root: Path
    merchant_id: str

    @property
    def path(self) -> Path:
        return self.root / "merchants" / self.merchant_id

    def split_dir(self, split: str) -> Path:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return self.path / f"examples-{split}"

    def meta(self) -> dict:
        try:
            return json.loads((self.path / "meta.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise StoreError(f"merchant {self.merchant_id}: no readable store at {self.path}") from exc

    def count(self, split: str = "train") -> int:
        """Number of examples in a split (from the metadata; used as the FedAvg client weight)."""
        return int(self.meta()["counts"][split])

    def catalog(self) -> dict[str, tuple[str, float]]:
        """The merchant's published catalog, item id -> (category, price); empty when it published none."""
        try:
            items = json.loads((self.path / "catalog.json").read_text())
        except FileNotFoundError:
            return {}
        except (OSError, json.JSONDecodeError) as exc:
            raise StoreError(f"merchant {self.merchant_id}: unreadable catalog at {self.path}") from exc
        return {item: (str(category), float(price)) for item, (category, price) in items.items()}

    def load(self, split: str = "train") -> dict[str, np.ndarray]:
        """The split's columns as numpy arrays (merchant-side code only: local training, evaluation)."""
        folder = self.split_dir(split)
        try:
            return {name: np.load(folder / f"{name}.npy") for name in COLUMNS}
        except (OSError, ValueError) as exc:
            raise StoreError(f"merchant {self.merchant_id}: cannot read {folder}") from exc

    def write(self, split: str, arrays: dict[str, np.ndarray]) -> None:
        folder = self.split_dir(split)
        folder.mkdir(parents=True, exist_ok=True)
        for name, dtype in COLUMNS.items():
            np.save(folder / f"{name}.npy", np.ascontiguousarray(arrays[name], dtype=dtype))


def open_stores(root: str | Path, merchant_ids: Iterable[str] | None = None) -> dict[str, MerchantStore]:
    """The merchant stores under ``root`` (all of them, or the named ones, which must exist)."""
    base = Path(root) / "merchants"
    if merchant_ids is None:
        names = sorted(p.name for p in base.iterdir() if (p / "meta.json").is_file()) if base.is_dir() else []
    else:
        names = list(merchant_ids)
    stores = {}
    for name in names:
        store = MerchantStore(Path(root), _checked_id(name))
        store.meta()  # raises StoreError when missing
        stores[name] = store
    return stores


def id_problem(merchant_id: str) -> str | None:
    """Why ``merchant_id`` cannot name a store directory (None when it can)."""
    if not _SAFE_ID.match(merchant_id) or merchant_id in (".", ".."):
        return f"merchant id {merchant_id!r} cannot name a directory (letters, digits, '.', '_', '-'; at most 128)"
    return None


def _checked_id(merchant_id: str) -> str:
    if (reason := id_problem(merchant_id)) is not None:
        raise ValueError(reason)
    return merchant_id


class _MerchantBuilder:
    """Featurizes one merchant's clicks prequentially against a context of its own events only."""

    def __init__(self, featurizer: Featurizer, attribution_window_s: float | None = None) -> None:
        self.featurizer = featurizer
        self.context = FeatureContext()
        self.pending: list[Click] = []
        self.blocks: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self.window_s = attribution_window_s
        self.keys: list[tuple[str, str, str, float]] = []  # (merchant, user, item, time) per example, multi-task
        self.orders: list[tuple[str, str, list[str], float]] = []

    def add(self, event: Event) -> None:
        if self.window_s is not None:
            if isinstance(event, Click):
                self.keys.append((event.merchant_id, event.user_id, event.item_id, event.timestamp))
            elif isinstance(event, Order):
                self.orders.append((event.merchant_id, event.user_id, [line.item_id for line in event.items],
                                    event.timestamp))
        # Unclicked impressions leave the context unchanged, so consecutive ones share one
        # transform_many call; anything that changes the context flushes first (prequential order).
        if isinstance(event, Click):
            self.pending.append(event)
            if event.clicked:
                self.flush()
                self.context.observe(event)
        else:
            self.flush()
            self.context.observe(event)

    def flush(self) -> None:
        if not self.pending:
            return
        indices, values = self.featurizer.transform_many(self.pending, self.context)
        labels = np.fromiter((c.clicked for c in self.pending), dtype=np.float32, count=len(self.pending))
        stamps = np.fromiter((c.timestamp for c in self.pending), dtype=np.float64, count=len(self.pending))
        self.blocks.append((indices, values, labels, stamps))
        self.pending = []

    def catalog(self) -> dict[str, tuple[str, float]]:
        """Item id -> (category, price) as the merchant's own catalog (and order) events described them."""
        return {item: (info.category, info.price) for merchant in self.context.merchants.values()
                for item, info in merchant.catalog.items()}

    def arrays(self) -> dict[str, np.ndarray]:
        self.flush()
        if not self.blocks:
            n_fields = self.featurizer.n_fields
            return {"indices": np.empty((0, n_fields), np.int32), "values": np.empty((0, n_fields), np.float32),
                    "labels": np.empty(0, np.float32), "timestamps": np.empty(0, np.float64)}
        columns = [np.concatenate(parts) for parts in zip(*self.blocks)]
        if self.window_s is not None:  # labels [clicked, ordered]: orders attributed over the whole stream
            ordered = np.array(attributed_labels(self.keys, self.orders, self.window_s), dtype=np.float32)
            columns[2] = np.stack([columns[2], columns[2] * ordered], axis=1)
        order = np.argsort(columns[3], kind="stable")  # by time (events arrive ~ordered already)
        return {name: column[order] for name, column in zip(COLUMNS, columns)}


def build_stores(events: Iterable[Event], root: str | Path, *, bits: int, holdout_fraction: float = 0.2,
                 merchants: Iterable[str] | None = None, min_examples: int = 10,
                 attribution_window_s: float | None = None,
                 merchant_windows_s: Mapping[str, float] | None = None) -> dict[str, MerchantStore]:
    """Split ``events`` by merchant and write each merchant's featurized train/held-out examples.

    With ``attribution_window_s`` (multi-task), labels are ``[clicked, ordered]`` per impression: ordered when
    an order of the same user and item follows the click within the window (:mod:`online.attribution`;
    ``merchant_windows_s`` overrides it per merchant).

    Each merchant gets its own featurization context, so nothing of one merchant's traffic can leak into
    another's examples. Merchants with fewer than ``min_examples`` clicks get no store; a merchant whose id
    cannot name a directory (:func:`id_problem`) is skipped with a logged reason instead of failing everyone.
    """
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
    featurizer = Featurizer(bits)
    wanted = set(merchants) if merchants is not None else None
    builders: dict[str, _MerchantBuilder] = {}
    refused: set[str] = set()
    for event in events:
        merchant_id = event.merchant_id
        if (wanted is not None and merchant_id not in wanted) or merchant_id in refused:
            continue
        builder = builders.get(merchant_id)
        if builder is None:
            if (reason := id_problem(merchant_id)) is not None:
                refused.add(merchant_id)
                log.warning("merchant skipped", extra={"merchant": merchant_id, "reason": reason})
                continue
            window = (merchant_windows_s or {}).get(merchant_id, attribution_window_s)
            builder = builders[merchant_id] = _MerchantBuilder(featurizer, window if attribution_window_s else None)
        builder.add(event)
    stores = {}
    for merchant_id in sorted(builders):
        builder = builders.pop(merchant_id)
        arrays = builder.arrays()
        n = len(arrays["labels"])
        if n < min_examples:
            log.info("merchant skipped: too few clicks", extra={"merchant": merchant_id, "clicks": n})
            continue
        stores[merchant_id] = write_store(root, merchant_id, arrays, holdout_fraction=holdout_fraction, bits=bits,
                                          catalog=builder.catalog())
    return stores


def write_store(root: str | Path, merchant_id: str, arrays: dict[str, np.ndarray], *, holdout_fraction: float,
                bits: int, catalog: dict[str, tuple[str, float]] | None = None) -> MerchantStore:
    """Write one merchant's time-ordered examples as a train split and a later held-out split (and its
    published catalog, item id -> (category, price), when given)."""
    store = MerchantStore(Path(root), _checked_id(merchant_id))
    if store.path.exists():
        shutil.rmtree(store.path)
    n = len(arrays["labels"])
    cut = max(1, min(n - 1, int(round(n * (1.0 - holdout_fraction)))))
    store.write("train", {k: v[:cut] for k, v in arrays.items()})
    store.write("heldout", {k: v[cut:] for k, v in arrays.items()})
    stamps, labels = arrays["timestamps"], arrays["labels"]
    clicked = labels[:, 0] if labels.ndim == 2 else labels
    meta = {
        "merchant_id": merchant_id, "bits": bits, "fields": list(FIELDS),
        "counts": {"train": cut, "heldout": n - cut},
        "positives": {"train": float(clicked[:cut].sum()), "heldout": float(clicked[cut:].sum())},
        "labels": ["clicked", "ordered"][:labels.shape[1]] if labels.ndim == 2 else ["clicked"],
        "period": {"start": float(stamps[0]), "split": float(stamps[cut]), "end": float(stamps[-1])},
    }
    if catalog is not None:
        (store.path / "catalog.json").write_text(json.dumps({item: list(info) for item, info in catalog.items()}))
    (store.path / "meta.json").write_text(json.dumps(meta, indent=1))
    return store


def events_from_kafka(settings, merchant_ids: Iterable[str] | None = None, *, idle_timeout_s: float = 3.0,
                      max_wait_s: float = 120.0) -> list[Event]:
    """Catalog, click and order events of the given merchants (all when None) read from the platform topics
    to their end, in event order (:func:`streams.reading.read_events`)."""
    from streams.reading import read_events

    return read_events(settings, merchant_ids, idle_timeout_s=idle_timeout_s, max_wait_s=max_wait_s)


def merchant_events_from_kafka(settings, merchant_id: str, **kwargs) -> list[Event]:
    """One merchant's own events from Kafka (by record key): what a joining merchant reads."""
    return events_from_kafka(settings, [merchant_id], **kwargs)


def build_stores_from_kafka(settings, root: str | Path, merchant_ids: Iterable[str] | None = None, *, bits: int,
                            holdout_fraction: float = 0.2, attribution_window_s: float | None = None,
                            merchant_windows_s: Mapping[str, float] | None = None) -> dict[str, MerchantStore]:
    """Stores of the given merchants (all merchants on the topics when None) from one pass over Kafka.

    Events are routed by merchant into separate builders, each with its own featurization context, so a
    store holds only what its merchant's own events say (as if each merchant read its own keys).
    """
    wanted = list(merchant_ids) if merchant_ids is not None else None
    events = events_from_kafka(settings, wanted)
    return build_stores(events, root, bits=bits, holdout_fraction=holdout_fraction, merchants=wanted,
                        attribution_window_s=attribution_window_s, merchant_windows_s=merchant_windows_s)


def iter_rows(arrays: dict[str, np.ndarray], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Mini-batches of a loaded split (merchant-side numpy training)."""
    n = len(arrays["labels"])
    for start in range(0, n, batch_size):
        yield {k: v[start:start + batch_size] for k, v in arrays.items()}


def _npy_column(path, dtype, width: int | None):
    """TF ops reading one ``.npy`` file (v1 header) into a tensor, for use inside a dataset map."""
    import tensorflow as tf

    raw = tf.io.read_file(path)
    header_len = tf.cast(tf.io.decode_raw(tf.strings.substr(raw, 8, 2), tf.uint16)[0], tf.int32)
    body = tf.strings.substr(raw, 10 + header_len, -1)
    column = tf.io.decode_raw(body, dtype)
    return tf.reshape(column, [-1, width]) if width else column


def dataset_from_folder(folder, *, batch_size: int = 32, epochs: int = 1, shuffle_seed=None, label_width: int = 1):
    """The ``({"indices", "values"}, label[·,label_width])`` batches of one split directory, as TF ops over its path
    (``label_width`` 2: a multi-task store's [clicked, ordered]).

    ``folder`` may be a Python string or a ``tf.string`` tensor (the parameter of TFF's per-client dataset
    computation); ``shuffle_seed`` likewise (None: file order). Only the path is in the graph: the columns
    are read with ``tf.io.read_file`` when the dataset is iterated, by whoever iterates it.

    Shuffling is a seeded permutation of all rows per epoch (``epoch_order``) and batches are gathered
    from the whole columns, so the pipeline handles one element per *batch*. (Until session 6 rows went
    one by one through a 4096-row shuffle buffer: ~0.12 ms of CPU per row, more than training on it.)
    """
    import tensorflow as tf

    paths = tf.data.Dataset.from_tensors(column_paths(folder))

    def batches(*paths):
        columns = read_columns(paths, label_width)
        order = epoch_order(tf.shape(columns[2])[0], epochs, shuffle_seed)
        return tf.data.Dataset.range(0, tf.size(order, out_type=tf.int64), batch_size).map(
            lambda start: batch_at(columns, order, start, batch_size))

    return paths.flat_map(batches).with_options(_lean_options())


def column_paths(folder):
    """The ``indices``, ``values`` and ``labels`` file paths of a split directory (a string or ``tf.string``)."""
    import tensorflow as tf

    folder = tf.convert_to_tensor(folder, tf.string)
    return tuple(tf.strings.join([folder, f"/{name}.npy"]) for name in ("indices", "values", "labels"))


def read_columns(paths, label_width: int = 1):
    """TF ops reading ``(indices[n,F], values[n,F], labels[n,label_width])`` from :func:`column_paths`."""
    import tensorflow as tf

    width = len(FIELDS)
    indices_path, values_path, labels_path = paths
    indices = _npy_column(indices_path, tf.int32, width)
    labels = tf.reshape(_npy_column(labels_path, tf.float32, None), [tf.shape(indices)[0], -1])
    values = _npy_column(values_path, tf.float32, width)
    return indices, values, tf.reshape(labels[:, :label_width], [-1, label_width])  # clicks: column 0


def batch_at(columns, order, start, batch_size: int):
    """The batch of ``columns`` (from :func:`read_columns`) holding rows ``order[start:start + batch_size]``."""
    import tensorflow as tf

    rows = order[start:start + batch_size]
    indices, values, labels = (tf.gather(column, rows) for column in columns)
    return {"indices": indices, "values": values}, labels


def _lean_options():
    """No tf.data graph rewrites or autotuning: each client builds a small dataset once, and rewriting it
    cost more CPU than iterating it."""
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    options.experimental_optimization.apply_default_optimizations = False
    options.experimental_optimization.inject_prefetch = False
    options.threading.private_threadpool_size = 1
    return options


def epoch_order(n, epochs: int, shuffle_seed=None):
    """Row order of ``epochs`` passes over ``n`` rows: file order, or a fresh permutation per epoch drawn
    from ``(shuffle_seed, epoch)`` (stateless, so the same seed gives the same batches wherever it runs)."""
    import tensorflow as tf

    rows = tf.range(tf.cast(n, tf.int64))
    if shuffle_seed is None:
        return tf.tile(rows, [epochs])
    seed = tf.cast(shuffle_seed, tf.int64)
    return tf.concat([tf.gather(rows, tf.argsort(tf.random.stateless_uniform(tf.shape(rows), tf.stack([seed, epoch]))))
                      for epoch in range(epochs)], axis=0)


def split_folder(store: MerchantStore, split: str = "train") -> str:
    """The split directory of a merchant, checked to hold data (what a client's dataset is built from)."""
    folder = store.split_dir(split)
    if not (folder / "labels.npy").is_file():
        raise StoreError(f"merchant {store.merchant_id}: split {split} missing at {folder}")
    return str(folder)


def client_dataset(store: MerchantStore, split: str = "train", *, batch_size: int = 32, epochs: int = 1,
                   shuffle_seed: int | None = None):
    """A ``tf.data.Dataset`` of ``({"indices", "values"}, label[·,1])`` batches that reads the merchant's
    files only when iterated; its graph holds paths, not examples."""
    return dataset_from_folder(split_folder(store, split), batch_size=batch_size, epochs=epochs,
                               shuffle_seed=shuffle_seed)
