"""A sweep's report: ``<sweep dir>/report/`` with ``summaries.csv`` (one row per completed run, exactly its
summary.json), ``cells.csv`` (mean, sd, 95 % Student-t interval and n over seeds per controller × target, and
per β for ``fixed``),
``report.md`` (both tables, the failed jobs with the tail of their logs, the plots) and the plots
``frontier.png`` (tail reward against tail KL), ``kl.png`` and ``beta.png`` (KL and β over training).

Written by the sweep at its end; to rewrite it for any sweep dir: ``python -m kl_research.report <sweep dir>``.
Statistics (intervals, the verdict) belong to :mod:`kl_research.analysis`; this module only lays them out.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from kl_research.analysis import POOL_KEYS, load_configs, load_curves, load_summaries, t_interval

# Per-run metrics of docs/sweeps.md shown in the tables, in this order (those present in the summaries).
METRICS = [
    "reward",
    "kl",
    "tracking_error",
    "in_band",
    "iae",
    "settle_step",
    "overshoot",
    "kl_step2",
    "approx_kl_mean",
    "final_beta",
    "ppl_change",
    "wall_time_s",
]


def cell_table(summaries: pd.DataFrame, configs: pd.DataFrame | None = None) -> pd.DataFrame:
    """Mean, sd, 95 % Student-t interval of the mean and number of seeds of each metric per cell: (controller,
    target) for the controllers that track a target, (fixed, β₀) for ``fixed``, whose target is only logged;
    split by each :data:`kl_research.analysis.POOL_KEYS` setting (``ppo.kl_mode``, ``ppo.kl_penalty``) found in
    ``configs`` (a sweep's :func:`kl_research.analysis.load_configs`), so runs that differ in them are never
    pooled. Columns ``<metric>_mean``, ``<metric>_sd``, ``<metric>_lo``, ``<metric>_hi`` (NaN with one seed),
    ``n``, ``n_seeds``."""
    if summaries.empty:
        return pd.DataFrame()
    df = summaries.copy()
    fixed = df["controller"] == "fixed"
    df["cell_target"] = df["target_kl"].where(~fixed)
    df["cell_beta0"] = df["init_kl_coef"].where(fixed)
    pool = []
    if configs is not None and len(configs) and "run" in configs:
        by_run = configs.set_index("run")
        for k in POOL_KEYS:
            if k in by_run:
                df[k] = df["run"].map(by_run[k].to_dict()).astype(object)
                df[k] = df[k].where(df[k].notna(), "unrecorded")
                pool.append(k)
    metrics = [m for m in METRICS if m in df.columns]
    keys = ["controller", "cell_target", "cell_beta0", *pool]
    rows = []
    for key, g in df.groupby(keys, dropna=False, sort=True):
        row = dict(zip(keys, key, strict=True))
        for m in metrics:
            mean, lo, hi, sd, _ = t_interval(g[m].astype(float))
            row[f"{m}_mean"], row[f"{m}_sd"], row[f"{m}_lo"], row[f"{m}_hi"] = mean, sd, lo, hi
        row["n"] = len(g)
        row["n_seeds"] = g["seed"].nunique() if "seed" in g else len(g)
        rows.append(row)
    cols = [*keys, *(f"{m}_{s}" for m in metrics for s in ("mean", "sd")), "n"]
    cols += [c for c in rows[0] if c not in cols]
    out = pd.DataFrame(rows)[cols]
    return out.rename(columns={"cell_target": "target_kl", "cell_beta0": "init_kl_coef"})


def _fmt(x: object) -> str:
    if isinstance(x, float):
        if math.isnan(x):
            return "—"
        return f"{x:.4g}"
    return "—" if x is None else str(x)


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub markdown table (no extra dependency), numbers to 4 significant digits, NaN as —."""
    if df.empty:
        return "_(none)_\n"
    head = "| " + " | ".join(str(c) for c in df.columns) + " |"
    sep = "|" + "|".join("---" for _ in df.columns) + "|"
    rows = ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, sep, *rows]) + "\n"


def _cells_for_markdown(cells: pd.DataFrame) -> pd.DataFrame:
    """'mean [lo, hi]' (95 % Student-t interval) in one column per metric; the mean alone with one seed."""
    keys = [c for c in ["controller", "target_kl", "init_kl_coef", *POOL_KEYS, "n"] if c in cells]
    out = cells[keys].copy()
    for m in METRICS:
        if f"{m}_mean" in cells:
            out[m] = [
                _fmt(a) if (isinstance(lo, float) and math.isnan(lo)) else f"{_fmt(a)} [{_fmt(lo)}, {_fmt(hi)}]"
                for a, lo, hi in zip(cells[f"{m}_mean"], cells[f"{m}_lo"], cells[f"{m}_hi"], strict=True)
            ]
    return out


