"""Seeded synthetic merchant traffic: catalogs, users with tastes, sessions, impressions, clicks, orders, drift.

Design notes: `streams/README.md`, `streams/generator.py`.

Example:
    >>> config = GeneratorConfig(merchants=3, events=2000, seed=1,
    ...                          drifts=(DriftSpec("m01", at_event=1500, kind="prices"),))
    >>> events = list(generate(config))
    >>> sum(not isinstance(e, CatalogItem) for e in events)
    2000
    >>> [(d["merchant_id"], d["at_event"], d["kind"]) for d in ground_truth(config)]
    [('m01', 1500, 'prices')]
    >>> merchant_ids(config)
    ['m00', 'm01', 'm02']
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np

from streams.catalog_text import catalog_titles
from streams.drifts import add_popular_item, drifted_pref, shift_devices
from streams.schemas import CatalogItem, Click, Event, LineItem, Order

DriftKind = Literal["preferences", "prices", "device_mix", "popular_item", "label_delay"]
DRIFT_KINDS: tuple[str, ...] = ("preferences", "prices", "device_mix", "popular_item", "label_delay")

CATEGORY_PRICES: dict[str, float] = {
    "books": 14.0, "music": 12.0, "games": 45.0, "toys": 25.0, "baby": 30.0, "beauty": 22.0,
    "health": 18.0, "grocery": 8.0, "pet": 20.0, "stationery": 6.0, "shoes": 70.0, "apparel": 35.0,
    "jewelry": 120.0, "watches": 180.0, "bags": 60.0, "sports": 55.0, "outdoor": 80.0, "garden": 40.0,
    "tools": 50.0, "auto": 65.0, "kitchen": 38.0, "home": 45.0, "furniture": 240.0, "lighting": 55.0,
    "electronics": 220.0, "phones": 420.0, "computers": 780.0, "audio": 110.0, "cameras": 350.0,
    "appliances": 300.0,
}
BRANDS = ("Acme", "Nordic", "Vela", "Orbit", "Kestrel", "Luma", "Pampa", "Tundra", "Zephyr", "Basalt")
CURRENCIES = ("EUR", "USD", "GBP", "SEK", "PLN")
DEVICES = ("desktop", "mobile", "tablet", "app")
DEVICE_SHARE = np.array([0.35, 0.40, 0.07, 0.18])
DEVICE_EFFECT = np.array([0.0, -0.15, 0.05, 0.35])
PAGES = ("home", "search", "category", "product", "cart", "recommendation", "other")
PAGE_EFFECT = np.array([-0.4, 0.4, 0.1, 0.0, -0.3, 0.2, -0.2])
PAGE_SLOTS = np.array([6, 8, 8, 4, 3, 5, 4])
FIRST_PAGE_SHARE = np.array([0.45, 0.30, 0.15, 0.0, 0.0, 0.0, 0.10])
NEXT_PAGE_SHARE = np.array([0.10, 0.20, 0.20, 0.30, 0.05, 0.15, 0.0])
PAGE_CATEGORY_FROM_TASTE = np.array([False, True, True, True, True, False, False])  # one category per page
REFERRERS = ("direct", "google", "email", "social", "ads")
_HOME, _OTHER, _RECO = PAGES.index("home"), PAGES.index("other"), PAGES.index("recommendation")


@dataclass(frozen=True)
class DriftSpec:
    """From global event ``at_event`` on, merchant ``merchant_id`` changes its ``kind`` by ``magnitude``."""

    merchant_id: str
    at_event: int
    kind: DriftKind
    magnitude: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in DRIFT_KINDS:
            raise ValueError(f"drift kind must be one of {', '.join(DRIFT_KINDS)}, got {self.kind!r}")
        if self.at_event < 0 or self.magnitude <= 0:
            raise ValueError("drift at_event must be >= 0 and magnitude > 0")

    @classmethod
    def parse(cls, text: str) -> DriftSpec:
        """``merchant:at_event:kind[:magnitude]``, e.g. ``m03:500000:preferences``."""
        parts = text.split(":")
        if len(parts) not in (3, 4):
            raise ValueError(f"drift must look like merchant:at_event:kind[:magnitude], got {text!r}")
        magnitude = float(parts[3]) if len(parts) == 4 else 1.0
        return cls(parts[0], int(parts[1]), parts[2], magnitude)  # type: ignore[arg-type]


@dataclass(frozen=True)
class GeneratorConfig:
    """What to generate. ``events`` counts clicks + orders (catalog events come on top)."""

    merchants: int = 20
    events: int = 100_000
    seed: int = 7
    drifts: tuple[DriftSpec, ...] = ()
    start_time: float = 1_700_000_000.0
    days: float = 14.0
    merchant_zipf: float = 1.2
    items_per_merchant: tuple[int, int] = (60, 3000)
    sessions_per_user: float = 4.0
    order_rate: float = 1.0
    catalog_start_offset_s: float = 3600.0
    conversion_delay_s: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "drifts", tuple(self.drifts))
        if self.merchants < 1 or self.events < 0 or self.days <= 0 or self.conversion_delay_s < 0:
            raise ValueError("merchants must be >= 1, events >= 0, days > 0 and conversion_delay_s >= 0")
        known = set(merchant_ids(self))
        for drift in self.drifts:
            if drift.merchant_id not in known:
                raise ValueError(f"drift merchant {drift.merchant_id!r} is not one of {sorted(known)[:5]}...")
            if drift.at_event >= self.events:
                raise ValueError(f"drift at_event {drift.at_event} is beyond the {self.events} events")


def merchant_ids(config: GeneratorConfig) -> list[str]:
    """Merchant ids ``m00``, ``m01``, ... in decreasing traffic share."""
    width = max(2, len(str(config.merchants - 1)))
    return [f"m{k:0{width}d}" for k in range(config.merchants)]


def ground_truth(config: GeneratorConfig) -> list[dict]:
    """Where each drift starts: merchant_id, at_event, timestamp (of that event), kind, magnitude, and
    ``first_merchant_event``, the global index of the merchant's first event at or after ``at_event``."""
    return [dict(row) for row in _simulate(config).truth]


