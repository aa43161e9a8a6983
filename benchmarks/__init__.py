"""Speed and memory benchmarks, one module per room: ``python -m benchmarks.<room>`` (or all of them with
``python -m benchmarks``). Each prints a human table and then ONE final JSON line of figures;
``BENCH_QUICK=1`` makes each finish within a few minutes."""
