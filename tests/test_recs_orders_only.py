"""An orders-only stream end to end: ingest -> learn -> models promote -> serve, recommendations over HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from click.testing import CliRunner

from fedstream.cli import main
from fedstream.host import free_port
from streams.generator import GeneratorConfig, generate
from streams.schemas import Click, Order, encode_event
from tests.test_streams_cli import env_for, last_json_line


def _get(url: str, key: str) -> tuple[int, dict]:
    request = urllib.request.Request(url, headers={"X-API-Key": key})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def _wait_ready(port: int, proc: subprocess.Popen, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.3)
    raise AssertionError("the API never became ready")


def test_orders_only_stream_is_learned_published_promoted_and_served_over_http(kafka_settings, tmp_path: Path):
    events = [e for e in generate(GeneratorConfig(merchants=2, events=30_000, seed=11)) if not isinstance(e, Click)]
    orders = [e for e in events if isinstance(e, Order)]
    assert len(orders) > 300 and not any(isinstance(e, Click) for e in events)
    path = tmp_path / "orders.jsonl"
    path.write_bytes(b"".join(encode_event(e) + b"\n" for e in events))
    env = {**env_for(kafka_settings), "FEDSTREAM_FEATURE_BITS": str(kafka_settings.feature_bits)}
    runner = CliRunner()

    ingested = last_json_line(runner.invoke(main, ["ingest", str(path)], env=env))
    assert ingested["accepted"] == len(events)
    learned = last_json_line(runner.invoke(main, ["learn", "--idle-timeout", "4", "--no-drift", "--publish-every", "0",
                                                  "--block", "64"], env=env))
    assert learned["events"] == len(events) and learned["clicks"] == 0
    assert learned["published_versions"] == ["1"], learned  # an orders-only stream publishes a version
    promoted = runner.invoke(main, ["models", "promote"], env=env)
    assert promoted.exit_code == 0, promoted.output
    buyer = orders[-1]
    key = json.loads(runner.invoke(main, ["serve", "keys", "issue", "--merchant", buyer.merchant_id, "--json"],
                                   env=env).output)["token"]

    port = free_port()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "fedstream"), "serve", "--port", str(port), "--no-poll"],
                            env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_ready(port, proc)
        base = f"http://127.0.0.1:{port}/v1/merchants/{buyer.merchant_id}/recommendations"
        status, body = _get(f"{base}?user_id={buyer.user_id}&k=10", key)
        assert status == 200 and body["model_version"] == "1"
        assert len(body["items"]) == 10 and len({i["item_id"] for i in body["items"]}) == 10
        sources = {i["source"] for i in body["items"]}
        assert sources <= {"history", "co-occurrence", "transition", "popular", "catalog"} and sources
        page_item = buyer.items[0].item_id
        status, page = _get(f"{base}?user_id={buyer.user_id}&k=5&item_id={page_item}", key)
        assert status == 200 and len(page["items"]) == 5 and page_item not in {i["item_id"] for i in page["items"]}
        status, cold = _get(f"{base}?user_id=someone-new&k=3", key)
        assert status == 200 and len(cold["items"]) == 3  # a new user gets popular items
    finally:
        proc.terminate()
        proc.wait(timeout=30)
