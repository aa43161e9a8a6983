"""Featurization shared by the online and federated models: event + context -> hashed sparse vector.

Design notes: `streams/README.md`, `streams/features.py`.

Example:
    >>> from streams.schemas import Click
    >>> featurizer = Featurizer(bits=16)
    >>> context = FeatureContext()
    >>> context.set_item("m1", "i1", category="shoes", price=59.0)
    >>> click = Click(event_id="e", merchant_id="m1", user_id="u1", item_id="i1", session_id="s",
    ...               timestamp=1.7e9, position=2, page="search", device="mobile")
    >>> indices, values = featurizer.transform(click, context)
    >>> indices.shape == (len(FIELDS),) and int(indices.max()) < 2**16
    True
    >>> featurizer.names(click, context)[3]
    'category=shoes'
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import crc32c
import numpy as np

from streams.feature_fields import FIELDS, NAME_FORMATS as _NAME_FORMATS, price_bucket
from streams.schemas import CatalogItem, Click, Event, Order

if TYPE_CHECKING:
    from streams.slot_kernels import StringTable

UNKNOWN = "?"


@dataclass
class ItemInfo:
    category: str
    price: float


@dataclass
class MerchantContext:
    """One merchant's catalog and its users' recent categories (LRU-bounded)."""

    max_users: int = 100_000
    history: int = 5
    catalog: dict[str, ItemInfo] = field(default_factory=dict)
    recent: OrderedDict[str, deque[str]] = field(default_factory=OrderedDict)

    def recent_categories(self, user_id: str) -> Sequence[str]:
        return self.recent.get(user_id, ())

    def remember(self, user_id: str, category: str) -> None:
        seen = self.recent.get(user_id)
        if seen is None:
            seen = self.recent[user_id] = deque(maxlen=self.history)
            if len(self.recent) > self.max_users:
                self.recent.popitem(last=False)
        else:
            self.recent.move_to_end(user_id)
        seen.append(category)


class FeatureContext:
    """What the featurizer knows beyond the event itself, per merchant. Update it with :meth:`observe`."""

    def __init__(self, max_users_per_merchant: int = 100_000) -> None:
        self.max_users = max_users_per_merchant
        self.merchants: dict[str, MerchantContext] = {}

    def merchant(self, merchant_id: str) -> MerchantContext:
        found = self.merchants.get(merchant_id)
        if found is None:
            found = self.merchants[merchant_id] = MerchantContext(max_users=self.max_users)
        return found

    def set_item(self, merchant_id: str, item_id: str, category: str, price: float) -> None:
        self.merchant(merchant_id).catalog[item_id] = ItemInfo(category, price)

    def item(self, merchant_id: str, item_id: str) -> ItemInfo | None:
        found = self.merchants.get(merchant_id)
        return found.catalog.get(item_id) if found else None

    def observe(self, event: Event) -> None:
        """Fold an event into the context, after it has been featurized and learned from."""
        if isinstance(event, Click):  # the most frequent type first
            if event.clicked:
                self._remember(event.merchant_id, event.user_id, event.item_id)
        elif isinstance(event, CatalogItem):
            self.set_item(event.merchant_id, event.item_id, event.category, event.price)
        elif isinstance(event, Order):
            merchant = self.merchant(event.merchant_id)
            catalog, remember, user_id = merchant.catalog, merchant.remember, event.user_id
            for line in event.items:
                info = catalog.get(line.item_id)
                if info is None:
                    info = catalog[line.item_id] = ItemInfo(UNKNOWN, line.unit_price)
                remember(user_id, info.category)

    def _remember(self, merchant_id: str, user_id: str, item_id: str) -> None:
        info = self.item(merchant_id, item_id)
        self.merchant(merchant_id).remember(user_id, info.category if info else UNKNOWN)

    def state(self) -> dict:
        """Plain-data snapshot for checkpoints."""
        return {
            "max_users": self.max_users,
            "merchants": {
                m: {
                    "catalog": {i: (info.category, info.price) for i, info in ctx.catalog.items()},
                    "recent": {u: list(cats) for u, cats in ctx.recent.items()},
                }
                for m, ctx in self.merchants.items()
            },
        }

    @classmethod
    def from_state(cls, state: dict) -> FeatureContext:
        context = cls(state["max_users"])
        for merchant_id, data in state["merchants"].items():
            merchant = context.merchant(merchant_id)
            merchant.catalog = {i: ItemInfo(c, p) for i, (c, p) in data["catalog"].items()}
            for user_id, cats in data["recent"].items():
                merchant.recent[user_id] = deque(cats, maxlen=merchant.history)
        return context


FIELD_INDEX: dict[str, int] = {name: index for index, name in enumerate(FIELDS)}


def feature_slot(field: str, *values: object, mask: int) -> int:
    """Slot of one feature, by field name and values: the one place feature names are spelled and hashed.

    >>> feature_slot("category", "shoes", mask=2**16 - 1) == Featurizer(16).hash_names(["category=shoes"] * 18)[0]
    True
    """
    return crc32c.crc32c(_NAME_FORMATS[FIELD_INDEX[field]].format(*values).encode()) & mask


class _BoundedMemo(dict):
    """``key -> compute(key)`` cache: a miss computes and stores the value; cleared when it holds ``limit``
    entries.

    Subscripting a dict whose ``__missing__`` fills it is the cheapest lookup Python has (no method call
    on a hit), which matters on the featurizer's hot path. Memos hold closures: never pickle them.
    """

    __slots__ = ("compute", "limit")

    def __init__(self, compute: Callable[[Any], int], limit: int) -> None:
        super().__init__()
        self.compute, self.limit = compute, max(int(limit), 1)

    def __missing__(self, key: Any) -> int:
        if len(self) >= self.limit:
            self.clear()
        value = self[key] = self.compute(key)
        return value


def _field_slot(field_name: str, mask: int) -> Callable[[Any], int]:
    """One field's ``value (or tuple of values) -> slot``: spells and hashes the name as :func:`feature_slot`
    (same spelling, same hash), with the field's format looked up once instead of on every memo miss."""
    spell, crc = _NAME_FORMATS[FIELD_INDEX[field_name]].format, crc32c.crc32c

    def slot(key: Any) -> int:
        return crc((spell(*key) if type(key) is tuple else spell(key)).encode()) & mask

    return slot


