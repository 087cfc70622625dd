"""Turn a finished sweep into results/: tables (markdown + CSV), key plots, the verdict, raw per-run summaries,
the exact commands and the versions. Every number comes from kl_research.analysis.

    python scripts/make_results.py                                   # latest sweep under multirun/
    python scripts/make_results.py multirun/kl_grid/<time> --frontier multirun/frontier/<time> --out results
    python scripts/make_results.py --wandb <entity>/kl-research --group kl_grid   # runs logged online
    python scripts/make_results.py <grid> --frontier <frontier> --frontier <static β₀ arm> --out results/smollm2

Writes <out>/: results.md (controllability first), controllability.csv (per β) and controllability_checks.csv,
verdict.{csv,json}, band.csv (does each controller hold the band?), pid_vs_adaptive.csv and, when the sweep has
pid_ci, pid_ci_vs_pid.csv (Welch's t-test per
metric), cells.csv, scores.csv, frontier.csv, estimators.csv, estimators_by_cell.csv, summaries.{csv,json},
frontier.png, curves.png (KL and β per target), controllability.png, training.png (reward, KL, β), ppl.png,
ppl_vs_kl.png, command.txt, versions.json. Intervals: 95 % Student-t of the mean over seeds.

A sweep that mixes ``ppo.kl_mode`` or ``ppo.kl_penalty`` settings is refused (runs that differ in them are
never pooled); ``--select ppo.kl_mode=loss`` (repeatable) analyses one setting.
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
    """'mean [lo, hi]' to 3 significant digits; '—' for a NaN mean; the mean alone without an interval (NaN
    bounds: one seed) or a zero-width one."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "—"
    if lo is None or hi is None or math.isnan(lo) or math.isnan(hi) or (lo == hi == mean):
        return f"{mean:.3g}"
    return f"{mean:.3g} [{lo:.3g}, {hi:.3g}]"


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


def checks_table(c: A.Controllability) -> pd.DataFrame:
    out = c.checks.copy()
    if len(out):
        out["passed"] = out["passed"].map(lambda x: "yes" if bool(x) else "**no**")
        out["required"] = out["required"].map(lambda x: "yes" if x else "no (for the reader)")
    return out


def write_tables(a: A.Analysis, out: Path) -> None:
    """None; writes the analysis's tables to out/ as CSV (the summaries as JSON too)."""
    s = a.sweep
    ctl = a.controllability
    s.summaries.to_csv(out / "summaries.csv", index=False)
    (out / "summaries.json").write_text(s.summaries.to_json(orient="records", indent=1))
    a.scores.to_csv(out / "scores.csv", index=False)
    a.cells.to_csv(out / "cells.csv", index=False)
    a.frontier.to_csv(out / "frontier.csv", index=False)
    ctl.table.to_csv(out / "controllability.csv", index=False)
    ctl.checks.to_csv(out / "controllability_checks.csv", index=False)
    a.estimators.to_csv(out / "estimators.csv", index=False)
    a.estimators_by_cell.to_csv(out / "estimators_by_cell.csv", index=False)
    a.verdict.to_csv(out / "verdict.csv", index=False)
    a.band.to_csv(out / "band.csv", index=False)
    a.pid_vs_adaptive.to_csv(out / "pid_vs_adaptive.csv", index=False)
    if {"pid", "pid_ci"} <= set(a.scores["controller"]):  # the integration rule alone: pid_ci differs from pid in it
        A.compare_controllers(a.scores, a="pid_ci", b="pid").to_csv(out / "pid_ci_vs_pid.csv", index=False)


def verdict_json(a: A.Analysis) -> str:
    """The text of verdict.json: the verdict's and the controllability's text, and the verdict and band rows."""
    ctl = a.controllability
    return json.dumps(
        {
            "text": a.text,
            "controllability": ctl.text,
            "controllable": ctl.passed,
            "rows": json.loads(a.verdict.to_json(orient="records")),
            "band": json.loads(a.band.to_json(orient="records")),
        },
        indent=1,
    )


def write_plots(a: A.Analysis, out: Path) -> list[str]:
    """The names of the figures it wrote to out/ (those the sweep has the data for), in the order written."""
    s = a.sweep
    targets = [float(t) for t in sorted(a.band["target_kl"].unique())] if len(a.band) else list(A.GRID_TARGETS)
    plots = []
    label = P.variant_label(a.scores)  # the algorithm and KL mode, on every figure

    def save(fig, name: str) -> None:
        P.save(fig, out / name, label=label)
        plots.append(name)

    if len(a.frontier) or len(a.cells):
        save(P.frontier_plot(a.frontier, a.cells, targets), "frontier.png")
    if len(s.curves):
        save(P.kl_curves(s.curves), "curves.png")
    if len(a.frontier):
        save(P.controllability_plot(a.controllability.table, targets), "controllability.png")
    if len(s.curves):
        save(P.curves_by_target(s.curves), "training.png")
        save(P.curves_by_target(s.curves, ["eval/ppl_heldout"]), "ppl.png")
        save(P.ppl_vs_kl(s.curves), "ppl_vs_kl.png")
    return plots