def generate(config: GeneratorConfig) -> Iterator[Event]:
    """All catalog events first, then exactly ``config.events`` clicks and orders in time order (catalog
    re-issues of ``prices`` drifts come right before the drift's event)."""
    sim = _simulate(config)
    world, imp, seed, mids = sim.world, sim.impressions, config.seed, merchant_ids(config)
    cat_names = world.category_name
    item_ids = [f"i{k}" for k in world.item_local.tolist()]
    user_ids = [f"u{k}" for k in world.user_local.tolist()]
    item_mcat = world.item_mcat.tolist()
    titles = catalog_titles(seed, [cat_names[g] for g in world.item_mcat.tolist()], world.item_mcat, world.item_quality,
                            [BRANDS[b] for b in world.item_brand.tolist()], world.item_local, sim.initial_items)
    for j, price in enumerate(world.item_price[:sim.initial_items].tolist()):  # drifts may add items later
        yield _catalog_event(world, j, price, config.start_time - config.catalog_start_offset_s, mids,
                             item_ids, titles, f"cat{seed}-{j}")
    reissues = {change.at_event: change for change in sim.price_changes}
    currency = [CURRENCIES[k] for k in world.merchant_currency.tolist()]
    order_start, order_lines_item = sim.order_offsets, sim.order_line_item.tolist()
    order_qty, order_price = sim.order_line_qty.tolist(), sim.order_line_price.tolist()
    sessions = sim.sessions
    for lo in range(0, len(sim.stream_kind), _CHUNK):  # columns gathered per chunk: bounded Python lists
        kind_a, ref_a = sim.stream_kind[lo:lo + _CHUNK], sim.stream_ref[lo:lo + _CHUNK]
        clicks = np.where(kind_a == 0, ref_a, 0)
        orders = np.where(kind_a == 1, ref_a, 0)
        click_session = imp.session[clicks]
        columns = zip(
            range(lo, lo + len(kind_a)), kind_a.tolist(), ref_a.tolist(), sim.stream_time[lo:lo + _CHUNK].tolist(),
            imp.merchant[clicks].tolist(), imp.user[clicks].tolist(), imp.item[clicks].tolist(),
            click_session.tolist(), imp.position[clicks].tolist(), imp.page[clicks].tolist(),
            imp.device[clicks].tolist(), sim.labels[clicks].tolist(), imp.first_of_session[clicks].tolist(),
            sessions.referrer[click_session].tolist(), sessions.merchant[orders].tolist(), sessions.user[orders].tolist(),
        )
        for n, kind, ref, when, merchant, user, item, session, position, page, device, label, first, referrer, \
                o_merchant, o_user in columns:
            change = reissues.get(n)
            if change is not None:
                for j, price in zip(change.items.tolist(), change.prices.tolist()):
                    yield _catalog_event(world, j, price, change.timestamp, mids, item_ids, titles,
                                         f"cat{seed}-{j}-d{n}")
            if kind == 0:
                yield Click(
                    event_id=f"c{seed}-{ref}", merchant_id=mids[merchant], user_id=user_ids[user],
                    item_id=item_ids[item], session_id=f"s{seed}-{session}", timestamp=when, position=position,
                    page=PAGES[page], device=DEVICES[device], clicked=label,
                    query=cat_names[item_mcat[item]] if page == 1 else None,
                    referrer=REFERRERS[referrer] if first else None,
                )
            else:
                lines = range(order_start[ref], order_start[ref + 1])
                yield Order(
                    event_id=f"o{seed}-{ref}", order_id=f"{mids[o_merchant]}-o{seed}-{ref}",
                    merchant_id=mids[o_merchant], user_id=user_ids[o_user], session_id=f"s{seed}-{ref}",
                    timestamp=when, currency=currency[o_merchant],
                    items=[LineItem(item_id=item_ids[order_lines_item[k]], quantity=order_qty[k],
                                    unit_price=order_price[k]) for k in lines],
                )


