"""A merchant's co-occurrence and transition links as arrays over item codes, counted natively in queued steps.

Design notes: `online/README.md` ("The link rows").
"""

from __future__ import annotations

from sys import intern

import numpy as np

MAX_QUEUED = 1 << 16  # queued op values past which the update counts them at once (memory stays bounded)
MIN_ROWS = 8  # rows (and codes) a table starts with, doubled as they come: small merchants stay small
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
    Rows are made for the items that link to something (``row_of[code]``; an item only linked to costs 4
    bytes), ``12 * (2 * keep + 1)`` bytes each.

    >>> co = LinkRows(ItemCodes(), keep=50, both=True)
    >>> co.ops += (co.codes["i2"], 1, co.codes["i1"])   # i2 chosen after i1
    >>> co.as_dict()
    {'i1': {'i2': 1.0}, 'i2': {'i1': 1.0}}
    >>> co.related([("i1", 1.0)], limit=10)
    {'i2': 1.0}
    """

    def __init__(self, codes: ItemCodes, keep: int, both: bool) -> None:
        self.codes = codes
        self.keep = keep
        self.both = both
        self.ops: list[int] = []
        self.used = 0  # rows in use
        self._allocate_rows(MIN_ROWS)
        self._allocate_codes(MIN_ROWS)
        kernels()

    def _allocate_rows(self, rows: int) -> None:
        width = 2 * self.keep + 1
        self.nbr = np.zeros((rows, width), dtype=np.int32)
        self.val = np.zeros((rows, width), dtype=np.float64)
        self.n = np.zeros(rows, dtype=np.int32)
        self.tot = np.zeros(rows, dtype=np.float64)
        self.row_code = np.zeros(rows, dtype=np.int32)

    def _allocate_codes(self, codes: int) -> None:
        self.row_of = np.full(codes, -1, dtype=np.int32)
        self.slot = np.full(codes, -1, dtype=np.int32)  # related's scratch

    def _fit_codes(self) -> None:
        """``row_of`` and the scratch for every code (doubled when the codes outgrow them)."""
        have, need = len(self.row_of), len(self.codes.ids)
        if need > have:
            row_of = self.row_of
            self._allocate_codes(max(need, 2 * have))
            self.row_of[:have] = row_of

    def _grow_rows(self, need: int) -> None:
        have = len(self.n)
        old = (self.nbr, self.val, self.n, self.tot, self.row_code)
        self._allocate_rows(max(need, 2 * have))
        for new, kept in zip((self.nbr, self.val, self.n, self.tot, self.row_code), old):
            new[:have] = kept

    def queue(self, item: str, sources) -> None:
        """Queue a step's links from ``sources`` (distinct, none ``item``) to ``item`` (see the class docstring)."""
        if sources:
            code_of = self.codes.__getitem__
            ops = self.ops
            ops += (code_of(item), len(sources))
            ops += map(code_of, sources)
            if len(ops) > MAX_QUEUED:  # a state nobody reads for long (no proposals) stays bounded
                self.flush()

    def flush(self) -> None:
        """Count the queued steps' links (the rows double whenever the next step could outgrow them)."""
        if self.ops:
            self._fit_codes()
            ops, start = np.array(self.ops, dtype=np.int64), 0
            while start < len(ops):
                start, self.used = kernels().apply_links(self.nbr, self.val, self.n, self.tot, self.row_code,
                                                         self.row_of, self.used, ops, start, self.keep, self.both,
                                                         self.slot)
                if start < len(ops):
                    self._grow_rows(self.used + int(ops[start + 1]) + 1)
            self.ops.clear()

    def _ready(self) -> None:
        self.flush()
        self._fit_codes()

    # -- reading ------------------------------------------------------------------------------------------

    def related(self, sources: list[tuple[str, float]], limit: int) -> dict[str, float]:
        """Items linked from weighted source items: Σ weight · link / (the source row's total), first-seen
        order; past ``limit`` items the ``limit`` best, ties in that order."""
        self._ready()
        get = self.codes.get
        codes, scores = kernels().related(self.nbr, self.val, self.n, self.tot, self.row_of,
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
        return kernels().linked(self.nbr, self.n, self.row_of, np.array([get(s, -1) for s in sources], dtype=np.int64),
                                code)

    def _row(self, r: int) -> dict[str, float]:
        ids, k = self.codes.ids, self.n[r]
        return dict(zip(map(ids.__getitem__, self.nbr[r, :k].tolist()), self.val[r, :k].tolist()))

    def row(self, item: str) -> dict[str, float]:
        """Item's row ``{linked item: count}`` in row order (empty when it has none)."""
        self._ready()
        code = self.codes.get(item)
        return {} if code is None or self.row_of[code] < 0 else self._row(int(self.row_of[code]))

    def _held(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The rows holding links (in the order they were made), their link counts, and which of their
        columns hold a link."""
        rows = np.flatnonzero(self.n[:self.used])
        counts = self.n[rows]
        return rows, counts, np.arange(self.nbr.shape[1]) < counts[:, None]

    def as_dict(self) -> dict[str, dict[str, float]]:
        """Every non-empty row (:meth:`row`), in the order the rows were made."""
        self._ready()
        ids, row_code = self.codes.ids, self.row_code
        return {ids[row_code[r]]: self._row(r) for r in self._held()[0].tolist()}

    def totals(self) -> dict[str, float]:
        """Each non-empty row's total, in the order the rows were made."""
        self._ready()
        ids, row_code = self.codes.ids, self.row_code
        return {ids[row_code[r]]: float(self.tot[r]) for r in self._held()[0].tolist()}

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
        return int(self.n[:self.used].sum())

    # -- pruning and pickling -----------------------------------------------------------------------------

    def drop_rows(self, kept: np.ndarray) -> None:
        """Empty the rows of the codes not marked in ``kept`` (a bool per code)."""
        self._ready()
        rows = np.flatnonzero(~kept[self.row_code[:self.used]])
        self.n[rows], self.tot[rows] = 0, 0.0

    def referenced(self, live: np.ndarray) -> None:
        """Mark in ``live`` the codes of the items with a non-empty row and those the rows link to."""
        rows, _, held = self._held()
        live[self.row_code[rows]] = True
        live[self.nbr[rows][held]] = True

    def renumber(self, codes: ItemCodes, live: np.ndarray) -> None:
        """Keep the non-empty rows, their codes and links renumbered in order over the new ``codes`` (the
        ``live`` codes of the old ones)."""
        new = np.cumsum(live, dtype=np.int64) - 1
        rows, counts, held = self._held()
        nbr = np.where(held, new[self.nbr[rows]], 0).astype(np.int32)
        val, tot, row_code = self.val[rows], self.tot[rows], new[self.row_code[rows]].astype(np.int32)
        self.codes = codes
        self._place(row_code, counts, nbr, val, tot)

    def _place(self, row_code: np.ndarray, counts: np.ndarray, nbr: np.ndarray, val: np.ndarray,
               tot: np.ndarray) -> None:
        """Fresh arrays holding these rows (rows ``0 .. len(counts) - 1``) over ``self.codes``."""
        used = len(counts)
        self.used = used
        self._allocate_rows(max(MIN_ROWS, used))
        self._allocate_codes(max(MIN_ROWS, len(self.codes.ids)))
        self.nbr[:used], self.val[:used], self.n[:used], self.tot[:used] = nbr, val, counts, tot
        self.row_code[:used] = row_code
        self.row_of[row_code] = np.arange(used, dtype=np.int32)

    def __getstate__(self) -> dict:
        self._ready()
        rows, counts, held = self._held()
        return {"codes": self.codes, "keep": self.keep, "both": self.both, "rows": self.row_code[rows],
                "counts": counts, "links": self.nbr[rows][held], "values": self.val[rows][held],
                "totals": self.tot[rows]}

    def __setstate__(self, state: dict) -> None:
        self.codes, self.keep, self.both, self.ops = state["codes"], state["keep"], state["both"], []
        counts = state["counts"]
        width = 2 * self.keep + 1
        held = np.arange(width) < counts[:, None]
        nbr, val = np.zeros((len(counts), width), dtype=np.int32), np.zeros((len(counts), width))
        nbr[held], val[held] = state["links"], state["values"]
        self._place(state["rows"], counts, nbr, val, state["totals"])
        kernels()

    @classmethod
    def from_dicts(cls, codes: ItemCodes, keep: int, both: bool, rows: dict[str, dict[str, float]]) -> LinkRows:
        """A table from rows held as dicts (a state pickled before the link rows), in their orders; a row's
        total is its sum (whole counts: exact in any order)."""
        table = cls(codes, keep, both)
        width = 2 * keep + 1
        held = [(codes[intern(a)], [codes[intern(b)] for b in row], list(row.values())) for a, row in rows.items() if row]
        nbr, val = np.zeros((len(held), width), dtype=np.int32), np.zeros((len(held), width))
        for r, (_, links, values) in enumerate(held):
            nbr[r, :len(links)], val[r, :len(values)] = links, values
        table._place(np.array([a for a, _, _ in held], dtype=np.int32),
                     np.array([len(links) for _, links, _ in held], dtype=np.int32), nbr, val, val.sum(axis=1))
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
    new = ItemCodes([codes.ids[a] for a in np.flatnonzero(live).tolist()])
    for table in tables:
        table.renumber(new, live)
    return new


__all__ = ["ItemCodes", "LinkRows", "prune_rows", "MAX_QUEUED"]
