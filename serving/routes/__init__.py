"""The API's routers by audience: ``ops`` (health, readiness, metrics), ``merchant`` (recommendations,
predictions, served model, drift of one merchant), ``ingest`` (events) and ``admin`` (models, all drift)."""