_CHUNK = 65_536


def _catalog_event(world, j, price, when, mids, item_ids, titles, event_id) -> CatalogItem:
    return CatalogItem(event_id=event_id, merchant_id=mids[world.item_merchant[j]], item_id=item_ids[j],
                       category=world.category_name[world.item_mcat[j]], price=price, title=titles[j],
                       brand=BRANDS[world.item_brand[j]], timestamp=when)


# ----------------------------------------------------------------------------------------------------------
# Simulation on arrays (no Python objects): the world, the sessions, the labels, the drifts, the stream.


@dataclass
class _World:
    merchant_share: np.ndarray  # [M]
    merchant_base: np.ndarray  # [M] click logit offset
    merchant_currency: np.ndarray  # [M]
    merchant_ncat: np.ndarray  # [M]
    mcat_offset: np.ndarray  # [M+1] merchant m owns global categories mcat_offset[m]:mcat_offset[m+1]
    category_name: list[str]  # [G]
    mcat_level: np.ndarray  # [G] price level
    mcat_effect: np.ndarray  # [G] click logit
    item_offset: np.ndarray  # [G+1] category g owns items item_offset[g]:item_offset[g+1]
    item_merchant: np.ndarray  # [J]
    item_mcat: np.ndarray  # [J]
    item_local: np.ndarray  # [J]
    item_price: np.ndarray  # [J]
    item_quality: np.ndarray  # [J]
    item_brand: np.ndarray  # [J]
    item_cum: np.ndarray  # [J] g + within-category cumulative popularity, for vectorized sampling
    user_offset: np.ndarray  # [M+1]
    user_local: np.ndarray  # [K]
    user_pref: np.ndarray  # [K, Cmax] over the merchant's local categories, -inf padded
    user_device: np.ndarray  # [K]
    user_cum: np.ndarray  # [K] m + within-merchant cumulative activity


@dataclass
class _Sessions:
    merchant: np.ndarray
    user: np.ndarray
    start: np.ndarray
    device: np.ndarray
    referrer: np.ndarray
    order_time: np.ndarray


