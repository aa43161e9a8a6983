"""Flower's simulation of our benchmark round (run by the Flower venv's python, never imported by fedstream).

Reads a JSON spec (argv[1]: the merchants' train split directories, bits, learning rate, batch, rounds,
actors), runs ``flwr.simulation.run_simulation`` with one supernode per merchant on Ray (``actors`` client
actors of one CPU each), Flower's ``FedAvg`` (example-count weighted mean, every node in every round, no
evaluation) and a client that trains one local epoch of mini-batch SGD on the merchant's ``.npy`` split
with the same numpy wide model as :mod:`federated.numpy_fedavg` (needs the repository on ``PYTHONPATH``).
Round ``r`` is timed from the strategy's ``configure_train`` to the end of its ``aggregate_train``
(messages out, client work, replies, aggregation); the first round is the warm-up. Prints one JSON line.
"""

from __future__ import annotations

import json
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation

from federated.numpy_fedavg import NumpyWide

SPEC = json.loads(Path(sys.argv[1]).read_text()) if __name__ == "__main__" else {}
TIMES: dict[int, list[float]] = {}


def local_train(message: Message, context: Context) -> Message:
    """One local epoch on this node's merchant split, seeded by (round, partition)."""
    partition = int(context.node_config["partition-id"])
    folder = Path(SPEC["folders"][partition])
    indices, values, labels = (np.load(folder / f"{k}.npy") for k in ("indices", "values", "labels"))
    weights, bias = message.content["arrays"].to_numpy_ndarrays()
    model = NumpyWide(SPEC["bits"], weights.copy(), float(bias[0]))
    rng = np.random.default_rng([int(message.content["config"]["round"]), partition])
    model.sgd_epoch(indices, values, labels, learning_rate=SPEC["lr"], batch_size=SPEC["batch"], rng=rng)
    content = RecordDict({"arrays": ArrayRecord([model.weights, np.array([model.bias], np.float32)]),
                          "metrics": MetricRecord({"num-examples": len(labels)})})
    return Message(content=content, reply_to=message)


class TimedFedAvg(FedAvg):
    """Flower's FedAvg, recording when each round's training starts and when its aggregate is ready."""

    def configure_train(self, server_round, arrays, config, grid):
        TIMES[server_round] = [time.perf_counter()]
        config["round"] = server_round
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        out = super().aggregate_train(server_round, replies)
        TIMES[server_round].append(time.perf_counter())
        return out


def server_main(grid: Grid, context: Context) -> None:
    strategy = TimedFedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=len(SPEC["folders"]),
                           min_train_nodes=len(SPEC["folders"]))
    initial = ArrayRecord([np.zeros(1 << SPEC["bits"], np.float32), np.zeros(1, np.float32)])
    strategy.start(grid=grid, initial_arrays=initial, num_rounds=1 + SPEC["rounds"])


def main() -> int:
    logging.getLogger("flwr").setLevel(logging.WARNING)
    client, server = ClientApp(), ServerApp()
    client.train()(local_train)
    server.main()(server_main)
    actors = SPEC["actors"]
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
               "init_args": {"num_cpus": actors, "num_gpus": 0, "include_dashboard": False}}
    started = time.perf_counter()
    run_simulation(server_app=server, client_app=client, num_supernodes=len(SPEC["folders"]), backend_config=backend)
    rounds = [TIMES[r][1] - TIMES[r][0] for r in sorted(TIMES) if len(TIMES[r]) == 2]
    import flwr

    print(json.dumps({"flwr": flwr.__version__, "merchants": len(SPEC["folders"]), "actors": actors,
                      "warmup_s": rounds[0] if rounds else None, "rounds_s": rounds[1:],
                      "round_s": statistics.median(rounds[1:]) if len(rounds) > 1 else None,
                      "wall_s": time.perf_counter() - started}))
    return 0 if len(rounds) == 1 + SPEC["rounds"] else 1


if __name__ == "__main__":
    sys.exit(main())
