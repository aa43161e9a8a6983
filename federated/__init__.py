"""fedstream: federated."""
