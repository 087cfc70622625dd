"""Figures of a sweep for the notebook and scripts/make_results.py: each function takes the frames of
:mod:`kl_research.analysis` and returns a matplotlib Figure (nothing is computed here but means to draw)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from kl_research.analysis import BAND, UNTARGETED

COLORS = {"fixed": "0.45", "adaptive": "C0", "exponential": "C2", "pid": "C3"}
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


def _mean_band(ax, g: pd.DataFrame, key: str, label: str, color: str, ls: str = "-") -> None:
    """Mean over seeds per step, shaded between the seeds' min and max."""
    g = g.dropna(subset=[key])
    if g.empty:
        return
    s = g.groupby("step")[key].agg(["mean", "min", "max"])
    ax.plot(s.index, s["mean"], color=color, ls=ls, lw=1.3, label=label, marker="o" if len(s) < 12 else None, ms=3)
    if g["run"].nunique() > 1:
        ax.fill_between(s.index, s["min"], s["max"], color=color, alpha=0.15, lw=0)


def curves_by_target(
    curves: pd.DataFrame, keys: Sequence[str] = ("reward/mean", "kl/exact", "kl/coef"), panel: float = 3.2
) -> plt.Figure:
    """One column per target, one row per metric: each controller's mean over seeds (band: seeds' range); the
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
                _mean_band(ax, g, key, f"fixed β={beta:g}", _color("fixed"), styles[k % len(styles)])
            sub = curves[~curves["controller"].isin(UNTARGETED)]
            if t is not None:
                sub = sub[np.isclose(sub["target_kl"].astype(float), t)]
            for c, g in sub.groupby("controller"):
                _mean_band(ax, g, key, str(c), _color(str(c)))
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
                ax.set_xlabel("PPO step (rollout)")
    handles, labels = [], []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, fontsize=8, loc="upper right", ncol=min(4, len(labels)))
    fig.tight_layout(rect=(0, 0, 1, 0.94))
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


def frontier_plot(front: pd.DataFrame, cells: pd.DataFrame) -> plt.Figure:
    """Tail reward against tail KL: the fixed-β frontier (mean and 95 % intervals across seeds, labelled by β)
    and each other controller's cells (one point per target, colour = target), with the targets dotted."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if len(front):
        ax.errorbar(
            front["kl_mean"],
            front["reward_mean"],
            xerr=[front["kl_mean"] - front["kl_lo"], front["kl_hi"] - front["kl_mean"]],
            yerr=[front["reward_mean"] - front["reward_lo"], front["reward_hi"] - front["reward_mean"]],
            fmt="k.-",
            lw=1,
            capsize=2,
            label="fixed β (frontier)",
        )
        for row in front.itertuples():
            ax.annotate(f"β={row.init_kl_coef:g}", (row.kl_mean, row.reward_mean), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")  # fmt: skip
    others = cells[~cells["controller"].isin(UNTARGETED)]
    targets = sorted(others["target_kl"].unique())
    cmap = plt.get_cmap("viridis")

    def tcolor(t: float):
        return cmap(targets.index(t) / max(1, len(targets) - 1))

    for t in targets:
        ax.axvline(t, color=tcolor(t), ls=":", lw=0.8)
    markers = {"adaptive": "o", "exponential": "^", "pid": "s"}
    for c, g in others.groupby("controller"):
        for row in g.itertuples():
            ax.errorbar(
                row.kl_mean,
                row.reward_mean,
                xerr=[[row.kl_mean - row.kl_lo], [row.kl_hi - row.kl_mean]],
                yerr=[[row.reward_mean - row.reward_lo], [row.reward_hi - row.reward_mean]],
                fmt=markers.get(str(c), "D"),
                color=tcolor(row.target_kl),
                mec="k",
                capsize=2,
                lw=0.8,
            )
        ax.plot([], [], markers.get(str(c), "D"), color="w", mec="k", label=str(c))
    kl = pd.concat([front.get("kl_mean", pd.Series(dtype=float)), others["kl_mean"]])
    if (kl > 0).all() and len(kl):
        ax.set_xscale("log")
    ax.set_xlabel("tail KL (exact, nats/token); dotted: targets (colour)")
    ax.set_ylabel("tail reward")
    ax.legend(fontsize=8)
    ax.set_title("reward–KL: cells, mean and 95 % bootstrap interval over seeds")
    fig.tight_layout()
    return fig


def save(fig: plt.Figure, path: str | Path, dpi: int = 120) -> Path:
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return Path(path)
