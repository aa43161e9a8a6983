"""Where a running embedded broker is found: ``<data_dir>/broker.json``, read by every Kafka client.

Its own module so that ``streams.kafka`` (clients) and ``streams.broker`` (which starts the broker and
creates its topics with ``streams.kafka``) do not import each other.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

RECORD_FILE = "broker.json"


@dataclass(frozen=True)
class BrokerRecord:
    """Where a running embedded broker is found; written to ``<data_dir>/broker.json``."""

    bootstrap: str
    pid: int
    cluster_id: str
    log_file: str
    started_at: float


def read_broker_record(data_dir: Path) -> BrokerRecord | None:
    path = Path(data_dir) / RECORD_FILE
    if not path.exists():
        return None
    return BrokerRecord(**json.loads(path.read_text()))
