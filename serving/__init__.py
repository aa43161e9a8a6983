"""fedstream: serving."""
