"""Federated single-task vs multi-task (purchase head) on the same generated stores: held-out AUCs.

10 generated merchants, 60,000 events with late conversions (median 1 h), stores with [clicked, ordered]
labels (24 h window), 16 bits, 5 FedAvg rounds of all 10 merchants; both models on the same stores (the
single-task one reads the click column). Prints one JSON line. ``python -m benchmarks.federated_multitask``
(a few minutes: TFF).
"""

from __future__ import annotations

import os
import tempfile
import time

from benchmarks import emit


def main() -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow_federated as tff

    from federated.model import ModelConfig, tff_model_fn
    from federated.stores import build_stores
    from federated.training import FederatedConfig, FederatedData, build_evaluation, build_process, run_rounds
    from fedstream.processes import stop_tff_workers
    from streams.generator import GeneratorConfig, generate

    tff.backends.native.set_sync_local_cpp_execution_context()
    events = generate(GeneratorConfig(merchants=10, events=60_000, seed=2, conversion_delay_s=3600.0))
    stores = build_stores(events, tempfile.mkdtemp(), bits=16, attribution_window_s=86_400.0)
    config = FederatedConfig(rounds=5, clients_per_round=10, batch_size=32)
    out = {}
    try:
        for multitask in (False, True):
            model = ModelConfig(bits=16, multitask=multitask)
            started = time.perf_counter()
            process = build_process(tff_model_fn(model), config, model.label_width)
            _, history = run_rounds(process, process.initialize(), FederatedData.from_stores(stores), config,
                                    evaluation=build_evaluation(tff_model_fn(model), model.label_width))
            metrics = history[-1].metrics()
            out["multitask" if multitask else "single"] = {
                k: round(v, 4) for k, v in metrics.items() if k.startswith("eval_")} | {
                "seconds": round(time.perf_counter() - started)}
    finally:
        stop_tff_workers()
    emit("federated_multitask", {"benchmark": "federated_multitask", **out})
    return out


if __name__ == "__main__":
    main()
