"""A CLI command's console carries no library line at WARNING or above that a user cannot act on."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import httpx

from fedstream.host import free_port
from registry.models import promote
from tests.test_registry_models import NAME, register

# What library noise looks like on a console: MLflow's own log format, Python warnings, TensorFlow's C++
# log lines, tqdm bars, and our JSON log lines at warning or above from a logger that is not ours.
_PLAIN = re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d (WARNING|ERROR|CRITICAL) "  # MLflow's format
                    r"|\w+Warning: "  # Python warnings
                    r"|^\S+ \S+: [EWF] \S+\.cc:\d+\]"  # TensorFlow C++
                    r"|\d+%\|")  # tqdm


def library_noise(console: str) -> list[str]:
    """The lines of ``console`` that are library messages at WARNING or above (or progress bars)."""
    noisy = []
    for line in console.splitlines():
        if line.startswith("{"):
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if (record.get("level") in ("warning", "error", "critical")
                    and not str(record.get("logger", "")).startswith("fedstream")):
                noisy.append(line)
        elif _PLAIN.search(line):
            noisy.append(line)
    return noisy


def test_library_noise_recognizes_each_kind_of_line():
    lines = ['2026/12/01 22:22:14 WARNING mlflow.utils.environment: Failed to resolve installed pip version.',
             "/x/data_validation.py:187: UserWarning: Add type hints to the `predict` method",
             "2026-12-01 22:18:38.171594: E tensorflow/compiler/xla/stream_executor/cuda/cuda_dnn.cc:9342] Unable",
             "Downloading artifacts: 100%|██████████| 1/1 [00:00<00:00, 13530.01it/s]",
             '{"level": "warning", "logger": "tensorflow", "msg": "Compiled the loaded model"}']
    ours = ['{"level": "warning", "logger": "fedstream.online.worker", "msg": "publishing failed"}',
            '2026/12/01 22:17:43 INFO mlflow.store.db.utils: Creating initial MLflow database tables...',
            "version 1 (ftrl): promoted"]
    assert library_noise("\n".join(lines + ours)) == lines


def test_building_secure_aggregation_logs_no_library_errors():
    """TFF's secure aggregator leaves asserts unused, which TensorFlow reports at ERROR when they are collected."""
    script = ("import gc\nfrom fedstream.logs import configure_logging, quiet_libraries\nquiet_libraries()\n"
              "configure_logging()\nfrom federated.model import ModelConfig, tff_model_fn\n"
              "from federated.training import FederatedConfig, build_process\n"
              "build_process(tff_model_fn(ModelConfig(bits=8)), FederatedConfig(secure_agg=True))\ngc.collect()\n"
              "print('built')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**{k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"},  # as the CLI
                               "PYTHONPATH": os.getcwd()})
    assert done.returncode == 0 and "built" in done.stdout, done.stderr[-2000:]
    assert library_noise(done.stdout + done.stderr) == []


def test_serve_console_has_no_library_warnings(settings):
    """``fedstream serve`` imports MLflow and loads the champion (download, our pyfunc flavor): its console
    must carry none of the MLflow / Python warnings and progress bars that path used to print."""
    register(settings, 0.42)  # a real version in a real MLflow store, registered in this process
    promote(settings, NAME)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("FEDSTREAM_", "MLFLOW_", "TF_CPP"))},
           "FEDSTREAM_DATA_DIR": str(settings.data_path), "FEDSTREAM_FEATURE_BITS": str(settings.feature_bits),
           "FEDSTREAM_SERVING__MODEL_NAME": NAME}
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "fedstream", "serve", "--port", str(port)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = _ready(f"http://127.0.0.1:{port}", server)
    finally:
        server.send_signal(signal.SIGTERM)
        _, stderr = server.communicate(timeout=60)
    assert ready, stderr[-2000:]
    assert library_noise(stderr) == [], stderr


def _ready(base: str, server: subprocess.Popen, timeout_s: float = 120) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    return False


def test_a_benchmark_registering_in_process_prints_no_library_warnings(tmp_path):
    """The benchmarks are programs too: ``benchmarks.serving`` registers versions in its own process, where
    MLflow warned that a uv environment has no pip (seen in the serving benchmark's output)."""
    script = ("import benchmarks\nfrom fedstream.settings import load_settings\n"
              "from tests.test_registry_models import register\n"
              f"register(load_settings(data_dir={str(tmp_path / 'data')!r}, feature_bits=16), 0.42)\n"
              "print('registered')\n")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("FEDSTREAM_", "MLFLOW_", "TF_CPP"))},
           "PYTHONPATH": os.getcwd()}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0 and "registered" in done.stdout, done.stderr[-2000:]
    assert library_noise(done.stdout + done.stderr) == []
