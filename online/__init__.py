"""fedstream: online."""
