"""Load a sweep's run dirs into pandas: the library the report and the notebooks read results with.

A sweep dir holds one run dir per job (``<sweep dir>/<job name>/``, see ``hydra_plugins/kl_research_sweeper``),
each with ``.hydra/config.yaml``, ``metrics.jsonl`` (one JSON object per PPO step) and, once the job has
completed, ``summary.json`` (written last by the trainer). Everything here only reads files: it works on a
sweep that is still running, and on a copy of the outputs without the code that made them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

# Columns that identify a run; load_summaries/load_curves put them first.
ID_COLUMNS = ["run", "controller", "target_kl", "init_kl_coef", "seed"]


def run_dirs(sweep_dir: str | Path) -> list[Path]:
    """The run dirs of a sweep (direct subdirs that hold ``.hydra/`` or ``summary.json``), sorted by name."""
    sweep_dir = Path(sweep_dir)
    return sorted(
        d for d in sweep_dir.iterdir() if d.is_dir() and ((d / ".hydra").is_dir() or (d / "summary.json").is_file())
    )


def run_info(run_dir: str | Path) -> dict:
    """The identifying fields of a run: from its summary.json if it completed, else from its config."""
    run_dir = Path(run_dir)
    summary = run_dir / "summary.json"
    if summary.is_file():
        s = json.loads(summary.read_text())
        info = {k: s.get(k) for k in ID_COLUMNS[1:]}
    else:
        info = dict.fromkeys(ID_COLUMNS[1:])
        config = run_dir / ".hydra" / "config.yaml"
        if config.is_file():
            from omegaconf import OmegaConf

            cfg = OmegaConf.load(config)
            info = {
                "controller": OmegaConf.select(cfg, "controller.name"),
                "target_kl": OmegaConf.select(cfg, "controller.target_kl"),
                "init_kl_coef": OmegaConf.select(cfg, "controller.init_kl_coef"),
                "seed": OmegaConf.select(cfg, "seed"),
            }
    return {"run": run_dir.name, **info, "completed": summary.is_file()}


def load_summaries(sweep_dir: str | Path) -> pd.DataFrame:
    """One row per completed run (its ``summary.json``), plus ``run`` (the run dir's name).

    Columns are the summary's keys (RESEARCH.md §5: tail ``reward``, ``kl``, ``tracking_error``, ``in_band``,
    ``iae``, ``final_beta``, ``ppl_final``, ``ppl_ref``, ``ppl_change``, …); the KL unit is in ``kl_unit``.
    Rows are sorted by controller, target, β₀, seed. Empty (with the id columns) if no run completed.
    """
    rows = []
    for d in run_dirs(sweep_dir):
        f = d / "summary.json"
        if f.is_file():
            rows.append({"run": d.name, **json.loads(f.read_text())})
    if not rows:
        return pd.DataFrame(columns=ID_COLUMNS)
    df = pd.DataFrame(rows)
    first = [c for c in ID_COLUMNS if c in df.columns]
    df = df[first + [c for c in df.columns if c not in first]]
    return df.sort_values([c for c in [*ID_COLUMNS[1:], "run"] if c in df.columns], na_position="first").reset_index(
        drop=True
    )


def load_curves(sweep_dir: str | Path, completed_only: bool = False) -> pd.DataFrame:
    """Every run's ``metrics.jsonl`` in long form: one row per (run, step), the metrics as columns, plus the
    id columns and ``completed`` (whether the run has its summary.json). Eval-only keys are NaN on the steps
    without an eval."""
    frames = []
    for d in run_dirs(sweep_dir):
        f = d / "metrics.jsonl"
        if not f.is_file():
            continue
        info = run_info(d)
        if completed_only and not info["completed"]:
            continue
        lines = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        if not lines:
            continue
        frame = pd.DataFrame(lines)
        for k, v in reversed(info.items()):
            frame.insert(0, k, v)
        frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=[*ID_COLUMNS, "completed", "step"])
    return pd.concat(frames, ignore_index=True)
