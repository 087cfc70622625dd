"""Turn a finished sweep into results/: tables (markdown + CSV), key plots, the verdict, raw per-run summaries,
the exact commands and the versions. Every number comes from kl_research.analysis.

    python scripts/make_results.py                                   # latest sweep under multirun/
    python scripts/make_results.py multirun/kl_grid/<time> --frontier multirun/frontier/<time> --out results
    python scripts/make_results.py --wandb <entity>/kl-research --group kl_grid   # runs logged online

Writes <out>/: results.md, verdict.{csv,json}, pid_vs_adaptive.csv, cells.csv, scores.csv, frontier.csv,
estimators.csv, estimators_by_cell.csv, summaries.{csv,json}, curves.png, ppl.png, ppl_vs_kl.png, frontier.png,
command.txt, versions.json.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import pandas as pd  # noqa: E402

from kl_research import analysis as A  # noqa: E402
from kl_research import plots as P  # noqa: E402
from kl_research.report import markdown_table  # noqa: E402

PACKAGES = ["torch", "transformers", "tokenizers", "numpy", "pandas", "hydra-core", "omegaconf", "submitit", "wandb"]


def ci(mean: float, lo: float, hi: float) -> str:
    """'mean [lo, hi]' to 3 significant digits; '—' for NaN."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "—"
    return f"{mean:.3g} [{lo:.3g}, {hi:.3g}]" if lo != hi or lo != mean else f"{mean:.3g}"


def ci_table(df: pd.DataFrame, keys: list[str], metrics: list[str], prefix: str = "") -> pd.DataFrame:
    out = df[keys].copy()
    for m in metrics:
        if f"{prefix}{m}_mean" in df:
            out[m] = [
                ci(a, b, c)
                for a, b, c in zip(df[f"{prefix}{m}_mean"], df[f"{prefix}{m}_lo"], df[f"{prefix}{m}_hi"], strict=True)
            ]
    return out


