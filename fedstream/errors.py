"""Failures a user can act on: the ``fedstream`` command shows them as one line and exits 1, no traceback.

An error class that describes a condition of the user's setup or input (no broker, no model version, a
missing store) also derives from :class:`ExpectedFailure`; everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class ExpectedFailure(Exception):
    """Mixin for errors whose message alone tells the user what to do."""
