"""The co-occurrence and transition rows' per-step updates, row by row (mixed into ``CandidateState``).

Design notes: `online/README.md` (the update side).
"""

from __future__ import annotations


class RowLinks:
    """Counting links ``a -> b`` into a table of rows ``{a: {b: count}}`` with row totals; the host class
    gives ``max_neighbors``, ``_cap`` and ``_link_both`` (``online.candidates.CandidateState``)."""

    max_neighbors: int

    def _link_to(self, table: dict[str, dict[str, float]], totals: dict[str, float], sources: list[str] | dict,
                 item: str) -> None:
        """:meth:`_link` of the pairs ``(source, item)`` for each of ``sources`` (distinct), in that order. A row
        and its total exist together, and a row never holds more than ``2 * max_neighbors`` links after an
        update, so only a new link can make it overflow."""
        cap = 2 * self.max_neighbors
        for source in sources:
            row = table.get(source)
            if row is None:
                table[source] = {item: 1.0}
                totals[source] = totals.get(source, 0.0) + 1.0
            elif item in row:
                row[item] += 1.0
                totals[source] += 1.0
            else:
                row[item] = 1.0
                totals[source] += 1.0
                if len(row) > cap:
                    self._cap(table, totals, source, row)

    def _co_link(self, table: dict[str, dict[str, float]], totals: dict[str, float], item: str,
                 others: dict | list) -> None:
        """:meth:`_link_both` (``others`` non-empty) when ``item``'s own row cannot overflow on the way: no cap
        check on it, and a row and its total exist together (see :meth:`_link_to`)."""
        own = table.get(item)
        if own is None and next(iter(others)) in table:  # created first: no row or total is inserted in between
            own = table[item] = {}
            if item not in totals:
                totals[item] = 0.0
        cap = 2 * self.max_neighbors
        if own is None or len(own) + len(others) > cap:
            self._link_both(table, totals, item, list(others))
            return
        for other in others:  # _link_to, inlined: the most frequent update
            row = table.get(other)
            if row is None:
                table[other] = {item: 1.0}
                totals[other] = totals.get(other, 0.0) + 1.0
            elif item in row:
                row[item] += 1.0
                totals[other] += 1.0
            else:
                row[item] = 1.0
                totals[other] += 1.0
                if len(row) > cap:
                    self._cap(table, totals, other, row)
            if other in own:
                own[other] += 1.0
            else:
                own[other] = 1.0
        totals[item] += len(others)


__all__ = ["RowLinks"]
