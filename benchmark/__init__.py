"""Performance tooling (not part of the installed package): run from the repo root, e.g. `python -m benchmark.bench`.

Imports nothing, so `benchmark.bench` and `benchmark.gemm` stay importable from TRL's own venv (bench_trl.py)."""