@dataclass
class _Impressions:
    session: np.ndarray
    page_index: np.ndarray  # page view the impression belongs to
    user: np.ndarray
    merchant: np.ndarray
    local_cat: np.ndarray  # category index inside the merchant
    item: np.ndarray
    position: np.ndarray
    page: np.ndarray  # page type
    device: np.ndarray
    time: np.ndarray
    first_of_session: np.ndarray
    context_logit: np.ndarray  # merchant, position, device, page and hour terms (not item, taste or price)
    u_item: np.ndarray  # uniform draws that pick the item inside the category (reused after a drift)
    u_click: np.ndarray
    u_order: np.ndarray
    quantity: np.ndarray

    @property
    def mcat(self) -> np.ndarray:
        return self._mcat

    def place(self, world: _World, rows: np.ndarray | slice = slice(None)) -> None:
        """(Re)derive global categories and items of ``rows`` from their local categories and draws."""
        if not hasattr(self, "_mcat"):
            self._mcat = np.empty(len(self.time), dtype=np.int64)
        mcat = world.mcat_offset[self.merchant[rows]] + self.local_cat[rows]
        item = np.searchsorted(world.item_cum, mcat + self.u_item[rows])
        self._mcat[rows] = mcat
        self.item[rows] = np.clip(item, world.item_offset[mcat], world.item_offset[mcat + 1] - 1)


@dataclass
class _PriceChange:
    merchant: int
    at_event: int
    key: tuple[float, int]
    timestamp: float
    items: np.ndarray
    prices: np.ndarray


@dataclass
class _Simulation:
    world: _World
    sessions: _Sessions
    impressions: _Impressions
    labels: np.ndarray
    order_offsets: list[int]  # per session: its order lines are [offsets[s], offsets[s+1])
    order_line_item: np.ndarray
    order_line_qty: np.ndarray
    order_line_price: np.ndarray
    stream_kind: np.ndarray  # 0 click (ref = impression), 1 order (ref = session)
    stream_ref: np.ndarray
    stream_time: np.ndarray
    price_changes: list[_PriceChange]
    truth: list[dict]
    initial_items: int  # items in the catalog from the start (popular_item drifts append one each)


def _rngs(seed: int, n: int) -> list[np.random.Generator]:
    return [np.random.default_rng(s) for s in np.random.SeedSequence([seed, 20240917]).spawn(n)]


