"""Figures of a sweep for the notebook and scripts/make_results.py: each function takes the frames of
:mod:`kl_research.analysis` and returns a matplotlib Figure (nothing is computed here but means to draw)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from kl_research.analysis import BAND, TARGETED, UNTARGETED

COLORS = {"fixed": "0.45", "adaptive": "C0", "exponential": "C2", "pid": "C3", "pid_ci": "C1"}
LABELS = {
    "reward/mean": "reward (batch mean)",
    "kl/exact": "KL exact (nats/token)",
    "kl/coef": "β",
    "eval/ppl_heldout": "held-out perplexity",
}
LOG_Y = {"kl/exact", "kl/coef"}


def _color(controller: str) -> str:
    return COLORS.get(controller, "C4")


def _targets(curves: pd.DataFrame) -> list[float | None]:
    tracked = curves.loc[~curves["controller"].isin(UNTARGETED), "target_kl"].dropna()
    return sorted({float(t) for t in tracked}) or [None]


def _mean_band(ax, g: pd.DataFrame, key: str, label: str, color: str, ls: str = "-", log: bool = False) -> None:
    """Mean over seeds per step, shaded ±1 sd across seeds (sd with ddof 1; on a log axis the lower edge is
    clipped to a tenth of the mean, where mean − sd ≤ 0)."""
    g = g.dropna(subset=[key])
    if g.empty:
        return
    s = g.groupby("step")[key].agg(["mean", "std"])
    ax.plot(s.index, s["mean"], color=color, ls=ls, lw=1.3, label=label, marker="o" if len(s) < 12 else None, ms=3)
    if g["run"].nunique() > 1:
        lo, hi = s["mean"] - s["std"], s["mean"] + s["std"]
        if log:
            lo = lo.where(lo > 0, s["mean"] / 10)
        ax.fill_between(s.index, lo, hi, color=color, alpha=0.15, lw=0)


def _unique_legend(axes) -> tuple[list, list[str]]:
    """One legend entry per label across all panels of a figure (handles, labels)."""
    handles, labels = [], []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    return handles, labels


def curves_by_target(
    curves: pd.DataFrame, keys: Sequence[str] = ("reward/mean", "kl/exact", "kl/coef"), panel: float = 3.2
) -> plt.Figure:
    """One column per target, one row per metric: each controller's mean over seeds (band: ±1 sd); the
    ``fixed`` runs (one line per β) in every column, since their β ignores the target. KL rows show the
    target (dashed) and the [0.5, 2]× band."""
    targets = _targets(curves)
    fig, axes = plt.subplots(
        len(keys), len(targets), figsize=(panel * len(targets), 2.6 * len(keys)), sharex=True, squeeze=False
    )
    for j, t in enumerate(targets):
        for i, key in enumerate(keys):
            ax = axes[i, j]
            if key not in curves:
                ax.set_visible(False)
                continue
            fixed = curves[curves["controller"].isin(UNTARGETED)]
            betas = sorted(fixed["init_kl_coef"].dropna().unique())
            styles = ["-", "--", ":", "-."]
            for k, beta in enumerate(betas):
                g = fixed[fixed["init_kl_coef"] == beta]
                _mean_band(ax, g, key, f"fixed β={beta:g}", _color("fixed"), styles[k % len(styles)], key in LOG_Y)
            sub = curves[~curves["controller"].isin(UNTARGETED)]
            if t is not None:
                sub = sub[np.isclose(sub["target_kl"].astype(float), t)]
            for c, g in sub.groupby("controller"):
                _mean_band(ax, g, key, str(c), _color(str(c)), log=key in LOG_Y)
            if t is not None and key.startswith("kl/") and key != "kl/coef":
                ax.axhline(t, color="k", ls="--", lw=0.9)
                ax.axhspan(BAND[0] * t, BAND[1] * t, color="g", alpha=0.07)
            if key in LOG_Y and (curves[key].dropna() > 0).any():
                ax.set_yscale("log")
            if i == 0:
                ax.set_title(f"target KL {t:g}" if t is not None else "")
            if j == 0:
                ax.set_ylabel(LABELS.get(key, key))
            if i == len(keys) - 1:
                ax.set_xlabel("rollout (one policy update each)")
    handles, labels = _unique_legend(axes)
    fig.legend(handles, labels, fontsize=8, loc="upper right", ncol=min(4, len(labels)))
    fig.suptitle("mean over seeds; shaded: ±1 sd across seeds", x=0.01, ha="left", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    return fig


def _seeds_label(runs: pd.DataFrame) -> str:
    n = runs.groupby([c for c in ("controller", "target_kl", "init_kl_coef") if c in runs])["seed"].nunique()
    lo, hi = (int(n.min()), int(n.max())) if len(n) else (0, 0)
    return f"n = {lo} seeds" if lo == hi else f"n = {lo}–{hi} seeds"


def kl_curves(curves: pd.DataFrame, controllers: Sequence[str] = TARGETED, panel: float = 3.4) -> plt.Figure:
    """curves.png: one column per target. Top row: the exact KL (nats/token, log y) against rollout for each
    controller, the mean across seeds with a shaded ±1 sd band, the target (dashed) and the [0.5, 2]× band
    (green); bottom row: β (log y) the same way. Rollout 1 has KL = 0 (the policy starts as its reference) and
    does not show on the log axis."""
    sub = curves[curves["controller"].isin(controllers)]
    targets = _targets(sub) if len(sub) else [None]
    fig, axes = plt.subplots(2, len(targets), figsize=(panel * len(targets), 6), sharex=True, squeeze=False)
    for j, t in enumerate(targets):
        g_t = sub if t is None else sub[np.isclose(sub["target_kl"].astype(float), t)]
        for i, key in enumerate(("kl/exact", "kl/coef")):
            ax = axes[i, j]
            for c in controllers:
                g = g_t[g_t["controller"] == c]
                if len(g) and key in g:
                    label = f"{c} ({g['seed'].nunique()} seeds): mean ± 1 sd"
                    _mean_band(ax, g[g[key] > 0] if key == "kl/exact" else g, key, label, _color(c), log=True)
            if i == 0 and t is not None:
                ax.axhline(t, color="k", ls="--", lw=0.9, label="target")
                ax.axhspan(BAND[0] * t, BAND[1] * t, color="g", alpha=0.08, label=f"[{BAND[0]:g}, {BAND[1]:g}]× target")
            if (key in g_t and (g_t[key].dropna() > 0).any()) or (i == 0 and t is not None):
                ax.set_yscale("log")
            if i == 0:
                ax.set_title(f"target KL {t:g} nats/token" if t is not None else "")
            else:
                ax.set_xlabel("rollout (one policy update each)")
            if j == 0:
                ax.set_ylabel("KL exact (nats/token)" if i == 0 else "β (kl/coef)")
    handles, labels = _unique_legend(axes)
    # below the top 3 % that save() gives the variant label: with one or two targets the legend spans the width
    fig.legend(
        handles, labels, fontsize=8, loc="upper right", bbox_to_anchor=(1, 0.97), ncol=min(3, max(1, len(labels)))
    )
    fig.tight_layout(rect=(0, 0, 1, 0.87))
    return fig


def ppl_vs_kl(curves: pd.DataFrame) -> plt.Figure:
    """Held-out perplexity (relative to the reference's) against the batch KL of the same step, at every eval
    step of every run: does perplexity drift with KL, and the same way under every controller?"""
    fig, ax = plt.subplots(figsize=(6, 4))
    ev = curves.dropna(subset=["eval/ppl_heldout"]) if "eval/ppl_heldout" in curves else curves.iloc[:0]
    for c, g in ev.groupby("controller"):
        ax.scatter(
            g["kl/exact"], g["eval/ppl_heldout"] / g["eval/ppl_ref"] - 1, s=12, color=_color(str(c)), label=str(c)
        )
    if (ev.get("kl/exact", pd.Series(dtype=float)) > 0).any():
        ax.set_xscale("log")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xlabel("KL exact at that step (nats/token)")
    ax.set_ylabel("held-out ppl / reference ppl − 1")
    ax.legend(fontsize=8)
    ax.set_title("held-out perplexity vs KL (every eval step)")
    fig.tight_layout()
    return fig


def _err(mean, lo, hi):
    """Error-bar lengths from interval bounds; 0 where the bound is NaN (one seed: no interval)."""
    mean, lo, hi = (np.asarray(x, dtype=float) for x in (mean, lo, hi))
    return [np.nan_to_num(mean - lo), np.nan_to_num(hi - mean)]


MARKERS = {"adaptive": "o", "exponential": "^", "pid": "s", "pid_ci": "D"}


def frontier_plot(front: pd.DataFrame, cells: pd.DataFrame, targets: Sequence[float] | None = None) -> plt.Figure:
    """frontier.png: tail reward against tail KL (nats/token, log x). The fixed-β runs (mean and 95 % Student-t
    interval across seeds on both axes, β annotated), each targeted controller's cells overlaid (one marker
    and colour per controller, one point per target, the same error bars), the targets as faint vertical lines.
    The seed counts are in the legend."""
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    others = cells[~cells["controller"].isin(UNTARGETED)] if len(cells) else cells
    targets = sorted(others["target_kl"].unique()) if targets is None and len(others) else list(targets or [])
    for t in targets:
        ax.axvline(t, color="0.5", ls="-", lw=0.6, alpha=0.35)
    if len(front):
        seeds = f"{int(front['n_seeds'].min())}" if "n_seeds" in front else "?"
        if "n_seeds" in front and front["n_seeds"].min() != front["n_seeds"].max():
            seeds += f"–{int(front['n_seeds'].max())}"
        ax.errorbar(
            front["kl_mean"],
            front["reward_mean"],
            xerr=_err(front["kl_mean"], front["kl_lo"], front["kl_hi"]),
            yerr=_err(front["reward_mean"], front["reward_lo"], front["reward_hi"]),
            fmt="k.-",
            lw=1,
            capsize=2,
            label=f"fixed β (frontier), n = {seeds} seeds",
        )
        for row in front.itertuples():
            ax.annotate(
                f"β={row.init_kl_coef:g}",
                (row.kl_mean, row.reward_mean),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    for c, g in others.groupby("controller"):
        seeds = g["n_seeds"] if "n_seeds" in g else g["n"]
        n = f"{int(seeds.min())}" + (f"–{int(seeds.max())}" if seeds.min() != seeds.max() else "")
        ax.errorbar(
            g["kl_mean"],
            g["reward_mean"],
            xerr=_err(g["kl_mean"], g["kl_lo"], g["kl_hi"]),
            yerr=_err(g["reward_mean"], g["reward_lo"], g["reward_hi"]),
            fmt=MARKERS.get(str(c), "D"),
            color=_color(str(c)),
            mec="k",
            capsize=2,
            lw=0.8,
            ls="none",
            label=f"{c}, one point per target, n = {n} seeds",
        )
    kl = pd.concat([front.get("kl_mean", pd.Series(dtype=float)), others.get("kl_mean", pd.Series(dtype=float))])
    if len(kl.dropna()) and (kl.dropna() > 0).all():
        ax.set_xscale("log")
    ax.set_xlabel("tail KL (exact, nats/token); faint vertical lines: targets")
    ax.set_ylabel("tail reward")
    ax.legend(fontsize=8)
    ax.set_title("reward–KL: mean and 95 % Student-t interval over seeds", fontsize=10)
    fig.tight_layout()
    return fig


def controllability_plot(table: pd.DataFrame, targets: Sequence[float]) -> plt.Figure:
    """controllability.png: tail KL (nats/token) against β, log-log, mean and 95 % Student-t interval over
    seeds (a lower bound ≤ 0 is drawn to the axis' bottom), with the targets as horizontal lines and their
    [0.5, 2]× bands: can a fixed β reach every target, with margin?"""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    cmap = plt.get_cmap("viridis")
    for i, t in enumerate(sorted(targets)):
        color = cmap(i / max(1, len(targets) - 1))
        ax.axhline(t, color=color, lw=1, ls="--", label=f"target {t:g}")
    if len(table):
        t = table.sort_values("init_kl_coef")
        mean, lo, hi = (t[c].to_numpy(float) for c in ("kl_mean", "kl_lo", "kl_hi"))
        floor = np.nanmin(mean[mean > 0]) / 10 if (mean > 0).any() else 1e-6
        # a log axis cannot show KL ≤ 0 (a run that never moved can read −1e-8 in fp32): draw such a mean at the
        # floor, and keep each bar's ends on either side of the drawn mean
        mean = np.maximum(mean, floor)
        lo = np.where(np.isnan(lo), mean, np.minimum(np.maximum(lo, floor), mean))
        hi = np.maximum(hi, mean)
        n = t["n_seeds"] if "n_seeds" in t else pd.Series([0])
        seeds = f"{int(n.min())}" + (f"–{int(n.max())}" if n.min() != n.max() else "")
        ax.errorbar(
            t["init_kl_coef"],
            mean,
            yerr=[mean - lo, np.nan_to_num(hi - mean)],
            fmt="ko-",
            capsize=3,
            lw=1,
            ms=4,
            label=f"fixed β: tail KL, n = {seeds} seeds",
        )
        if (t["init_kl_coef"] > 0).all():
            ax.set_xscale("log")
        if (mean > 0).all():
            ax.set_yscale("log")
    ax.set_xlabel("β (fixed)")
    ax.set_ylabel("tail KL (exact, nats/token)")
    ax.set_title("controllability: tail KL vs β, mean and 95 % Student-t interval", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def variant_label(runs: pd.DataFrame) -> str:
    """What the runs are, for a figure's corner: the model, the algorithm and the KL mode (analysis.runs.POOL_KEYS),
    e.g. "SmolLM2-135M-Instruct.Q4_1 · GRPO · KL sequence+exact"; empty where the runs record none of them."""

    def one(key: str) -> str | None:
        vals = runs[key].dropna().astype(str).unique() if key in runs else []
        return vals[0] if len(vals) == 1 else None

    model, algo, mode, penalty = one("model"), one("algo.name"), one("ppo.kl_mode"), one("ppo.kl_penalty")
    parts = [model] if model else []
    if algo:
        parts.append(algo.upper())
    if mode and penalty:
        parts.append(f"KL {mode}+{penalty}")
    return " · ".join(parts)


def panel_grid(n: int, ylabel: str = "", cols: int = 3, width: float = 4.6, height: float = 3.8):
    """(figure, the first n axes) of a grid of at most `cols` panels a row sharing y, `ylabel` on the first column;
    panels past n are hidden. The gold figures draw one panel per proxy size with it."""
    cols = max(1, min(cols, n))
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False, sharey=True)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for row in axes:
        row[0].set_ylabel(ylabel)
    return fig, list(axes.flat[:n])


def save(fig: plt.Figure, path: str | Path, dpi: int = 120, label: str = "") -> Path:
    """Write ``fig`` to ``path``; ``label`` (:func:`variant_label`) goes in its top-left corner."""
    if label and fig.get_suptitle():  # a left-aligned suptitle (curves_by_target) takes it in front
        fig.suptitle(f"{label}; {fig.get_suptitle()}", x=0.01, ha="left", fontsize=9)
    elif label:  # the top-left corner, which the panels' centred titles leave free
        fig.text(0.004, 0.996, label, ha="left", va="top", fontsize=7, color="0.3")
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return Path(path)
