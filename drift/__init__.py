"""fedstream: drift."""
