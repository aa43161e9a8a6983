"""fedstream: streams."""