def controllability_tab(ctl: A.Controllability) -> pd.DataFrame:
    """Per β of the controllability table: tail KL and reward with intervals, kl_step2 and approx_kl_mean."""
    if not len(ctl.table):
        return pd.DataFrame()
    return (
        ci_table(ctl.table, ["init_kl_coef", "n_seeds", "steps"], ["kl", "reward"])
        .assign(kl_step2=ctl.table["kl_step2_mean"] if "kl_step2_mean" in ctl.table else math.nan)
        .assign(approx_kl_mean=ctl.table.get("approx_kl_mean_mean", math.nan))
    )


def verdict_tab(verdict: pd.DataFrame) -> pd.DataFrame:
    """The verdict per target for the markdown: controller and static reward and tracking error, and the checks."""
    if not len(verdict):
        return pd.DataFrame()
    v_tab = ci_table(verdict, ["target_kl", "controller", "static_beta", "n", "static_n"], ["reward", "tracking_error"])
    for m in ("reward", "tracking_error"):
        v_tab[f"static {m}"] = ci_table(verdict, [], [m], prefix="static_")[m]
    for b in ("reward_similar_or_better", "kl_closer", "on_or_above_frontier", "claim_holds"):
        if b in verdict:
            v_tab[b] = verdict[b].astype(str)
    return v_tab


def band_tab(band: pd.DataFrame) -> pd.DataFrame:
    """The band table for the markdown: each metric with its interval, and holds_band."""
    if not len(band):
        return pd.DataFrame()
    metrics = ["kl", "in_band", "settle_step", "settled", "overshoot", "tracking_error", "reward", "ppl_change"]
    return ci_table(band, ["target_kl", "controller", "n_seeds"], metrics).assign(
        holds_band=band["holds_band"].astype(str)
    )


def comparison_tab(cmp: pd.DataFrame) -> pd.DataFrame:
    """pid vs adaptive for the markdown: each metric's two intervals and their difference with Welch's p."""
    cmp_tab = cmp[["target_kl", "n_a", "n_b"]].copy()
    for m in ["reward", "tracking_error", "in_band", "overshoot", "settle_step"]:
        if f"p_{m}" in cmp:
            cmp_tab[f"pid {m}"] = ci_table(cmp, [], [m], "a_")[m]
            cmp_tab[f"adaptive {m}"] = ci_table(cmp, [], [m], "b_")[m]
            cmp_tab[f"Δ {m} (Welch p)"] = [
                "—" if math.isnan(d) else f"{ci(d, lo, hi)} (p={p:.2g}{', sig.' if sig else ''})"
                for d, lo, hi, p, sig in zip(
                    cmp[f"diff_{m}"],
                    cmp[f"diff_{m}_lo"],
                    cmp[f"diff_{m}_hi"],
                    cmp[f"p_{m}"],
                    cmp[f"significant_{m}"],
                    strict=True,
                )
            ]
    return cmp_tab


def md_controllability(a: A.Analysis) -> list[str]:
    """The markdown lines of the header and section 1 (controllability)."""
    s = a.sweep
    ctl = a.controllability
    ctl_tab = controllability_tab(ctl)
    return [
        "# Results: KL control sweep",
        "",
        f"Source: `{s.source.replace(f'{REPO}/', '')}`  ",  # run dirs inside the repository: relative to its root
        f"Runs: {s.summaries.shape[0]} completed; KL in nats per response token (exact, docs/kl-contract.md); "
        "statistics over the last 25 % of steps; intervals: 95 % Student-t interval of the mean across seeds "
        "(mean ± t₀.₉₇₅,ₙ₋₁·sd/√n; none with one seed).",
        "",
        "## 1. Can the experiment answer? Controllability of the fixed-β frontier (analysis.controllability)",
        "",
        ctl.text,
        "",
        markdown_table(checks_table(ctl)) if len(ctl.checks) else "",
        "Per β: tail KL and tail reward, mean [95 % Student-t interval]; kl_step2 = KL after the first update "
        "(rollout 2), approx_kl_mean = mean approx-KL per rollout (the update size), both means over seeds.",
        "",
        markdown_table(ctl_tab) if len(ctl_tab) else "_(no fixed-β runs)_\n",
    ]