def log_tail(run_dir: Path, sweep_dir: Path | None = None, n: int = 25) -> str:
    """The last ``n`` lines of the most telling log of a failed run: its traceback (``error.txt``), else its
    Hydra job log (``*.log``), else submitit's stderr for it (``.submitit/<id>/*_log.err``)."""
    candidates = [run_dir / "error.txt", *sorted(run_dir.glob("*.log"))]
    if sweep_dir is not None and (sweep_dir / "sweep.json").is_file():
        state = json.loads((sweep_dir / "sweep.json").read_text())
        for attempt in reversed(state.get("attempts", [])):
            jid = (attempt.get("submitit_ids") or {}).get(run_dir.name)
            if jid:
                candidates += sorted((sweep_dir / ".submitit" / str(jid)).glob("*_log.err"))
                candidates += sorted((sweep_dir / ".submitit" / str(jid)).glob("*_log.out"))
                break
    for f in candidates:
        if f.is_file() and f.stat().st_size > 0:
            lines = f.read_text(errors="replace").splitlines()[-n:]
            return f"{f.relative_to(sweep_dir) if sweep_dir else f}:\n" + "\n".join(lines)
    return "(no log found)"


def plot_frontier(summaries: pd.DataFrame, path: Path) -> None:
    """Tail reward against tail KL: fixed-β runs joined into the frontier, the other controllers by target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    fixed = summaries[summaries["controller"] == "fixed"]
    if not fixed.empty:
        f = fixed.groupby("init_kl_coef")[["kl", "reward"]].mean().sort_values("kl")
        ax.plot(f["kl"], f["reward"], "k.-", label="fixed β (mean over seeds)")
        for beta, row in f.iterrows():
            xy = (row["kl"], row["reward"])
            ax.annotate(f"β={beta:g}", xy, fontsize=7, xytext=(3, 3), textcoords="offset points")
    markers = dict(zip(["adaptive", "exponential", "pid", "pid_ci"], "o^sD", strict=True))
    others = summaries[summaries["controller"] != "fixed"]
    targets = sorted(others["target_kl"].dropna().unique())
    cmap = plt.get_cmap("viridis")
    for i, t in enumerate(targets):
        ax.axvline(t, color=cmap(i / max(1, len(targets) - 1)), ls=":", lw=0.8)
    for c, g in others.groupby("controller"):
        colors = [cmap(targets.index(t) / max(1, len(targets) - 1)) for t in g["target_kl"]]
        ax.scatter(g["kl"], g["reward"], c=colors, marker=markers.get(str(c), "D"), label=str(c), edgecolors="k")
    unit = summaries["kl_unit"].iloc[0] if "kl_unit" in summaries and len(summaries) else "nats/token"
    ax.set_xscale("log")
    ax.set_xlabel(f"tail KL (exact, {unit}); dotted: targets")
    ax.set_ylabel("tail reward")
    ax.legend(fontsize=8)
    ax.set_title("reward–KL: each point one run")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(curves: pd.DataFrame, key: str, path: Path, log_y: bool = True) -> None:
    """``key`` over steps, mean over seeds: one panel per target, fixed runs (grey) in every panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = sorted(curves.loc[curves["controller"] != "fixed", "target_kl"].dropna().unique()) or [None]
    fig, axes = plt.subplots(1, len(targets), figsize=(3.2 * len(targets), 3), sharey=True, squeeze=False)
    for ax, t in zip(axes[0], targets, strict=True):
        for (c, beta), g in curves[curves["controller"] == "fixed"].groupby(["controller", "init_kl_coef"]):
            m = g.groupby("step")[key].mean()
            ax.plot(m.index, m.values, color="0.6", lw=0.8, label=f"{c} β={beta:g}")
        sub = curves[(curves["controller"] != "fixed") & (curves["target_kl"] == t)]
        for c, g in sub.groupby("controller"):
            m = g.groupby("step")[key].mean()
            ax.plot(m.index, m.values, label=str(c))
        if t is not None and key.startswith("kl/"):
            ax.axhline(t, color="k", ls="--", lw=0.8)
        ax.set_title(f"target {t:g}" if t is not None else "")
        ax.set_xlabel("step")
        if log_y:
            ax.set_yscale("log")
    axes[0][0].set_ylabel(key)
    handles, labels = axes[0][-1].get_legend_handles_labels()
    uniq = dict(zip(labels, handles, strict=True))
    fig.legend(uniq.values(), uniq.keys(), fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ran_on(summaries: pd.DataFrame) -> list[str]:
    """Report lines saying which device and trunk precision the runs had (summary.json's `device`, `precision`;
    runs from before these keys count as "unrecorded"), with a warning when a sweep mixes them: `precision=auto`
    resolves per machine (bf16 on GPUs; on CPUs the faster trunk as measured there), and a sweep spread over machines
    can mix both."""
    keys = [k for k in ("device", "precision") if k in summaries]
    if summaries.empty or not keys:
        return []
    counts = summaries[keys].fillna("unrecorded").astype(str).value_counts(sort=False).sort_index()
    groups = ", ".join(f"{' / '.join(k if isinstance(k, tuple) else (k,))}: {n}" for k, n in counts.items())
    line = f"Runs by {' / '.join(keys)}: {groups}."
    if len(counts) > 1:
        line += (
            " **Mixed**: the bf16 trunk moves the batch KL by ≤ 1.4e-4 nats/token (results/perf.md), small against"
            " the targets, but timings and bit-level trajectories differ between the groups."
        )
    return [line, ""]


def write_report(
    sweep_dir: str | Path, failures: Mapping[str, str] | None = None, jobs: Sequence[str] | None = None
) -> Path:
    """Write ``<sweep dir>/report/`` and return its path. ``jobs``: every job's run-dir name (default: from
    ``sweep.json``); ``failures``: job name → why it failed (default: every job without summary.json)."""
    sweep_dir = Path(sweep_dir)
    out = sweep_dir / "report"
    out.mkdir(exist_ok=True)
    state = json.loads((sweep_dir / "sweep.json").read_text()) if (sweep_dir / "sweep.json").is_file() else {}
    if jobs is None:
        jobs = [j["name"] for j in state.get("jobs", [])]
    summaries = load_summaries(sweep_dir)
    summaries.to_csv(out / "summaries.csv", index=False)
    cells = cell_table(summaries, load_configs(sweep_dir))
    cells.to_csv(out / "cells.csv", index=False)
    complete = set(summaries["run"]) if not summaries.empty else set()
    missing = {j: "no summary.json" for j in jobs if j not in complete}
    failed = {**missing, **{k: v for k, v in (failures or {}).items() if k not in complete}}

    plots = []
    if not summaries.empty and {"kl", "reward"} <= set(summaries.columns):
        plot_frontier(summaries, out / "frontier.png")
        plots.append("frontier.png")
    curves = load_curves(sweep_dir, completed_only=True)
    for key, name in (("kl/exact", "kl.png"), ("kl/coef", "beta.png")):
        if not curves.empty and key in curves.columns:
            plot_curves(curves, key, out / name)
            plots.append(name)

    md = [f"# Sweep report: {state.get('name', sweep_dir.parent.name)}", ""]
    md += [f"Sweep dir: `{sweep_dir}`  ", f"Jobs: {len(jobs)}, complete: {len(complete)}, failed: {len(failed)}", ""]
    if "kl_unit" in summaries:
        md += [f"KL in {', '.join(sorted(set(summaries['kl_unit'].dropna())))}; tail = last steps per run.", ""]
    md += ran_on(summaries)
    cell_md = markdown_table(_cells_for_markdown(cells)) if len(cells) else "_(none)_\n"
    md += ["## Per cell (mean [95 % Student-t interval] over seeds)", "", cell_md]
    cols = [c for c in ["run", "controller", "target_kl", "init_kl_coef", "seed", *METRICS] if c in summaries]
    md += ["## Per run (summary.json)", "", markdown_table(summaries[cols]) if len(summaries) else "_(none)_\n"]
    md += ["## Failed jobs", ""]
    if not failed:
        md += ["None.", ""]
    for name in sorted(failed):
        md += [f"### {name}", "", "```", failed[name].strip(), "", log_tail(sweep_dir / name, sweep_dir), "```", ""]
    if plots:
        md += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    (out / "report.md").write_text("\n".join(md))
    (out / "failed.json").write_text(json.dumps(failed, indent=1))
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m kl_research.report <sweep dir>")
    print(write_report(sys.argv[1]) / "report.md")