def _build_world(config: GeneratorConfig, expected_sessions: float, rng: np.random.Generator) -> _World:
    m_count = config.merchants
    share = 1.0 / np.arange(1, m_count + 1) ** config.merchant_zipf
    share /= share.sum()
    lo, hi = config.items_per_merchant
    scale = share / share.max()
    n_items = np.maximum(lo, np.round(lo + (hi - lo) * scale ** 0.7)).astype(int)
    ncat = rng.integers(5, 13, size=m_count)
    names = list(CATEGORY_PRICES)
    mcat_offset = np.concatenate([[0], np.cumsum(ncat)])
    category_name: list[str] = []
    for m in range(m_count):
        category_name += [names[k] for k in rng.choice(len(names), size=ncat[m], replace=False)]
    merchant_price = rng.lognormal(0.0, 0.25, size=m_count)
    mcat_merchant = np.repeat(np.arange(m_count), ncat)
    mcat_level = np.array([CATEGORY_PRICES[c] for c in category_name]) * merchant_price[mcat_merchant]
    mcat_effect = rng.normal(0.0, 0.3, size=len(category_name))
    # items: split the merchant's items over its categories (Dirichlet shares), at least 3 per category
    per_cat = []
    for m in range(m_count):
        weights = rng.dirichlet(np.full(ncat[m], 2.0))
        per_cat.append(np.maximum(3, np.round(weights * n_items[m])).astype(int))
    items_per_mcat = np.concatenate(per_cat)
    item_offset = np.concatenate([[0], np.cumsum(items_per_mcat)])
    n_total = int(item_offset[-1])
    item_mcat = np.repeat(np.arange(len(category_name)), items_per_mcat)
    item_merchant = mcat_merchant[item_mcat]
    item_first = np.concatenate([[0], np.cumsum(np.bincount(item_merchant, minlength=m_count))])
    item_local = np.arange(n_total) - item_first[item_merchant]
    rank_in_cat = np.arange(n_total) - item_offset[item_mcat]
    popularity = 1.0 / (1.0 + rank_in_cat) ** 1.1  # Zipf inside each category
    pop_sum = np.bincount(item_mcat, weights=popularity)
    cum_in_cat = np.cumsum(popularity) - np.repeat(np.cumsum(pop_sum) - pop_sum, items_per_mcat)
    item_cum = item_mcat + cum_in_cat / pop_sum[item_mcat]
    log_pop = np.log(popularity)
    quality = 0.3 * (log_pop - log_pop.mean()) / (log_pop.std() + 1e-9) + rng.normal(0.0, 0.5, n_total)
    price = np.round(mcat_level[item_mcat] * rng.lognormal(0.0, 0.45, n_total), 2)
    # users: enough that each makes about `sessions_per_user` sessions
    n_users = np.maximum(20, np.round(share * expected_sessions / config.sessions_per_user)).astype(int)
    user_offset = np.concatenate([[0], np.cumsum(n_users)])
    k_total = int(user_offset[-1])
    user_merchant = np.repeat(np.arange(m_count), n_users)
    user_local = np.arange(k_total) - user_offset[user_merchant]
    cmax = int(ncat.max())
    pref = rng.normal(0.0, 1.0, size=(k_total, cmax))
    pref[np.arange(cmax)[None, :] >= ncat[user_merchant][:, None]] = -np.inf
    activity = rng.lognormal(0.0, 1.0, k_total)
    act_sum = np.bincount(user_merchant, weights=activity)
    cum_in_m = np.cumsum(activity) - np.repeat(np.cumsum(act_sum) - act_sum, n_users)
    return _World(
        merchant_share=share, merchant_base=rng.normal(-3.0, 0.3, m_count),
        merchant_currency=rng.integers(0, len(CURRENCIES), m_count), merchant_ncat=ncat,
        mcat_offset=mcat_offset, category_name=category_name, mcat_level=mcat_level, mcat_effect=mcat_effect,
        item_offset=item_offset, item_merchant=item_merchant, item_mcat=item_mcat, item_local=item_local,
        item_price=price, item_quality=quality, item_brand=rng.integers(0, len(BRANDS), n_total),
        item_cum=item_cum, user_offset=user_offset, user_local=user_local, user_pref=pref,
        user_device=rng.choice(len(DEVICES), size=k_total, p=DEVICE_SHARE), user_cum=user_merchant + cum_in_m / act_sum[user_merchant],
    )


def _seasonal_seconds(rng: np.random.Generator, n: int) -> np.ndarray:
    """Seconds into the day, with an evening peak and a night trough."""
    minutes = np.arange(1440)
    hours = minutes / 60.0
    density = 1.0 + 0.75 * np.cos(2 * np.pi * (hours - 20.5) / 24) + 0.2 * np.cos(4 * np.pi * (hours - 12.5) / 24)
    density /= density.sum()
    return (rng.choice(1440, size=n, p=density) + rng.random(n)) * 60.0


def _taste_choice(rng: np.random.Generator, pref_rows: np.ndarray, temperature: float = 0.7) -> np.ndarray:
    """Local category index per row: softmax(pref / T) sampled with the Gumbel-max trick."""
    gumbel = -np.log(-np.log(rng.random(pref_rows.shape)))
    return np.argmax(pref_rows / temperature + gumbel, axis=1)