def md_verdict(a: A.Analysis) -> list[str]:
    """The markdown lines of sections 2 (verdict and band) and 3 (pid vs adaptive)."""
    b_tab = band_tab(a.band)
    return [
        "## 2. Verdict (computed, kl_research.analysis.verdict, hold_band, compare_controllers)",
        "",
        a.text,
        "",
        "### The seed's claim, per target",
        "",
        markdown_table(verdict_tab(a.verdict)),
        f"### Holding the band: tail-KL interval inside [{A.BAND[0]:g}, {A.BAND[1]:g}]× target and in-band "
        f"fraction ≥ {A.HOLD_IN_BAND:g}",
        "",
        "settle_step: first rollout from which KL stays in the band, mean over the runs that settled (settled: the "
        "fraction that did); overshoot: max KL/target − 1 after KL first reached the target.",
        "",
        markdown_table(b_tab) if len(b_tab) else "_(no targeted controller cells)_\n",
        "## 3. pid vs adaptive (Welch's t-test per metric, significant at 5 %)",
        "",
        markdown_table(comparison_tab(a.pid_vs_adaptive))
        if len(a.pid_vs_adaptive)
        else "_(no pid and adaptive cells)_\n",
    ]


def md_cells(a: A.Analysis) -> list[str]:
    """The markdown lines of sections 4 (per cell), 5 (fixed-β frontier) and 6 (estimators)."""
    cell_metrics = ["reward", "kl", "tracking_error", "in_band", "settle_step", "settled", "overshoot", "iae",
                    "ppl_change"]  # fmt: skip
    cell_keys = [*[k for k in a.cells.columns if k in A.CELL_KEYS or k in A.POOL_KEYS], "n_seeds"]
    frontier_metrics = ["reward", "kl", "ppl_change", "kl_step2", "approx_kl_mean"]
    return [
        "## 4. Per cell: mean [95 % Student-t interval] over seeds (fixed runs scored against every target)",
        "",
        markdown_table(ci_table(a.cells, cell_keys, cell_metrics)) if len(a.cells) else "_(none)_\n",
        "## 5. Fixed-β frontier",
        "",
        markdown_table(ci_table(a.frontier, ["init_kl_coef", "n_seeds"], frontier_metrics))
        if len(a.frontier)
        else "_(none)_\n",
        "## 6. Estimators against exact (pooled over every step of every run)",
        "",
        markdown_table(a.estimators) if len(a.estimators) else "_(none)_\n",
    ]


def md_provenance(plots: list[str], commands: list[str]) -> list[str]:
    """The markdown lines of the plots and of how the numbers were made (commands, versions, time written)."""
    return [
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


def write_results(a: A.Analysis, out: Path, commands: list[str]) -> Path:
    """The path of results.md, written to out/ with every table, figure, the verdict, the commands and versions."""
    out.mkdir(parents=True, exist_ok=True)
    write_tables(a, out)
    (out / "verdict.json").write_text(verdict_json(a))
    (out / "command.txt").write_text("\n".join(commands) + "\n")
    (out / "versions.json").write_text(json.dumps(versions(), indent=1))
    plots = write_plots(a, out)
    md = [*md_controllability(a), *md_verdict(a), *md_cells(a), *md_provenance(plots, commands)]
    (out / "results.md").write_text("\n".join(md))
    return out / "results.md"


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep_dir", nargs="?", help="sweep dir (default: the latest under multirun/)")
    p.add_argument(
        "--frontier",
        action="append",
        default=[],
        help="a frontier sweep dir (python sweep.py sweep=frontier) to add its fixed runs (repeatable: e.g. a "
        "static-β₀ arm run as its own frontier sweep beside the β grid)",
    )
    p.add_argument("--out", default="results", help="output dir (default: results)")
    p.add_argument(
        "--select",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="keep only runs with this config value, e.g. ppo.kl_mode=loss (repeatable); needed when a sweep "
        "mixes ppo.kl_mode or ppo.kl_penalty settings",
    )
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
    for frontier in args.frontier:
        sweep = A.add_frontier_runs(sweep, A.load_sweep(frontier))
        commands += [f"# frontier: {c}" for c in sweep_commands(Path(frontier))]
    static = args.static_beta if args.static_beta in ("matched", "closest") else float(args.static_beta)
    select = {}
    for item in args.select:
        key, sep, value = item.partition("=")
        if not sep:
            p.error(f"--select {item}: expected KEY=VALUE")
        select[key] = value
    a = A.analyse(sweep, static_beta=static, select=select or None)
    commands.append(shlex.join(["python", "scripts/make_results.py", *(argv if argv is not None else sys.argv[1:])]))
    md = write_results(a, Path(args.out), commands)
    print(a.text)
    print(md)
    return md


if __name__ == "__main__":
    main()