def versions() -> dict:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for p in PACKAGES:
        try:
            out[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            out[p] = None
    try:
        out["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True)
        out["git_dirty"] = bool(dirty.stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        out["git_commit"] = None
    return out


def sweep_commands(sweep_dir: Path | None) -> list[str]:
    """The command line of every attempt of a sweep (its sweep.json), i.e. how its numbers were made."""
    if sweep_dir is None or not (sweep_dir / "sweep.json").is_file():
        return []
    state = json.loads((sweep_dir / "sweep.json").read_text())
    return [shlex.join(["python", *a.get("argv", [])]) for a in state.get("attempts", [])]


def write_results(a: A.Analysis, out: Path, commands: list[str]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    s = a.sweep
    s.summaries.to_csv(out / "summaries.csv", index=False)
    (out / "summaries.json").write_text(s.summaries.to_json(orient="records", indent=1))
    a.scores.to_csv(out / "scores.csv", index=False)
    a.cells.to_csv(out / "cells.csv", index=False)
    a.frontier.to_csv(out / "frontier.csv", index=False)
    a.estimators.to_csv(out / "estimators.csv", index=False)
    a.estimators_by_cell.to_csv(out / "estimators_by_cell.csv", index=False)
    a.verdict.to_csv(out / "verdict.csv", index=False)
    (out / "verdict.json").write_text(
        json.dumps({"text": a.text, "rows": json.loads(a.verdict.to_json(orient="records"))}, indent=1)
    )
    a.pid_vs_adaptive.to_csv(out / "pid_vs_adaptive.csv", index=False)
    (out / "command.txt").write_text("\n".join(commands) + "\n")
    (out / "versions.json").write_text(json.dumps(versions(), indent=1))

    plots = []
    if len(s.curves):
        P.save(P.curves_by_target(s.curves), out / "curves.png")
        P.save(P.curves_by_target(s.curves, ["eval/ppl_heldout"]), out / "ppl.png")
        P.save(P.ppl_vs_kl(s.curves), out / "ppl_vs_kl.png")
        plots += ["curves.png", "ppl.png", "ppl_vs_kl.png"]
    if len(a.cells):
        P.save(P.frontier_plot(a.frontier, a.cells), out / "frontier.png")
        plots.append("frontier.png")

    cmp_metrics = ["reward", "tracking_error", "overshoot", "settling_step"]
    cell_metrics = ["reward", "kl", "tracking_error", "in_band", "iae", "overshoot", "settling_step", "ppl_change"]
    v_keys = ["target_kl", "controller", "static_beta", "n", "static_n"]
    v_tab = ci_table(a.verdict, v_keys, ["reward", "tracking_error"]) if len(a.verdict) else pd.DataFrame()
    if len(a.verdict):
        for m in ("reward", "tracking_error"):
            v_tab[f"static {m}"] = ci_table(a.verdict, [], [m], prefix="static_")[m]
        for b in ("reward_similar_or_better", "kl_closer", "on_or_above_frontier", "claim_holds"):
            if b in a.verdict:
                v_tab[b] = a.verdict[b].astype(str)
    md = [
        "# Results: KL control sweep",
        "",
        f"Source: `{s.source}`  ",
        f"Runs: {s.summaries.shape[0]} completed; KL in nats per response token (exact, RESEARCH.md §2); "
        "statistics over the last 25 % of steps; intervals: 95 % percentile bootstrap across seeds.",
        "",
        "## Verdict (computed, kl_research.analysis.verdict)",
        "",
        a.text,
        "",
        markdown_table(v_tab),
        "## Per cell: mean [95 % interval] over seeds (fixed runs scored against every target)",
        "",
        markdown_table(ci_table(a.cells, [*A.CELL_KEYS, "n"], cell_metrics)) if len(a.cells) else "_(none)_\n",
        "## pid vs adaptive",
        "",
        markdown_table(
            a.pid_vs_adaptive[["target_kl"]]
            .join(ci_table(a.pid_vs_adaptive, [], cmp_metrics, "a_").add_prefix("pid "))
            .join(ci_table(a.pid_vs_adaptive, [], cmp_metrics, "b_").add_prefix("adaptive "))
            .assign(
                equal_reward=a.pid_vs_adaptive["equal_reward"].astype(str),
                pid_better_at_equal_reward=a.pid_vs_adaptive["a_better_at_equal_reward"].astype(str),
            )
        )
        if len(a.pid_vs_adaptive)
        else "_(no pid and adaptive cells)_\n",
        "## Fixed-β frontier",
        "",
        markdown_table(ci_table(a.frontier, ["init_kl_coef", "n"], ["reward", "kl", "ppl_change"]))
        if len(a.frontier)
        else "_(none)_\n",
        "## Estimators against exact (pooled over every step of every run)",
        "",
        markdown_table(a.estimators) if len(a.estimators) else "_(none)_\n",
        "## Plots",
        "",
        *[f"![{p}]({p})" for p in plots],
        "",
        "## How these numbers were made",
        "",
        "```",
        *commands,
        "```",
        "",
        f"Versions: see versions.json. Written {time.strftime('%Y-%m-%d %H:%M:%S')}.",
        "",
    ]
    (out / "results.md").write_text("\n".join(md))
    return out / "results.md"


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep_dir", nargs="?", help="sweep dir (default: the latest under multirun/)")
    p.add_argument("--frontier", help="a frontier sweep dir (python sweep.py sweep=frontier) to add its fixed runs")
    p.add_argument("--out", default="results", help="output dir (default: results)")
    p.add_argument("--B", type=int, default=10_000, help="bootstrap resamples (default 10000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap RNG seed (default 0)")
    p.add_argument("--static-beta", default="matched", help="matched | closest | a β (see analysis.verdict)")
    p.add_argument("--wandb", help="entity/project: load the runs from W&B instead of a sweep dir")
    p.add_argument("--group", help="W&B group (the sweep's name) with --wandb")
    args = p.parse_args(argv)

    sweep_dir = None
    if args.wandb:
        if not args.group:
            p.error("--wandb needs --group")
        sweep = A.load_wandb(args.wandb, args.group)
    else:
        sweep_dir = Path(args.sweep_dir) if args.sweep_dir else A.latest_sweep(REPO / "multirun")
        sweep = A.load_sweep(sweep_dir)
    commands = [f"# sweep: {c}" for c in sweep_commands(sweep_dir)]
    if args.frontier:
        sweep = A.add_frontier_runs(sweep, A.load_sweep(args.frontier))
        commands += [f"# frontier: {c}" for c in sweep_commands(Path(args.frontier))]
    static = args.static_beta if args.static_beta in ("matched", "closest") else float(args.static_beta)
    a = A.analyse(sweep, B=args.B, seed=args.seed, static_beta=static)
    commands.append(shlex.join(["python", "scripts/make_results.py", *(argv if argv is not None else sys.argv[1:])]))
    md = write_results(a, Path(args.out), commands)
    print(a.text)
    print(md)
    return md


if __name__ == "__main__":
    main()