def _build_sessions(config: GeneratorConfig, world: _World, n_sessions: int, rng: np.random.Generator):
    merchant = rng.choice(config.merchants, size=n_sessions, p=world.merchant_share)
    user = np.searchsorted(world.user_cum, merchant + rng.random(n_sessions))
    user = np.minimum(user, world.user_offset[merchant + 1] - 1)
    n_days = max(1, int(math.ceil(config.days)))
    midnight = config.start_time - config.start_time % 86_400.0
    start = midnight + rng.integers(0, n_days, n_sessions) * 86_400.0 + _seasonal_seconds(rng, n_sessions)
    start = np.where(start < config.start_time, start + 86_400.0 * n_days, start)
    device = np.where(rng.random(n_sessions) < 0.85, world.user_device[user],
                      rng.choice(len(DEVICES), size=n_sessions, p=DEVICE_SHARE))
    referrer = rng.choice(len(REFERRERS), size=n_sessions, p=[0.35, 0.3, 0.1, 0.15, 0.1])
    n_pages = np.minimum(rng.geometric(0.4, n_sessions), 12)
    # page views: a type, a time (exponential dwell), PAGE_SLOTS[type] slots
    p_session = np.repeat(np.arange(n_sessions), n_pages)
    first = np.concatenate([[True], p_session[1:] != p_session[:-1]])
    n_p = len(p_session)
    page = np.where(first, rng.choice(len(PAGES), size=n_p, p=FIRST_PAGE_SHARE),
                    rng.choice(len(PAGES), size=n_p, p=NEXT_PAGE_SHARE))
    gaps = rng.exponential(40.0, n_p)
    gaps[first] = 0.0
    cum = np.cumsum(gaps)
    page_time = start[p_session] + cum - np.repeat(cum[first], n_pages)
    slots = PAGE_SLOTS[page]
    # impressions
    i_page = np.repeat(np.arange(n_p), slots)
    n_i = len(i_page)
    position = np.arange(n_i) - np.repeat(np.cumsum(slots) - slots, slots)
    i_session = p_session[i_page]
    i_merchant = merchant[i_session]
    i_ptype = page[i_page]
    i_device = device[i_session]
    time = page_time[i_page] + 0.5 * position + 1e-3 * rng.random(n_i)
    hour = (time % 86_400.0) / 3600.0  # UTC, as the featurizer reads it
    context_logit = (world.merchant_base[i_merchant] - 0.45 * np.log1p(position) + DEVICE_EFFECT[i_device]
                     + PAGE_EFFECT[i_ptype] + 0.25 * np.cos(2 * np.pi * (hour - 21.0) / 24.0))
    last_time = np.full(n_sessions, -np.inf)
    np.maximum.at(last_time, i_session, time)
    order_time = last_time + 60.0 + rng.exponential(120.0, n_sessions)
    imp = _Impressions(
        session=i_session, page_index=i_page, user=user[i_session], merchant=i_merchant,
        local_cat=np.zeros(n_i, dtype=np.int64), item=np.zeros(n_i, dtype=np.int64), position=position,
        page=i_ptype, device=i_device, time=time, first_of_session=np.concatenate([[True], i_session[1:] != i_session[:-1]]),
        context_logit=context_logit, u_item=rng.random(n_i), u_click=rng.random(n_i), u_order=rng.random(n_i),
        quantity=np.minimum(rng.geometric(0.75, n_i), 20),
    )
    local, _ = _display_categories(rng, world, imp, np.arange(n_i), world.user_pref)
    imp.local_cat[:] = local
    imp.place(world)
    return _Sessions(merchant, user, start, device, referrer, order_time), imp