# Fields of a candidate's row that depend on the item (see Featurizer.candidates): the item itself, its
# price bucket and the user x item cross, then those that depend only on the item's category.
_ITEM_COLUMNS = [FIELD_INDEX[f] for f in ("item", "price_bucket", "user×item")]
_CATEGORY_COLUMNS = [FIELD_INDEX[f] for f in ("category", "user×category", "category×device", "merchant×category",
                                              "user_affinity", "category×hour")]


class Featurizer:
    """Turns (merchant, user, item, when, where) plus context into ``len(FIELDS)`` hashed slots."""

    def __init__(self, bits: int = 20, memo_size: int = 250_000) -> None:
        if not 4 <= bits <= 30:
            raise ValueError(f"bits must be in [4, 30], got {bits}")
        self.bits = bits
        self.n_features = 1 << bits
        self.n_fields = len(FIELDS)
        self.memo_size = memo_size
        self._mask = self.n_features - 1
        self._bias_slot = crc32c.crc32c(b"bias") & self._mask
        self._new_memos()

    def _new_memos(self) -> None:
        self._memos = tuple(_BoundedMemo(_field_slot(name, self._mask), self.memo_size) for name in FIELDS)
        self._buckets = _BoundedMemo(price_bucket, self.memo_size)  # catalog prices repeat on every impression
        self._strings = None  # featurize_block's interned strings (a slot_kernels.StringTable, made on first use)

    def __getstate__(self) -> dict:
        # the memos are caches: never pickled into checkpoints or bundles
        return {k: v for k, v in self.__dict__.items() if k not in ("_memos", "_buckets", "_strings")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.__dict__.pop("_memo", None)  # pickled by an older version
        self._new_memos()

    def names(self, click: Click, context: FeatureContext) -> list[str]:
        """Field-aware feature names of a click (what gets hashed); useful for debugging and docs."""
        return self.names_for(
            click.merchant_id, click.user_id, click.item_id, click.timestamp, click.device, click.page,
            click.position, context,
        )

    def names_for(
        self, merchant_id: str, user_id: str, item_id: str, timestamp: float, device: str, page: str,
        position: int, context: FeatureContext,
    ) -> list[str]:
        info = context.item(merchant_id, item_id)
        category = info.category if info else UNKNOWN
        bucket = price_bucket(info.price) if info else -1
        tm = time.gmtime(timestamp)
        slot = min(position, 20)
        recent = context.merchant(merchant_id).recent_categories(user_id) if merchant_id in context.merchants else ()
        affinity = "new" if not recent else ("match" if category in recent else "other")
        return [
            "bias",
            f"merchant={merchant_id}",
            f"item={merchant_id}/{item_id}",
            f"category={category}",
            f"price_bucket={bucket}",
            f"hour={tm.tm_hour}",
            f"weekday={tm.tm_wday}",
            f"device={device}",
            f"page={page}",
            f"position={slot}",
            f"user={merchant_id}/{user_id}",
            f"user×category={merchant_id}/{user_id}|{category}",
            f"user×item={merchant_id}/{user_id}|{item_id}",
            f"category×device={category}|{device}",
            f"page×position={page}|{slot}",
            f"merchant×category={merchant_id}|{category}",
            f"user_affinity={affinity}",
            f"category×hour={category}|{tm.tm_hour}",
        ]

    def hash_names(self, names: Iterable[str]) -> np.ndarray:
        mask = self._mask
        return np.fromiter((crc32c.crc32c(n.encode()) & mask for n in names), dtype=np.int32, count=self.n_fields)

    def slots_for(
        self, merchant_id: str, user_id: str, item_id: str, timestamp: float, device: str, page: str,
        position: int, context: FeatureContext,
    ) -> list[int]:
        """The hashed slots of :meth:`names_for`, bit-identical, without formatting a string per feature.

        Each field keeps a memo from its values to the slot (a dict whose misses format and hash the
        name): merchants, items, categories, hours and devices repeat across events, so most features
        cost one dict lookup instead of a format and a CRC. Each memo is bounded (cleared when full);
        only the per-user crosses miss often. This is the worker's hot path (~18 lookups per click).
        """
        merchant = context.merchants.get(merchant_id)
        if merchant is None:
            info, recent = None, None
        else:
            info, recent = merchant.catalog.get(item_id), merchant.recent.get(user_id)
        if info is None:
            category, bucket = UNKNOWN, -1
        else:
            category, bucket = info.category, self._buckets[info.price]
        hours = int(timestamp // 3600)  # gmtime's hour and weekday, for timestamps >= 0
        hour, weekday = hours % 24, (hours // 24 + 3) % 7
        slot = position if position < 20 else 20
        affinity = "new" if not recent else ("match" if category in recent else "other")
        memo = self._memos
        return [
            self._bias_slot,
            memo[1][merchant_id],
            memo[2][merchant_id, item_id],
            memo[3][category],
            memo[4][bucket],
            memo[5][hour],
            memo[6][weekday],
            memo[7][device],
            memo[8][page],
            memo[9][slot],
            memo[10][merchant_id, user_id],
            memo[11][merchant_id, user_id, category],
            memo[12][merchant_id, user_id, item_id],
            memo[13][category, device],
            memo[14][page, slot],
            memo[15][merchant_id, category],
            memo[16][affinity],
            memo[17][category, hour],
        ]

    def featurize_block(self, events: Sequence[Event], context: FeatureContext) -> tuple[np.ndarray, list[int]]:
        """Slots ``int32[n_clicks, F]`` of a block's clicks, each read against the context as it stands just
        before the click, folding every event into ``context`` in order; and the clicks' positions in ``events``.

        The worker's batch path: the same rows as :meth:`slots_for` followed by ``context.observe(event)`` per
        event (the reference, tested equal on seeded streams). One Python loop reads the context and folds
        the events into it in order, and turns each click into a row of integer codes (its string ids and its
        item's category interned, one dict lookup each; the price bucket from the bounded price memo); the
        numba kernel of :mod:`streams.slot_kernels` then spells and hashes the block's names, bit-identical to the memos'.
        """
        from streams import slot_kernels  # numba: imported by the first block, not by every user of features

        strings = self._strings
        if strings is None:
            strings = self._strings = slot_kernels.StringTable()
        elif len(strings) >= self.memo_size:  # codes must stay valid inside a block: reset only between blocks
            strings.reset()
        rows, at = self._encode_block(events, context, strings)
        return slot_kernels.hash_block(rows, strings, self._mask), at

    def _encode_block(self, events: Sequence[Event], context: FeatureContext,
                      strings: StringTable) -> tuple[list, list[int]]:
        """The block's clicks as flat rows of ``slot_kernels.ROW`` values (the ``ENCODED`` codes, then the
        timestamp) and their positions in ``events``, with the context read and updated exactly as ``slots_for``
        + ``observe`` per event.

        Codes are read from a plain dict (``strings.codes``); a click with a string seen for the first time
        raises ``KeyError`` there, and :meth:`_first_sight` makes the same row, interning what is new. The
        price bucket is the kernel's, from the entry's price (the row says whether the item has an entry). Along a run of one user's clicks the merchant's and the user's
        codes are held, as the merchant and the user's recent categories are."""
        rows: list = []
        others: list[int] = []  # positions of the block's other events (few): the clicks' are the rest
        extend, first_sight, intern = rows.extend, self._first_sight, strings.intern
        codes, merchants, click_type = strings.codes, context.merchants, Click
        new, match, other = (intern(name) for name in ("new", "match", "other"))
        intern(UNKNOWN)
        last_merchant = last_user = None  # the run of clicks by one user whose merchant, recent and codes are in hand
        for position, event in enumerate(events):
            if type(event) is not click_type:
                context.observe(event)
                others.append(position)
                last_user = None
                continue
            merchant_id, user_id = event.merchant_id, event.user_id
            if user_id != last_user or merchant_id != last_merchant:
                merchant = merchants.get(merchant_id)
                catalog, recent = ({}, None) if merchant is None else (merchant.catalog, merchant.recent.get(user_id))
                merchant_code, user_code = intern(merchant_id), intern(user_id)
                last_merchant, last_user = merchant_id, user_id
            info = catalog.get(event.item_id)
            if info is None:
                category, price, priced = UNKNOWN, 0.0, 0  # bucket -1
            else:  # read from the entry at every click: a re-issued entry is read afresh
                category, price, priced = info.category, info.price, 1
            affinity = new if not recent else (match if category in recent else other)
            try:
                extend((merchant_code, user_code, codes[event.item_id], codes[category], priced, codes[event.device],
                        codes[event.page], event.position, affinity, event.timestamp, price))
            except KeyError:  # a string seen for the first time
                extend(first_sight(strings, event, category, priced, affinity, price))
            if event.clicked:
                if recent is None:  # a merchant or a deque made (or evicted at once): read them afresh
                    (merchant or context.merchant(merchant_id)).remember(user_id, category)
                    last_user = None
                else:  # MerchantContext.remember of a user it holds, with the user's deque in hand
                    merchant.recent.move_to_end(user_id)
                    recent.append(category)
        return rows, _complement(others, len(events))

    def _first_sight(self, strings: StringTable, click: Click, category: str, priced: int, affinity: int,
                     price: float) -> tuple:
        """The row :meth:`_encode_block` makes of ``click``, once its new strings are interned."""
        intern = strings.intern
        return (intern(click.merchant_id), intern(click.user_id), intern(click.item_id), intern(category), priced,
                intern(click.device), intern(click.page), click.position, affinity, click.timestamp, price)

    def transform(self, click: Click, context: FeatureContext) -> tuple[np.ndarray, np.ndarray]:
        """Slot indices ``int32[F]`` and values ``float32[F]`` of one click."""
        slots = self.slots_for(click.merchant_id, click.user_id, click.item_id, click.timestamp, click.device,
                               click.page, click.position, context)
        return np.array(slots, dtype=np.int32), np.ones(self.n_fields, dtype=np.float32)

    def transform_many(self, clicks: Sequence[Click], context: FeatureContext) -> tuple[np.ndarray, np.ndarray]:
        """Indices ``int32[n, F]`` and values ``float32[n, F]`` of clicks, all read against one context."""
        rows = [self.slots_for(c.merchant_id, c.user_id, c.item_id, c.timestamp, c.device, c.page, c.position,
                               context) for c in clicks]
        indices = np.array(rows, dtype=np.int32).reshape(len(clicks), self.n_fields)
        return indices, np.ones(indices.shape, dtype=np.float32)

    def candidates(
        self, merchant_id: str, user_id: str, item_ids: Sequence[str], context: FeatureContext, *,
        timestamp: float | None = None, device: str = "desktop", page: str = "recommendation",
    ) -> tuple[np.ndarray, np.ndarray]:
        """Features of showing each candidate item to the user in ranked slots, for recommendation scoring.

        Row ``i`` equals ``slots_for(merchant_id, user_id, item_ids[i], ...)`` (tested). Fields that do not
        depend on the item are computed once, those that depend only on its category once per category:
        a ranking scores dozens of candidates, mostly of a few categories, for the same user and moment.
        """
        when = time.time() if timestamp is None else timestamp
        n = len(item_ids)
        shared = self.slots_for(merchant_id, user_id, item_ids[0] if n else "", when, device, page, 0, context)
        indices = np.tile(np.array(shared, dtype=np.int32), (n, 1))
        if n > 1:
            merchant = context.merchants.get(merchant_id)
            catalog = merchant.catalog if merchant is not None else {}
            recent = merchant.recent.get(user_id) if merchant is not None else None
            hour = int(when // 3600) % 24
            memo, buckets = self._memos, self._buckets
            by_category: dict[str, tuple[int, ...]] = {}
            item_rows, category_rows = [], []
            for item_id in item_ids:
                info = catalog.get(item_id)
                category, bucket = (UNKNOWN, -1) if info is None else (info.category, buckets[info.price])
                found = by_category.get(category)
                if found is None:
                    affinity = "new" if not recent else ("match" if category in recent else "other")
                    found = by_category[category] = (
                        memo[3][category], memo[11][merchant_id, user_id, category], memo[13][category, device],
                        memo[15][merchant_id, category], memo[16][affinity], memo[17][category, hour])
                item_rows.append((memo[2][merchant_id, item_id], memo[4][bucket], memo[12][merchant_id, user_id, item_id]))
                category_rows.append(found)
            indices[:, _ITEM_COLUMNS] = np.array(item_rows, dtype=np.int32)
            indices[:, _CATEGORY_COLUMNS] = np.array(category_rows, dtype=np.int32)
        return indices, np.ones(indices.shape, dtype=np.float32)


def _complement(positions: list[int], n: int) -> list[int]:
    """``range(n)`` without ``positions`` (increasing), made a range at a time."""
    out: list[int] = []
    start = 0
    for position in positions:
        out += range(start, position)
        start = position + 1
    out += range(start, n)
    return out


def as_dict(indices: np.ndarray, values: np.ndarray) -> dict[int, float]:
    """One row as River's ``{feature: value}`` dict (colliding slots add up, as in the dense form)."""
    out: dict[int, float] = {}
    for index, value in zip(indices.tolist(), values.tolist()):
        out[index] = out.get(index, 0.0) + value
    return out
