"""Structured logs: one JSON object per line on stderr, with any ``extra=`` fields merged in."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
import warnings

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        payload.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


def configure_logging(level: str | None = None) -> None:
    """Route the root logger to stderr as JSON lines (idempotent). Level from FEDSTREAM_LOG_LEVEL."""
    root = logging.getLogger()
    if any(isinstance(h.formatter, JsonFormatter) for h in root.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root.addHandler(handler)
    root.setLevel(level or os.environ.get("FEDSTREAM_LOG_LEVEL", "WARNING").upper())
    # kafka-python logs every refused connection at ERROR; our own errors say what matters.
    logging.getLogger("kafka").setLevel(os.environ.get("FEDSTREAM_KAFKA_LOG_LEVEL", "CRITICAL").upper())
    logging.getLogger("fedstream").setLevel(level or os.environ.get("FEDSTREAM_LOG_LEVEL", "INFO").upper())


# Library settings read from the environment (children inherit them); a user's own setting wins.
#   TF_CPP_MIN_LOG_LEVEL 3: TensorFlow's C++ start-up lines (CUDA plugin registration on a CPU machine) are
#     logged at ERROR (level 2) and say nothing a user can act on.
#   MLFLOW_CONFIGURE_LOGGING false: MLflow's loggers propagate to our JSON handler at the user's level instead
#     of MLflow's own INFO handler (database set-up, uv.lock copies).
#   MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR false: no tqdm bars when a model version is downloaded.
QUIET_ENV = {"TF_CPP_MIN_LOG_LEVEL": "3", "MLFLOW_CONFIGURE_LOGGING": "false",
             "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}

# (logger, start of message) of library warnings a user of fedstream cannot act on: we pass the pyfunc
# wrapper as an object on purpose (signed bundles, registry/flavor.py), and uv environments have no pip.
# A federated version is a Keras model served through our flavor (no pyfunc signature needed), and Keras
# notes that a model loaded for scoring was never trained in this process.
UNACTIONABLE_LOGS = (("mlflow.pyfunc", "Passing a Python object as `python_model`"),
                     ("mlflow.utils.environment", "Failed to resolve installed pip version"),
                     ("mlflow.tensorflow", "You are saving a TensorFlow Core model or Keras model without a signature"),
                     ("tensorflow", "Compiled the loaded model, but the compiled metrics have yet to be built"),
                     # TFF's secure aggregator builds range asserts it never runs (tf_should_use, at garbage collection)
                     ("tensorflow", "==================================\nObject was never used"))

# (category, message regex) of Python warnings from libraries a user cannot act on. MLflow colours its
# message (ANSI codes first), hence the leading ``.*``; it also raises it under its own
# ``simplefilter("once")``, which outranks any filter, so these are dropped where warnings are shown too.
UNACTIONABLE_WARNINGS = ((UserWarning, r".*Add type hints to the `predict` method"),)


def _unactionable(message: object, category: type[Warning]) -> bool:
    return any(issubclass(category, kind) and re.match(pattern, str(message))
               for kind, pattern in UNACTIONABLE_WARNINGS)


def _showing_actionable(show):  # noqa: ANN001, ANN202 (warnings.showwarning's signature)
    def showwarning(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001, ANN202
        if not _unactionable(message, category):
            show(message, category, filename, lineno, file, line)

    showwarning.fedstream_quiet = True
    return showwarning


class DropMessages(logging.Filter):
    """Drops records whose message starts with one of ``starts`` (on one library logger only)."""

    def __init__(self, starts: tuple[str, ...]) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


def quiet_libraries() -> None:
    """Silence, at their source, the library messages a user cannot act on (idempotent; never our own)."""
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    for logger_name, start in UNACTIONABLE_LOGS:
        logger = logging.getLogger(logger_name)
        if not any(isinstance(f, DropMessages) and start in f.starts for f in logger.filters):
            logger.addFilter(DropMessages((start,)))
    for category, message in UNACTIONABLE_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    if not getattr(warnings.showwarning, "fedstream_quiet", False):
        warnings.showwarning = _showing_actionable(warnings.showwarning)
    # alembic (MLflow's schema migrations) narrates every step at INFO
    logging.getLogger("alembic").setLevel(logging.WARNING)


def get_logger(name: str) -> logging.Logger:
    """A logger under the ``fedstream`` namespace."""
    return logging.getLogger(f"fedstream.{name}")