def _display_categories(rng, world, imp, rows, pref) -> tuple[np.ndarray, np.ndarray]:
    """Local categories shown at ``rows``, and which of them followed the user's tastes.

    Search/category/product/cart pages show one category the user is after; recommendation slots
    follow the tastes slot by slot; home and other pages show categories at random.
    """
    ptype = imp.page[rows]
    pages, first_row, inverse = np.unique(imp.page_index[rows], return_index=True, return_inverse=True)
    page_cat = _taste_choice(rng, pref[imp.user[rows][first_row]])[inverse]
    slot_cat = _taste_choice(rng, pref[imp.user[rows]])
    random_cat = np.floor(rng.random(len(rows)) * world.merchant_ncat[imp.merchant[rows]]).astype(np.int64)
    per_page = PAGE_CATEGORY_FROM_TASTE[ptype]
    reco = ptype == _RECO
    local = np.where(per_page, page_cat, np.where(reco, slot_cat, random_cat))
    return local, per_page | reco


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _labels(config, world, imp, pref_value, price_value) -> tuple[np.ndarray, np.ndarray]:
    """Click and purchase labels from the latent model (the uniforms are fixed, so drifts reuse them)."""
    price_term = -0.8 * np.log(price_value / world.mcat_level[imp.mcat])
    quality = world.item_quality[imp.item]
    logit = imp.context_logit + quality + world.mcat_effect[imp.mcat] + pref_value + price_term
    clicked = imp.u_click < _sigmoid(logit)
    buy = np.clip(config.order_rate * _sigmoid(-2.0 + 0.6 * pref_value + 0.3 * quality + 0.5 * price_term), 0, 1)
    return clicked, clicked & (imp.u_order < buy)


def _stream(config, sessions, imp, ordered) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Clicks and orders in (time, sequence) order, cut at ``config.events``; also each event's sequence."""
    n_i = len(imp.time)
    has_order = np.bincount(imp.session, weights=ordered, minlength=len(sessions.start)) > 0
    order_sessions = np.flatnonzero(has_order)
    kind = np.concatenate([np.zeros(n_i, np.int8), np.ones(len(order_sessions), np.int8)])
    ref = np.concatenate([np.arange(n_i), order_sessions])
    time = np.concatenate([imp.time, sessions.order_time[order_sessions]])
    seq = np.concatenate([np.arange(n_i), n_i + order_sessions])
    order = np.lexsort((seq, time))[: config.events]
    return kind[order], ref[order], time[order], seq[order]


