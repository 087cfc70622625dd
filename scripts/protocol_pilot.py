"""Protocol v2's stationarity pilot: which job length puts every hard cell's tail at a steady state?

    python scripts/protocol_pilot.py <pilot sweep dir> [<pilot sweep dir> ...] --out results/protocol/pilot

Reads the rules from conf/analysis/protocol.yaml (stationarity: tail fraction, tolerances, candidate lengths), judges
every pilot run on its prefix of each candidate length (a run of length T is the first T rollouts of a longer one:
nothing in a job depends on its total length), and writes
- stationarity.csv: one row per run × length (halves' mean KL and reward, |log KL ratio|, |Δ reward|, stationary)
- lengths.csv: per cell × length, how many seeds pass, the worst |log ratio| and |Δ reward|
- length.txt: the chosen length and the rule, in words
- pilot.png: KL and reward per cell, the tail halves of every candidate length marked
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the repo this script is in, whatever kl_research an install points at
    sys.path.insert(0, str(REPO))

from kl_research.analysis.protocol import choose_length, load_protocol, stationarity  # noqa: E402
from kl_research.analysis.runs import load_curves  # noqa: E402


def cell_name(row: pd.Series) -> str:
    if row["controller"] == "fixed":
        return f"fixed β {row['init_kl_coef']:g}"
    return f"{row['controller']} @ {row['target_kl']:g}"


def length_table(st: pd.DataFrame) -> pd.DataFrame:
    """Per cell × length: seeds, seeds stationary, worst |log KL ratio| and worst |Δ reward|."""
    st = st.assign(cell=st.apply(cell_name, axis=1))
    return (
        st.groupby(["cell", "length"], sort=True)
        .agg(
            seeds=("seed", "nunique"),
            stationary=("stationary", "sum"),
            worst_kl_log_ratio=("kl_log_ratio", "max"),
            worst_reward_diff=("reward_diff", "max"),
            kl_second_half=("kl_second_half", "mean"),
            reward_slope_per_100=("reward_slope_per_100", "mean"),
            log_kl_slope_per_100=("log_kl_slope_per_100", "mean"),
        )
        .reset_index()
    )


def needed(st: pd.DataFrame, kl_range: tuple[float, float]) -> pd.Series:
    """Runs in the frontier's needed range: targeted runs always; fixed runs whose KL at the longest length lies in
    [kl_range[0], kl_range[1]] (a β whose KL lies outside the range the targets need cannot decide the length)."""
    longest = st[st["length"] == st["length"].max()].groupby("run")["kl_second_half"].mean()
    inside = longest.between(*kl_range)
    return (st["controller"] != "fixed") | st["run"].map(inside).fillna(False).astype(bool)


def plot(curves: pd.DataFrame, lengths: list[int], tail_fraction: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kl_research.plots import save

    first = curves.groupby("run").first()
    names = sorted({cell_name(r) for _, r in first.iterrows()})
    fig, axes = plt.subplots(2, len(names), figsize=(3.2 * len(names), 5.6), sharex=True, squeeze=False)
    for j, name in enumerate(names):
        runs = [r for r, row in first.iterrows() if cell_name(row) == name]
        for run in runs:
            g = curves[curves["run"] == run].sort_values("step")
            seed = g["seed"].iloc[0]
            for i, key in enumerate(("kl/exact", "reward/mean")):
                smooth = g[key].rolling(10, min_periods=1).mean()
                axes[i, j].plot(g["step"], smooth, lw=1, label=f"seed {seed}")
        for length in lengths:
            start = length - max(2, round(tail_fraction * length))
            for i in range(2):
                axes[i, j].axvspan(start, length, color="0.5", alpha=0.06)
                axes[i, j].axvline(length, color="0.6", lw=0.5, ls=":")
        axes[0, j].set_title(name, fontsize=9)
        axes[0, j].set_yscale("log")
        axes[1, j].set_xlabel("rollout")
    axes[0, 0].set_ylabel("exact KL, nats/token (10-rollout mean)")
    axes[1, 0].set_ylabel("reward (10-rollout mean)")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("Stationarity pilot: shaded = the tails (last 25 %) of the candidate job lengths", fontsize=10)
    fig.tight_layout()
    save(fig, path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweeps", nargs="+", help="pilot sweep or run directories")
    ap.add_argument("--out", required=True)
    ap.add_argument("--protocol", default=None, help="protocol YAML (default conf/analysis/protocol.yaml)")
    args = ap.parse_args(argv)
    protocol = load_protocol(args.protocol) if args.protocol else load_protocol()
    rules = protocol["stationarity"]
    curves = pd.concat([load_curves(s, completed_only=True) for s in args.sweeps], ignore_index=True)
    if curves.empty:
        raise SystemExit(f"no completed runs under {args.sweeps}")
    lengths = [int(x) for x in rules["lengths"]]
    st = stationarity(curves, rules, lengths)
    targets = protocol["targets"]
    kl_range = (0.5 * min(targets), 2.0 * max(targets))
    st["needed"] = needed(st, kl_range)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    st.to_csv(out / "stationarity.csv", index=False)
    length_table(st).to_csv(out / "lengths.csv", index=False)
    chosen = choose_length(st[st["needed"]], lengths)
    persistent = choose_length(st[st["needed"]], lengths, persistent=True)
    rule = (
        f"every pilot run in the needed KL range [{kl_range[0]:g}, {kl_range[1]:g}] (targeted runs always; fixed β by "
        f"its KL) stationary: |log(KL 2nd half / 1st half)| ≤ {rules['kl_log_ratio_max']} and |Δ reward| ≤ "
        f"{rules['reward_diff_max']} over the last {rules['tail_fraction']:.0%} of rollouts, on every pilot seed"
    )
    text = (
        f"registered rule: T = {chosen} (the shortest of {lengths} with {rule})\n"
        f"persistent reading: T = {persistent} (the shortest from which every longer candidate passes too)\n"
    )
    (out / "length.txt").write_text(text)
    plot(curves, lengths, rules["tail_fraction"], out / "pilot.png")
    print(length_table(st).to_string(index=False))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
