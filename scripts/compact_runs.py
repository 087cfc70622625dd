"""Copy a finished sweep's runs into a compact dir for results/: per run metrics.jsonl, summary.json, .hydra/*.yaml
and the first few samples of each logged step (kl_research.runlog.compact_run), plus the sweep's sweep.json (its
command lines). Checkpoints, policies and W&B files stay behind. An unfinished run (no summary.json) stops it.

    python scripts/compact_runs.py multirun/kl_grid/<time> results/<name>/runs
    python scripts/compact_runs.py multirun/frontier/<time> results/<name>/frontier_runs --samples 8
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from kl_research.runlog import COMPACT_SAMPLES, compact_run  # noqa: E402


def compact_sweep(sweep_dir: Path, dest: Path, samples_per_step: int = COMPACT_SAMPLES) -> list[Path]:
    """Every run of ``sweep_dir`` (a subdir with ``.hydra/``; the sweep's report/ and .submitit/ are not runs) as a
    compact run under ``dest``, which is emptied first. Returns the compact runs."""
    runs = sorted(d for d in sweep_dir.iterdir() if (d / ".hydra").is_dir())
    unfinished = [d.name for d in runs if not (d / "summary.json").is_file()]
    # a job the sweep launched whose run dir does not exist yet (a sweep stopped right after its launch) is unfinished
    # too: without this, a sweep with no run dirs would compact to an empty dir and enter the analysis as a sweep
    if (sweep_dir / "sweep.json").is_file():
        listed = [j["name"] for j in json.loads((sweep_dir / "sweep.json").read_text()).get("jobs", [])]
        have = {d.name for d in runs}
        unfinished += [name for name in listed if name not in have]
    if not runs and not unfinished:
        raise SystemExit(f"no runs in {sweep_dir}")
    if unfinished:
        raise SystemExit(f"unfinished runs in {sweep_dir} (no summary.json): {', '.join(unfinished)}")
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    if (sweep_dir / "sweep.json").is_file():
        shutil.copyfile(sweep_dir / "sweep.json", dest / "sweep.json")
    return [compact_run(d, dest / d.name, samples_per_step) for d in runs]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep_dir", type=Path, help="a finished sweep dir, e.g. multirun/kl_grid/<time>")
    p.add_argument("dest", type=Path, help="the compact copy, e.g. results/<name>/runs (emptied first)")
    p.add_argument("--samples", type=int, default=COMPACT_SAMPLES, help="samples kept per logged step")
    args = p.parse_args(argv)
    runs = compact_sweep(args.sweep_dir, args.dest, args.samples)
    print(f"{len(runs)} runs -> {args.dest}")


if __name__ == "__main__":
    main()