@lru_cache(maxsize=2)
def _simulate(config: GeneratorConfig) -> _Simulation:
    world_rng, session_rng, drift_rng = _rngs(config.seed, 3)
    n_sessions = int(config.events / 15.0 * 1.15) + 20  # ~15 impressions per session
    world = _build_world(config, n_sessions, world_rng)
    while True:
        sessions, imp = _build_sessions(config, world, n_sessions, np.random.default_rng(session_rng.integers(2**63)))
        if len(imp.time) >= config.events:
            break
        n_sessions = int(n_sessions * 1.5) + 10
    if config.conversion_delay_s > 0:  # its own stream: every other draw stays as without it
        late = np.random.default_rng([config.seed, 20240917, 1]).lognormal(0.0, 1.2, len(sessions.order_time))
        sessions.order_time += config.conversion_delay_s * late
    pref = world.user_pref.copy()  # current tastes, changed by preference drifts
    pref_value = pref[imp.user, imp.local_cat]
    price_value = world.item_price[imp.item].copy()
    item_price_now = world.item_price.copy()
    clicked, ordered = _labels(config, world, imp, pref_value, price_value)
    initial_items = len(world.item_price)
    changes: list[_PriceChange] = []
    truth: list[dict] = []
    mids = merchant_ids(config)
    n_i = len(imp.time)
    for drift in sorted(config.drifts, key=lambda d: d.at_event):
        _, _, time, seq = _stream(config, sessions, imp, ordered)
        n, merchant = drift.at_event, mids.index(drift.merchant_id)
        key_time, key_seq = float(time[n]), int(seq[n])
        after = (imp.time > key_time) | ((imp.time == key_time) & (np.arange(n_i) >= key_seq))
        rows = np.flatnonzero(after & (imp.merchant == merchant))
        if drift.kind == "preferences":
            lo, hi, ncat = world.user_offset[merchant], world.user_offset[merchant + 1], world.merchant_ncat[merchant]
            pref[lo:hi, :ncat] = drifted_pref(pref[lo:hi, :ncat], drift.magnitude, drift_rng)
            local, follows_taste = _display_categories(drift_rng, world, imp, rows, pref)
            imp.local_cat[rows[follows_taste]] = local[follows_taste]  # users now look for other things
            imp.place(world, rows)
            pref_value[rows] = pref[imp.user[rows], imp.local_cat[rows]]
        elif drift.kind == "device_mix":
            shift_devices(imp, rows, drift.magnitude, drift_rng, DEVICE_EFFECT, DEVICES.index("app"))
        elif drift.kind == "popular_item":
            j, price = add_popular_item(world, imp, rows, merchant, drift.magnitude, drift_rng, len(BRANDS))
            item_price_now = np.append(item_price_now, price)
            changes.append(_PriceChange(merchant, n, (key_time, key_seq), key_time, np.array([j]), np.array([price])))
            pref_value[rows] = pref[imp.user[rows], imp.local_cat[rows]]
        elif drift.kind == "label_delay":
            late = (sessions.merchant == merchant) & (sessions.order_time > key_time)
            sessions.order_time[late] += drift.magnitude * drift_rng.exponential(1800.0, int(late.sum()))
        else:
            items = np.flatnonzero(world.item_merchant == merchant)
            factor = np.exp(drift.magnitude * drift_rng.normal(0.35, 0.25, world.merchant_ncat[merchant]))
            local = world.item_mcat[items] - world.mcat_offset[merchant]
            noise = np.exp(drift.magnitude * drift_rng.normal(0.0, 0.1, len(items)))
            item_price_now[items] = np.round(item_price_now[items] * factor[local] * noise, 2)
            changes.append(_PriceChange(merchant, n, (key_time, key_seq), key_time, items,
                                        item_price_now[items].copy()))
        price_value[rows] = item_price_now[imp.item[rows]]
        new_clicked, new_ordered = _labels(config, world, imp, pref_value, price_value)
        clicked[rows], ordered[rows] = new_clicked[rows], new_ordered[rows]
        truth.append({"merchant_id": drift.merchant_id, "at_event": n, "timestamp": key_time,
                      "kind": drift.kind, "magnitude": drift.magnitude})
    kind, ref, time, _ = _stream(config, sessions, imp, ordered)
    order_offsets, line_item, line_qty, line_price = _order_lines(world, sessions, imp, ordered, changes)
    stream_merchant = np.where(kind == 0, imp.merchant[np.where(kind == 0, ref, 0)],
                               sessions.merchant[np.where(kind == 1, ref, 0)])
    for row in truth:
        later = np.flatnonzero(stream_merchant[row["at_event"]:] == mids.index(row["merchant_id"]))
        row["first_merchant_event"] = int(later[0]) + row["at_event"] if len(later) else None
    return _Simulation(world, sessions, imp, clicked, order_offsets, line_item, line_qty, line_price,
                       kind, ref, time, changes, truth, initial_items)


def _order_lines(world, sessions, imp, ordered, changes):
    """One order per session with bought items (one line per item); unit price = catalog price at order time."""
    idx = np.flatnonzero(ordered)
    n_items = len(world.item_price)
    pair = imp.session[idx] * n_items + imp.item[idx]
    pairs, inverse = np.unique(pair, return_inverse=True)  # sorted by session, then item
    line_session, line_item = pairs // n_items, pairs % n_items
    quantity = np.bincount(inverse, weights=imp.quantity[idx]).astype(int)
    line_price = world.item_price[line_item].copy()
    line_time = sessions.order_time[line_session]
    line_seq = len(imp.time) + line_session
    for change in changes:  # in time order, so the latest price wins
        key_time, key_seq = change.key
        due = (world.item_merchant[line_item] == change.merchant) & (
            (line_time > key_time) | ((line_time == key_time) & (line_seq >= key_seq)))
        lookup = dict(zip(change.items.tolist(), change.prices.tolist()))
        line_price[due] = [lookup.get(j, old) for j, old in zip(line_item[due].tolist(), line_price[due].tolist())]
    counts = np.bincount(line_session, minlength=len(sessions.start))
    offsets = np.concatenate([[0], np.cumsum(counts)]).tolist()
    return offsets, line_item, np.minimum(quantity, 100_000), line_price
