"""A merchant's co-occurrence and transition links as arrays over item codes, counted natively in queued steps.

Design notes: `online/README.md` ("The link rows").
"""

from __future__ import annotations

from sys import intern

import numpy as np

MAX_QUEUED = 1 << 16  # queued op values past which the update counts them at once (memory stays bounded)
MIN_ROWS = 8  # rows a table starts with (12 * (2 * keep + 1) bytes each; doubled as codes come): small merchants stay small
_kernels = None  # online.link_kernels once imported (numba: compiled or loaded from the disk cache)


def kernels():
    """:mod:`online.link_kernels`, imported when the first table is made or unpickled (not by importing this)."""
    global _kernels
    if _kernels is None:
        from online import link_kernels

        _kernels = link_kernels
    return _kernels


class ItemCodes(dict):
    """A merchant's item codes: ``codes[item]`` is the item's code, ``ids[code]`` its id; an item looked up for
    the first time gets the next code (``get`` only reads). Pickled as its ids, interned when loaded.

    >>> codes = ItemCodes()
    >>> codes["b"], codes["a"], codes["b"], codes.get("c", -1), codes.ids
    (0, 1, 0, -1, ['b', 'a'])
    """

    def __init__(self, ids: list[str] = ()) -> None:
        super().__init__()
        self.ids: list[str] = []
        for item in ids:
            self[intern(item)]  # noqa: B018  (assigns its code)

    def __missing__(self, item: str) -> int:
        code = self[item] = len(self.ids)
        self.ids.append(item)
        return code

    def __reduce__(self):
        return ItemCodes, (self.ids,)


class LinkRows:
    """One table of rows ``a -> {b: count}`` with row totals over a merchant's :class:`ItemCodes`.

    A step's links are queued (``ops``: ``item code, k, k source codes``) by the update and counted natively
    before anything reads the table (:meth:`flush`): each ``source -> item`` link, and with ``both`` (the
    co-occurrence table) ``item -> source`` after it. A row past ``2 * keep`` links keeps its ``keep``
    strongest, ties in row order. Exactly the counts, totals, row orders and scores of rows held as dicts.

    >>> co = LinkRows(ItemCodes(), keep=50, both=True)
    >>> co.ops += (co.codes["i2"], 1, co.codes["i1"])   # i2 chosen after i1
    >>> co.as_dict()
    {'i2': {'i1': 1.0}, 'i1': {'i2': 1.0}}
    >>> co.related([("i1", 1.0)], limit=10)
    {'i2': 1.0}
    """

    def __init__(self, codes: ItemCodes, keep: int, both: bool) -> None:
        self.codes = codes
        self.keep = keep
        self.both = both
        self.ops: list[int] = []
        self._allocate(MIN_ROWS)
        kernels()

    def _allocate(self, rows: int) -> None:
        width = 2 * self.keep + 1
        self.nbr = np.zeros((rows, width), dtype=np.int32)
        self.val = np.zeros((rows, width), dtype=np.float64)
        self.n = np.zeros(rows, dtype=np.int32)
        self.tot = np.zeros(rows, dtype=np.float64)
        self.slot = np.full(rows, -1, dtype=np.int32)  # related's scratch

    def _fit(self) -> None:
        """Rows for every code (the arrays double when the codes outgrow them)."""
        have, need = len(self.n), len(self.codes.ids)
        if need > have:
            old = (self.nbr, self.val, self.n, self.tot)
            self._allocate(max(need, 2 * have))
            for new, kept in zip((self.nbr, self.val, self.n, self.tot), old):
                new[:have] = kept

    def flush(self) -> None:
        """Count the queued steps' links."""
        if self.ops:
            self._fit()
            kernels().apply_links(self.nbr, self.val, self.n, self.tot, np.array(self.ops, dtype=np.int64),
                                  self.keep, self.both)
            self.ops.clear()

    def _ready(self) -> None:
        self.flush()
        if len(self.codes.ids) > len(self.n):
            self._fit()

    # -- reading ------------------------------------------------------------------------------------------

    def related(self, sources: list[tuple[str, float]], limit: int) -> dict[str, float]:
        """Items linked from weighted source items: Σ weight · link / (the source row's total), first-seen
        order; past ``limit`` items the ``limit`` best, ties in that order."""
        self._ready()
        get = self.codes.get
        codes, scores = kernels().related(self.nbr, self.val, self.n, self.tot,
                                          np.array([get(item, -1) for item, _ in sources], dtype=np.int64),
                                          np.array([weight for _, weight in sources], dtype=np.float64),
                                          limit, self.slot)
        return dict(zip(map(self.codes.ids.__getitem__, codes.tolist()), scores.tolist()))

    def links_any(self, sources, item: str) -> bool:
        """Whether a row of any of ``sources`` links to ``item``."""
        code = self.codes.get(item)
        if code is None or not sources:
            return False
        self._ready()
        get = self.codes.get
        return kernels().linked(self.nbr, self.n, np.array([get(s, -1) for s in sources], dtype=np.int64), code)

    def row(self, item: str) -> dict[str, float]:
        """Item's row ``{linked item: count}`` in row order (empty when it has none)."""
        self._ready()
        code = self.codes.get(item)
        if code is None:
            return {}
        ids, k = self.codes.ids, self.n[code]
        return dict(zip(map(ids.__getitem__, self.nbr[code, :k].tolist()), self.val[code, :k].tolist()))

    def as_dict(self) -> dict[str, dict[str, float]]:
        """Every non-empty row (:meth:`row`), by code."""
        self._ready()
        ids = self.codes.ids
        return {ids[a]: self.row(ids[a]) for a in np.flatnonzero(self.n[:len(ids)]).tolist()}

    def totals(self) -> dict[str, float]:
        """Each non-empty row's total, by code."""
        self._ready()
        ids = self.codes.ids
        return {ids[a]: float(self.tot[a]) for a in np.flatnonzero(self.n[:len(ids)]).tolist()}

    def __eq__(self, other: object) -> bool:
        """The same links: rows (each in its order), counts and totals; codes are how they are held, not what."""
        if not isinstance(other, LinkRows):
            return NotImplemented
        return ((self.keep, self.both, self.totals()) == (other.keep, other.both, other.totals())
                and {a: list(row.items()) for a, row in self.as_dict().items()}
                == {a: list(row.items()) for a, row in other.as_dict().items()})

    __hash__ = None

    def __len__(self) -> int:
        """Links held."""
        self._ready()
        return int(self.n.sum())

    # -- pruning and pickling -----------------------------------------------------------------------------

    def drop_rows(self, kept: np.ndarray) -> None:
        """Empty the rows of the codes not marked in ``kept`` (a bool per code)."""
        self._ready()
        dropped = np.flatnonzero(~kept)
        self.n[dropped], self.tot[dropped] = 0, 0.0

    def referenced(self, live: np.ndarray) -> None:
        """Mark in ``live`` the codes of the items with a row and those the rows link to."""
        rows = len(live)
        counts = self.n[:rows]
        live |= counts > 0
        live[self.nbr[:rows][np.arange(self.nbr.shape[1]) < counts[:, None]]] = True

    def renumber(self, codes: ItemCodes, live: np.ndarray) -> None:
        """Keep the rows of the ``live`` codes, renumbered in order, over the new ``codes``."""
        rows = len(live)
        new = np.cumsum(live, dtype=np.int64) - 1
        nbr, val, n, tot = self.nbr[:rows][live], self.val[:rows][live], self.n[:rows][live], self.tot[:rows][live]
        width = nbr.shape[1]
        nbr = np.where(np.arange(width) < n[:, None], new[nbr], 0).astype(np.int32)
        self.codes = codes
        self._allocate(max(MIN_ROWS, len(codes.ids)))
        self.nbr[:len(n)], self.val[:len(n)], self.n[:len(n)], self.tot[:len(n)] = nbr, val, n, tot

    def __getstate__(self) -> dict:
        self._ready()
        rows = len(self.codes.ids)
        counts = self.n[:rows].copy()
        held = np.arange(self.nbr.shape[1]) < counts[:, None]
        return {"codes": self.codes, "keep": self.keep, "both": self.both, "counts": counts,
                "links": self.nbr[:rows][held], "values": self.val[:rows][held], "totals": self.tot[:rows].copy()}

    def __setstate__(self, state: dict) -> None:
        self.codes, self.keep, self.both, self.ops = state["codes"], state["keep"], state["both"], []
        counts = state["counts"]
        self._allocate(max(MIN_ROWS, len(self.codes.ids)))
        held = np.arange(self.nbr.shape[1]) < counts[:, None]
        rows = len(counts)
        self.n[:rows], self.tot[:rows] = counts, state["totals"]
        self.nbr[:rows][held], self.val[:rows][held] = state["links"], state["values"]
        kernels()

    @classmethod
    def from_dicts(cls, codes: ItemCodes, keep: int, both: bool, rows: dict[str, dict[str, float]]) -> LinkRows:
        """A table from rows held as dicts (a state pickled before the link rows), in their orders; a row's
        total is its sum (whole counts: exact in any order)."""
        table = cls(codes, keep, both)
        for a, row in rows.items():
            for b in row:
                codes[intern(b)]  # noqa: B018
            code = codes[intern(a)]
            table._fit()
            table.n[code], table.tot[code] = len(row), sum(row.values())
            table.nbr[code, :len(row)] = [codes[b] for b in row]
            table.val[code, :len(row)] = list(row.values())
        return table


def prune_rows(codes: ItemCodes, tables: list[LinkRows], kept_items) -> ItemCodes:
    """Drop the rows of items not in ``kept_items`` from every table, then renumber the codes still in use (an
    item with a row, or linked to from one); returns the new codes (the tables hold them)."""
    for table in tables:
        table._ready()
    rows = len(codes.ids)
    kept = np.zeros(rows, dtype=bool)
    kept[np.fromiter((code for code in map(codes.get, kept_items) if code is not None), dtype=np.int64)] = True
    live = np.zeros(rows, dtype=bool)
    for table in tables:
        table.drop_rows(kept)
        table.referenced(live)
    new = ItemCodes()
    new.ids = [codes.ids[a] for a in np.flatnonzero(live).tolist()]
    new.update(zip(new.ids, range(len(new.ids))))
    for table in tables:
        table.renumber(new, live)
    return new


__all__ = ["ItemCodes", "LinkRows", "prune_rows", "MAX_QUEUED"]
