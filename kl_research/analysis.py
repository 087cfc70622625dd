"""Load a sweep's runs into pandas and compute the statistics of RESEARCH.md §5: the library the report, the
notebook (notebooks/sweep_analysis.ipynb) and scripts/make_results.py read results with.

A sweep dir holds one run dir per job (``<sweep dir>/<job name>/``, see ``hydra_plugins/kl_research_sweeper``),
each with ``.hydra/config.yaml``, ``metrics.jsonl`` (one JSON object per PPO step) and, once the job has
completed, ``summary.json`` (written last by the trainer). Everything here only reads files: it works on a
sweep that is still running, and on a copy of the outputs without the code that made them. Runs logged online
load the same frames from W&B (:func:`load_wandb`).

The frames, from loading to the verdict:

- ``curves`` (:func:`load_curves`): one row per (run, step), the logged metrics as columns (``kl/exact``,
  ``reward/mean``, ``kl/coef``, ``eval/ppl_heldout``, …) and the run's identity (``run``, ``controller``,
  ``target_kl``, ``init_kl_coef``, ``seed``, ``completed``); ``config=True`` adds its whole config as dotted
  columns (``ppo.lr``, ``controller.horizon``, …).
- ``summaries`` (:func:`load_summaries`): one row per completed run, exactly its ``summary.json``.
- ``scores`` (:func:`score_runs`): one row per (run, target it is judged against), every §5 metric recomputed
  from the curve. A ``fixed`` run's β ignores the target, so it is run once per seed (and β) and scored
  against *every* target of the sweep: that row is the static controller at that target.
- ``cells`` (:func:`cell_stats`): per (controller, target, β₀): mean and 95 % percentile-bootstrap interval
  across seeds of each metric.
- :func:`frontier` (fixed-β reward against KL), :func:`estimator_bias` (k1, k2, k3, seed against exact),
  :func:`verdict` (the seed's claim, per target) and :func:`compare_controllers` (pid against adaptive).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kl_research.runlog import TAIL_FRACTION

# Columns that identify a run; load_summaries/load_curves put them first.
ID_COLUMNS = ["run", "controller", "target_kl", "init_kl_coef", "seed"]
# Controllers whose β does not depend on target_kl: scored against every target (RESEARCH.md §5).
UNTARGETED = ("fixed",)
# The in-band range of RESEARCH.md §5 (fraction of tail steps with KL in [0.5, 2] × target) and the settling
# band of compare_controllers (|KL/target − 1| ≤ 0.2).
BAND = (0.5, 2.0)
SETTLE_BAND = 0.2
# Per-run metrics of score_runs, in table order. Lower is better for all but reward and in_band.
METRICS = [
    "reward",
    "kl",
    "tracking_error",
    "in_band",
    "iae",
    "overshoot",
    "settling_step",
    "settled",
    "ppl_change",
    "final_beta",
]
ESTIMATORS = ("k1", "k2", "k3", "seed")


# ============================================================================================ loading: files
def is_run_dir(path: str | Path) -> bool:
    """A run dir holds its own ``metrics.jsonl`` or ``summary.json`` (a sweep dir holds neither)."""
    path = Path(path)
    return (path / "metrics.jsonl").is_file() or (path / "summary.json").is_file()


def run_dirs(sweep_dir: str | Path) -> list[Path]:
    """The run dirs of a sweep (direct subdirs that hold ``.hydra/`` or ``summary.json``), sorted by name.
    A single run dir is its own list."""
    sweep_dir = Path(sweep_dir)
    if is_run_dir(sweep_dir):
        return [sweep_dir]
    return sorted(
        d for d in sweep_dir.iterdir() if d.is_dir() and ((d / ".hydra").is_dir() or (d / "summary.json").is_file())
    )


def latest_sweep(root: str | Path = "multirun") -> Path:
    """The most recently created sweep dir under ``root`` (``<root>/<name>/<time>/sweep.json``; by its
    ``created`` field, then the dir's mtime). Raises FileNotFoundError if there is none."""
    found = []
    for state in Path(root).glob("*/*/sweep.json"):
        try:
            created = json.loads(state.read_text()).get("created", "")
        except (OSError, ValueError):
            created = ""
        found.append((created, state.stat().st_mtime, state.parent))
    if not found:
        raise FileNotFoundError(f"no sweep (*/*/sweep.json) under {Path(root).absolute()}")
    return max(found)[2]


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level of dotted keys; lists as JSON text (a DataFrame cell holds one value).
    W&B's ``{"value": v, "desc": ...}`` wrappers are unwrapped."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and set(v) <= {"value", "desc"} and "value" in v:
            v = v["value"]
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        elif isinstance(v, list | tuple):
            out[key] = json.dumps(list(v))
        else:
            out[key] = v
    return out


def run_config(run_dir: str | Path) -> dict[str, Any]:
    """The run's ``.hydra/config.yaml`` as flat dotted keys (interpolations resolved where they can be)."""
    from omegaconf import OmegaConf

    f = Path(run_dir) / ".hydra" / "config.yaml"
    if not f.is_file():
        return {}
    cfg = OmegaConf.load(f)
    try:
        container = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # e.g. ${hydra:...} outside a Hydra app
        container = OmegaConf.to_container(cfg, resolve=False)
    return flatten(container)


def _ids_from_config(config: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "controller": config.get("controller.name"),
        "target_kl": config.get("controller.target_kl"),
        "init_kl_coef": config.get("controller.init_kl_coef"),
        "seed": config.get("seed"),
    }


def run_info(run_dir: str | Path) -> dict:
    """The identifying fields of a run: from its summary.json if it completed, else from its config."""
    run_dir = Path(run_dir)
    summary = run_dir / "summary.json"
    if summary.is_file():
        s = json.loads(summary.read_text())
        info = {k: s.get(k) for k in ID_COLUMNS[1:]}
    else:
        info = _ids_from_config(run_config(run_dir)) if (run_dir / ".hydra").is_dir() else dict.fromkeys(ID_COLUMNS[1:])
    return {"run": run_dir.name, **info, "completed": summary.is_file()}


def _summaries_frame(rows: list[dict]) -> pd.DataFrame:
    if not rows:
        return pd.DataFrame(columns=ID_COLUMNS)
    df = pd.DataFrame(rows)
    first = [c for c in ID_COLUMNS if c in df.columns]
    df = df[first + [c for c in df.columns if c not in first]]
    return df.sort_values([c for c in [*ID_COLUMNS[1:], "run"] if c in df.columns], na_position="first").reset_index(
        drop=True
    )


def load_summaries(sweep_dir: str | Path) -> pd.DataFrame:
    """One row per completed run (its ``summary.json``), plus ``run`` (the run dir's name).

    Columns are the summary's keys (RESEARCH.md §5: tail ``reward``, ``kl``, ``tracking_error``, ``in_band``,
    ``iae``, ``final_beta``, ``ppl_final``, ``ppl_ref``, ``ppl_change``, …); the KL unit is in ``kl_unit``.
    Rows are sorted by controller, target, β₀, seed. Empty (with the id columns) if no run completed.
    ``sweep_dir`` may also be a single run dir.
    """
    rows = []
    for d in run_dirs(sweep_dir):
        f = d / "summary.json"
        if f.is_file():
            rows.append({"run": d.name, **json.loads(f.read_text())})
    return _summaries_frame(rows)


def _curve_frame(records: list[dict], info: Mapping[str, Any], config: Mapping[str, Any] | None) -> pd.DataFrame:
    frame = pd.DataFrame(records)
    if "step" in frame:  # a resumed W&B run may log a step twice: the last record wins
        frame = frame.drop_duplicates("step", keep="last").sort_values("step").reset_index(drop=True)
    extra = {k: v for k, v in (config or {}).items() if k not in frame.columns and k not in info}
    if extra:
        frame = pd.concat([pd.DataFrame(extra, index=frame.index), frame], axis=1)
    for k, v in reversed(list(info.items())):
        frame.insert(0, k, v)
    return frame


def load_curves(sweep_dir: str | Path, completed_only: bool = False, config: bool = False) -> pd.DataFrame:
    """Every run's ``metrics.jsonl`` in long form: one row per (run, step), the metrics as columns, plus the
    id columns and ``completed`` (whether the run has its summary.json). Eval-only keys are NaN on the steps
    without an eval. ``config=True``: the run's whole config too, as dotted columns (``ppo.lr``, …).
    ``sweep_dir`` may also be a single run dir."""
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
        frames.append(_curve_frame(lines, info, run_config(d) if config else None))
    if not frames:
        return pd.DataFrame(columns=[*ID_COLUMNS, "completed", "step"])
    return pd.concat(frames, ignore_index=True)


def load_configs(sweep_dir: str | Path) -> pd.DataFrame:
    """One row per run: ``run`` and its flattened config (dotted columns)."""
    rows = [{"run": d.name, **run_config(d)} for d in run_dirs(sweep_dir)]
    return pd.DataFrame(rows) if rows else pd.DataFrame(columns=["run"])


@dataclass
class Sweep:
    """A sweep's frames, from files (:func:`load_sweep`) or from W&B (:func:`load_wandb`)."""

    curves: pd.DataFrame  # one row per (run, step)
    summaries: pd.DataFrame  # one row per completed run
    configs: pd.DataFrame  # one row per run, flattened config
    source: str  # the sweep dir, or wandb:<entity/project>/<group>


def load_sweep(sweep_dir: str | Path, completed_only: bool = True) -> Sweep:
    """Curves (completed runs only unless told otherwise), summaries and configs of a sweep dir or run dir."""
    return Sweep(
        curves=load_curves(sweep_dir, completed_only=completed_only),
        summaries=load_summaries(sweep_dir),
        configs=load_configs(sweep_dir),
        source=str(Path(sweep_dir).absolute()),
    )


def add_frontier_runs(sweep: Sweep, frontier_sweep: Sweep) -> Sweep:
    """``sweep`` plus the ``fixed`` runs of a frontier sweep (``python sweep.py sweep=frontier``) whose (β₀, seed)
    it does not already have (the same job would count twice). Their run names get a ``frontier/`` prefix."""

    def fixed_keys(df: pd.DataFrame) -> set:
        f = df[df["controller"] == "fixed"]
        return set(zip(f["init_kl_coef"].astype(float), f["seed"].astype(int), strict=True))

    have = fixed_keys(sweep.curves) if len(sweep.curves) else set()
    fc = frontier_sweep.curves
    fc = fc[fc["controller"] == "fixed"]
    keep = [(b, s) not in have for b, s in zip(fc["init_kl_coef"].astype(float), fc["seed"].astype(int), strict=True)]
    fc = fc[keep].assign(run="frontier/" + fc["run"][keep])
    fs = frontier_sweep.summaries
    fs = fs[fs["controller"] == "fixed"] if len(fs) else fs
    if len(fs):
        fs = fs[["frontier/" + r in set(fc["run"]) for r in fs["run"]]].assign(run=lambda d: "frontier/" + d["run"])
    fg = frontier_sweep.configs
    if len(fg):
        fg = fg[["frontier/" + r in set(fc["run"]) for r in fg["run"]]].assign(run=lambda d: "frontier/" + d["run"])
    return Sweep(
        curves=pd.concat([sweep.curves, fc], ignore_index=True),
        summaries=_summaries_frame(sweep.summaries.to_dict("records") + fs.to_dict("records")),
        configs=pd.concat([sweep.configs, fg], ignore_index=True),
        source=f"{sweep.source} + {frontier_sweep.source}",
    )


# ============================================================================================= loading: W&B
def load_wandb(path: str, group: str, api: Any = None, completed_only: bool = True, config: bool = False) -> Sweep:
    """The same frames for runs logged online: every run of W&B project ``path`` (``entity/project``) in
    ``group`` (a sweep's group is its name, ``conf/sweep.yaml``), through the W&B public API.

    Curves come from ``run.scan_history()`` (every row, unsampled; rows that share a ``step``, e.g. the samples
    table, are merged; ``_``-prefixed and non-scalar values dropped), identity and config from ``run.config``
    (the resolved config the trainer logged), summaries from ``run.summary["summary/<key>"]``. ``completed``:
    the run's state is ``finished`` and it logged its summary. ``run`` is the W&B run name (the job's name).
    ``api``: a ``wandb.Api()`` (or a stand-in with the same ``runs(path, filters=...)``)."""
    if api is None:
        import wandb

        api = wandb.Api()
    frames, summaries, configs = [], [], []
    for r in api.runs(path, filters={"group": group}):
        cfg = flatten(dict(r.config))
        summary = {k.removeprefix("summary/"): v for k, v in dict(r.summary).items() if k.startswith("summary/")}
        completed = getattr(r, "state", "finished") == "finished" and summary.get("status") == "completed"
        if completed_only and not completed:
            continue
        info = {"run": r.name, **_ids_from_config(cfg), "completed": completed}
        configs.append({"run": r.name, **cfg})
        if completed:
            summaries.append({"run": r.name, **summary})
        by_step: dict[Any, dict] = {}
        for row in r.scan_history():
            if row.get("step") is None:
                continue
            rec = by_step.setdefault(row["step"], {})
            for k, v in row.items():
                if k.startswith("_") or not isinstance(v, int | float | bool | str) or v is None:
                    continue
                if isinstance(v, float) and math.isnan(v) and k in rec:
                    continue
                rec[k] = v
        if by_step:
            frames.append(_curve_frame(list(by_step.values()), info, cfg if config else None))
    curves = (
        pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=[*ID_COLUMNS, "completed", "step"])
    )
    return Sweep(
        curves=curves,
        summaries=_summaries_frame(summaries),
        configs=pd.DataFrame(configs) if configs else pd.DataFrame(columns=["run"]),
        source=f"wandb:{path}/{group}",
    )


# ========================================================================================= per-run scoring
def track(
    kl: Sequence[float] | np.ndarray,
    target: float,
    steps: Sequence[int] | np.ndarray | None = None,
    tail_fraction: float = TAIL_FRACTION,
    band: tuple[float, float] = BAND,
    settle_band: float = SETTLE_BAND,
) -> dict[str, float]:
    """How well a KL curve (one value per step, in order) tracks ``target``. The heart of the comparison: a
    ``fixed`` run is scored with this against every target; for a run's own target it equals its summary.json.

    With n steps, tail = the last max(1, ⌈tail_fraction·n⌉) steps and e_t = |KL_t − target| / target:

    - ``tracking_error``: mean of e_t over the tail (RESEARCH.md §5; relative, so comparable across targets).
    - ``in_band``: fraction of tail steps with band[0]·target ≤ KL_t ≤ band[1]·target.
    - ``iae``: Σ e_t over *all* steps (integrated absolute error, dt = one rollout; grows with the run length).
    - ``overshoot``: max_t KL_t / target − 1 over the whole run. Positive: the peak went that far above the
      target; negative: KL never reached the target (−0.3 = the peak stayed 30 % below it).
    - ``settling_step``: the first step s such that every step ≥ s has e_t ≤ settle_band (±20 % by default),
      i.e. KL entered the band and never left it. A run whose last step is outside the band never settled:
      ``settled`` = 0 and ``settling_step`` = last step + 1 (censored at the run's end, so cell means stay
      defined and penalise runs that never settle). Per-step batch KL is noisy: a noisy run settles late.

    ``steps``: the step numbers (default 1..n).
    """
    kl = np.asarray(kl, dtype=float)
    n = len(kl)
    if n == 0:
        return dict.fromkeys(["tracking_error", "in_band", "iae", "overshoot", "settling_step", "settled"], math.nan)
    steps = np.arange(1, n + 1) if steps is None else np.asarray(steps)
    n_tail = max(1, math.ceil(tail_fraction * n))
    rel = np.abs(kl - target) / target
    tail = kl[-n_tail:]
    inside = rel <= settle_band
    if inside[-1]:
        outside = np.flatnonzero(~inside)
        first = outside[-1] + 1 if len(outside) else 0
        settling, settled = float(steps[first]), 1.0
    else:
        settling, settled = float(steps[-1] + 1), 0.0
    return {
        "tracking_error": float(rel[-n_tail:].mean()),
        "in_band": float(np.mean((tail >= band[0] * target) & (tail <= band[1] * target))),
        "iae": float(rel.sum()),
        "overshoot": float(kl.max() / target - 1),
        "settling_step": settling,
        "settled": settled,
    }


def _run_metrics(g: pd.DataFrame, tail_fraction: float) -> dict[str, float]:
    """The target-free metrics of one run's curve (rows sorted by step), as runlog.summarize computes them."""
    n = len(g)
    n_tail = max(1, math.ceil(tail_fraction * n))
    out = {
        "steps": n,
        "reward": float(np.mean(g["reward/mean"].to_numpy(float)[-n_tail:])) if "reward/mean" in g else math.nan,
        "kl": float(np.mean(g["kl/exact"].to_numpy(float)[-n_tail:])),
        "final_beta": float(g["kl/coef_next"].iloc[-1]) if "kl/coef_next" in g else math.nan,
        "ppl_change": math.nan,
    }
    if "eval/ppl_heldout" in g:
        ev = g.dropna(subset=["eval/ppl_heldout"])
        if len(ev):
            out["ppl_change"] = float(ev["eval/ppl_heldout"].iloc[-1] / ev["eval/ppl_ref"].iloc[-1] - 1)
    return out


def score_runs(
    curves: pd.DataFrame,
    targets: Iterable[float] | None = None,
    kl_key: str = "kl/exact",
    tail_fraction: float = TAIL_FRACTION,
    untargeted: Sequence[str] = UNTARGETED,
    **track_kw: Any,
) -> pd.DataFrame:
    """One row per (run, target it is judged against), every metric recomputed from the run's curve.

    A run of a controller that tracks a target is scored against its own ``target_kl`` only. A run of an
    ``untargeted`` controller (``fixed``: β ignores the target) is scored against each of ``targets`` (default:
    every target of the sweep's other runs; its own logged target if there are none, as in a frontier sweep);
    ``logged_target_kl`` keeps the one it logged, ``rescored`` marks the rows against another target.
    Columns: the curve's non-metric columns (id, ``completed``, config), ``target_kl`` (the scoring target),
    ``steps`` and :data:`METRICS`. KL is ``kl_key`` (``kl/exact``, RESEARCH.md §5); see :func:`track`.
    """
    if curves.empty:
        return pd.DataFrame(columns=[*ID_COLUMNS, "logged_target_kl", "rescored", "steps", *METRICS])
    if targets is None:
        tracked = curves.loc[~curves["controller"].isin(untargeted), "target_kl"].dropna()
        targets = sorted({float(t) for t in tracked})
    targets = [float(t) for t in targets]
    keep = [c for c in curves.columns if "/" not in c and c not in ("step", "samples")]
    rows = []
    for _, g in curves.groupby("run", sort=False):
        g = g.sort_values("step")
        first = g.iloc[0]
        own = float(first["target_kl"])
        untracked = first["controller"] in untargeted
        base = {c: first[c] for c in keep}
        metrics = _run_metrics(g, tail_fraction)
        kl = g[kl_key].to_numpy(float)
        for t in targets if (untracked and targets) else [own]:
            scored = track(kl, t, g["step"].to_numpy(), tail_fraction=tail_fraction, **track_kw)
            rows.append(
                {**base, "target_kl": t, "logged_target_kl": own, "rescored": bool(untracked), **metrics, **scored}
            )
    df = pd.DataFrame(rows)
    first_cols = [*ID_COLUMNS, "logged_target_kl", "rescored", "steps", *METRICS]
    df = df[first_cols + [c for c in df.columns if c not in first_cols]]
    return df.sort_values(["controller", "target_kl", "init_kl_coef", "seed", "run"]).reset_index(drop=True)


# ================================================================================================ statistics
def bootstrap_ci(
    values: Sequence[float] | np.ndarray, B: int = 10_000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, lower, upper): the sample mean and its percentile-bootstrap interval. B resamples of the n values
    with replacement (``numpy.random.default_rng(seed)``, so the same sample always gets the same interval);
    the bounds are the (1 − level)/2 and (1 + level)/2 percentiles of the B resample means (numpy's default
    linear interpolation). NaNs are dropped first; no values: all NaN; one value: (x, x, x) — a single seed
    has no spread to resample, which the ``n`` next to every interval shows."""
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    if len(x) == 0:
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    if len(x) == 1:
        return mean, mean, mean
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(B, len(x)))].mean(axis=1)
    lo, hi = np.percentile(means, [50 * (1 - level), 50 * (1 + level)])
    return mean, float(lo), float(hi)


CELL_KEYS = ["controller", "target_kl", "init_kl_coef"]


def cell_stats(
    scores: pd.DataFrame,
    metrics: Sequence[str] = METRICS,
    by: Sequence[str] = (),
    B: int = 10_000,
    level: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """Per cell (controller, target, β₀, and ``by``, e.g. a swept ``ppo.lr``): ``n`` (runs = seeds) and, for each
    metric, ``<m>_mean``, ``<m>_lo``, ``<m>_hi`` (mean and percentile-bootstrap interval across seeds,
    :func:`bootstrap_ci`). ``scores`` is :func:`score_runs`'s frame, so ``fixed`` has one cell per β × target."""
    keys = [*CELL_KEYS, *by]
    metrics = [m for m in metrics if m in scores.columns]
    rows = []
    for key, g in scores.groupby(keys, sort=True, dropna=False):
        row = dict(zip(keys, key, strict=True))
        row["n"] = len(g)
        for m in metrics:
            row[f"{m}_mean"], row[f"{m}_lo"], row[f"{m}_hi"] = bootstrap_ci(g[m], B=B, level=level, seed=seed)
        rows.append(row)
    cols = [*keys, "n", *(f"{m}_{s}" for m in metrics for s in ("mean", "lo", "hi"))]
    return pd.DataFrame(rows, columns=cols)


def frontier(
    scores: pd.DataFrame, controller: str = "fixed", B: int = 10_000, level: float = 0.95, seed: int = 0
) -> pd.DataFrame:
    """The reward–KL frontier of the fixed-β runs: per β₀, tail reward and tail KL (mean and bootstrap interval
    across seeds), sorted by KL. Reward and KL do not depend on the scoring target: each run counts once."""
    runs = scores[scores["controller"] == controller].drop_duplicates("run")
    rows = []
    for beta, g in runs.groupby("init_kl_coef", sort=True):
        row = {"init_kl_coef": float(beta), "n": len(g)}
        for m in ("reward", "kl", "ppl_change"):
            if m in g:
                row[f"{m}_mean"], row[f"{m}_lo"], row[f"{m}_hi"] = bootstrap_ci(g[m], B=B, level=level, seed=seed)
        rows.append(row)
    cols = ["init_kl_coef", "n", *(f"{m}_{s}" for m in ("reward", "kl", "ppl_change") for s in ("mean", "lo", "hi"))]
    df = pd.DataFrame(rows, columns=cols)
    return df.sort_values("kl_mean").reset_index(drop=True)


def frontier_at(front: pd.DataFrame, kl: float, column: str = "reward_mean") -> float:
    """``column`` of the frontier interpolated at ``kl``, linearly in log KL between the two fixed-β points that
    bracket it; NaN outside the frontier's KL range or with fewer than two points (no extrapolation)."""
    f = front.dropna(subset=["kl_mean", column])
    f = f[f["kl_mean"] > 0].sort_values("kl_mean")
    if len(f) < 2 or not (f["kl_mean"].iloc[0] <= kl <= f["kl_mean"].iloc[-1]) or kl <= 0:
        return math.nan
    return float(np.interp(np.log(kl), np.log(f["kl_mean"].to_numpy()), f[column].to_numpy()))


def estimator_bias(
    curves: pd.DataFrame,
    estimators: Sequence[str] = ESTIMATORS,
    reference: str = "exact",
    by: Sequence[str] = (),
) -> pd.DataFrame:
    """Bias and spread of each sampled estimator's batch KL against the exact one, on the logged per-step
    metrics (``kl/<estimator>`` against ``kl/<reference>``: per-token means over each rollout, both on the same
    tokens), pooled over every (run, step), or per group ``by`` (e.g. ``["controller", "target_kl"]``). A fixed
    run counts once. Columns: ``n`` (steps), ``runs``, ``exact_mean``, ``estimate_mean``, ``bias`` = mean of
    (estimate − exact), ``rel_bias`` = bias / mean exact, ``diff_sd`` (sd of the difference across steps: the
    batch-level spread, not the per-token one; steps of a run are correlated), ``rmse``, ``ratio_median``
    (median per-step estimate / exact, over steps with exact > 0)."""
    ref = f"kl/{reference}"
    rows = []
    groups = curves.groupby(list(by), sort=True, dropna=False) if by else [((), curves)]
    for key, g in groups:
        key = key if isinstance(key, tuple) else (key,)
        for e in estimators:
            col = f"kl/{e}"
            if col not in g:
                continue
            sub = g[[col, ref, "run"]].dropna()
            d = sub[col] - sub[ref]
            pos = sub[sub[ref] > 0]
            exact_mean = float(sub[ref].mean())
            rows.append(
                {
                    **dict(zip(by, key, strict=True)),
                    "estimator": e,
                    "n": len(sub),
                    "runs": sub["run"].nunique(),
                    "exact_mean": exact_mean,
                    "estimate_mean": float(sub[col].mean()),
                    "bias": float(d.mean()),
                    "rel_bias": float(d.mean() / exact_mean) if exact_mean else math.nan,
                    "diff_sd": float(d.std(ddof=1)) if len(d) > 1 else math.nan,
                    "rmse": float(np.sqrt((d**2).mean())),
                    "ratio_median": float((pos[col] / pos[ref]).median()) if len(pos) else math.nan,
                }
            )
    return pd.DataFrame(rows)


# =================================================================================================== verdict
def _pick_static(
    cells: pd.DataFrame, target: float, beta0: float, baseline: str, static_beta: str | float
) -> tuple[pd.Series | None, str]:
    """The baseline cell at ``target``: β₀ equal to the controller's (``matched``), the fixed β whose tail KL is
    nearest the target in log ratio (``closest``: a static β tuned for that target), or a given β."""
    cand = cells[(cells["controller"] == baseline) & np.isclose(cells["target_kl"], target)]
    if cand.empty:
        return None, f"no {baseline} runs"
    if static_beta == "matched":
        cand = cand[np.isclose(cand["init_kl_coef"], beta0)]
        if cand.empty:
            return None, f"no {baseline} run with β={beta0:g} (the controller's β₀)"
        return cand.iloc[0], ""
    if static_beta == "closest":
        pos = cand[cand["kl_mean"] > 0]
        if pos.empty:
            return None, "no fixed run with KL > 0"
        return pos.iloc[int(np.argmin(np.abs(np.log(pos["kl_mean"].to_numpy() / target))))], ""
    cand = cand[np.isclose(cand["init_kl_coef"], float(static_beta))]
    return (cand.iloc[0], "") if len(cand) else (None, f"no {baseline} run with β={float(static_beta):g}")


_EVIDENCE = ("reward", "tracking_error", "kl", "in_band", "iae", "overshoot", "settling_step", "ppl_change")


def _evidence(prefix: str, cell: pd.Series | None, cols: Sequence[str]) -> dict[str, float]:
    out = {f"{prefix}n": cell["n"] if cell is not None else 0}
    for m in cols:
        for s in ("mean", "lo", "hi"):
            key = f"{m}_{s}"
            out[f"{prefix}{key}"] = float(cell[key]) if cell is not None and key in cell else math.nan
    return out


def verdict(
    cells: pd.DataFrame,
    controller: str = "adaptive",
    baseline: str = "fixed",
    static_beta: str | float = "matched",
    front: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """The seed's claim, per target: does ``controller`` reach similar or better reward than the static β while
    keeping KL closer to the target? Computed from :func:`cell_stats`' numbers, one row per (target,
    controller β₀), whichever way it falls:

    - ``reward_similar_or_better``: the controller's mean reward ≥ the lower bound of the static run's 95 %
      interval (inside that interval, or above it).
    - ``kl_closer``: the controller's mean tracking error < the lower bound of the static run's interval (below
      it: lower by more than the static runs' own seed-to-seed spread).
    - ``claim_holds``: both.
    - ``on_or_above_frontier`` (only with ``front``, :func:`frontier`, of ≥ 2 β): the controller's mean reward ≥
      the frontier's lower reward bound interpolated at the controller's mean KL; NA outside the frontier.

    The static run (``static_beta``): ``matched`` (the fixed run with the controller's β₀: what one gets without
    control), ``closest`` (the fixed β whose KL is nearest that target: a static β tuned per target, a fair
    but harder baseline; needs a frontier sweep) or a number. Evidence columns: ``<metric>_{mean,lo,hi}`` for
    the controller, ``static_<metric>_…`` for the static run, ``n``/``static_n`` seeds, ``note`` when a cell is
    missing (then all booleans are False).
    """
    rows = []
    ctl = cells[cells["controller"] == controller].sort_values(["target_kl", "init_kl_coef"])
    for _, c in ctl.iterrows():
        t, beta0 = float(c["target_kl"]), float(c["init_kl_coef"])
        s, note = _pick_static(cells, t, beta0, baseline, static_beta)
        row: dict[str, Any] = {
            "target_kl": t,
            "controller": controller,
            "init_kl_coef": beta0,
            "static_beta": float(s["init_kl_coef"]) if s is not None else math.nan,
            **_evidence("", c, _EVIDENCE),
            **_evidence("static_", s, _EVIDENCE),
        }
        ok = s is not None
        row["reward_similar_or_better"] = bool(ok and row["reward_mean"] >= row["static_reward_lo"])
        row["kl_closer"] = bool(ok and row["tracking_error_mean"] < row["static_tracking_error_lo"])
        row["claim_holds"] = row["reward_similar_or_better"] and row["kl_closer"]
        if front is not None:
            lo = frontier_at(front, row["kl_mean"], "reward_lo")
            row["frontier_reward_at_kl"] = frontier_at(front, row["kl_mean"], "reward_mean")
            row["on_or_above_frontier"] = pd.NA if math.isnan(lo) else bool(row["reward_mean"] >= lo)
        row["note"] = note
        rows.append(row)
    return pd.DataFrame(rows)


def compare_controllers(cells: pd.DataFrame, a: str = "pid", b: str = "adaptive") -> pd.DataFrame:
    """``a`` against ``b`` at each target they share (same β₀), from :func:`cell_stats`' numbers:

    - ``equal_reward``: their reward intervals overlap (the comparison below is at equal reward; if False,
      one controller bought its tracking with reward, or lost reward to it);
    - ``lower_tracking_error``, ``lower_overshoot``, ``settles_sooner``: ``a``'s mean is below the lower bound
      of ``b``'s interval for tracking error, overshoot (max KL/target − 1) and settling step (first step after
      which KL stays within ±20 % of the target; runs that never settle count as last step + 1, :func:`track`);
    - ``a_better_at_equal_reward``: equal reward and lower tracking error.

    Evidence: ``<metric>_{mean,lo,hi}`` with prefixes ``a_`` and ``b_``, and ``a_settled_mean`` etc.
    """
    cols = ("reward", "tracking_error", "overshoot", "settling_step", "settled", "kl", "in_band", "ppl_change")
    rows = []
    for _, ca in cells[cells["controller"] == a].sort_values(["target_kl", "init_kl_coef"]).iterrows():
        match = cells[
            (cells["controller"] == b)
            & np.isclose(cells["target_kl"], ca["target_kl"])
            & np.isclose(cells["init_kl_coef"], ca["init_kl_coef"])
        ]
        cb = match.iloc[0] if len(match) else None
        row: dict[str, Any] = {
            "target_kl": float(ca["target_kl"]),
            "a": a,
            "b": b,
            "init_kl_coef": float(ca["init_kl_coef"]),
            **_evidence("a_", ca, cols),
            **_evidence("b_", cb, cols),
        }
        ok = cb is not None
        row["equal_reward"] = bool(
            ok and row["a_reward_lo"] <= row["b_reward_hi"] and row["b_reward_lo"] <= row["a_reward_hi"]
        )
        for name, m in (
            ("lower_tracking_error", "tracking_error"),
            ("lower_overshoot", "overshoot"),
            ("settles_sooner", "settling_step"),
        ):
            row[name] = bool(ok and row[f"a_{m}_mean"] < row[f"b_{m}_lo"])
        row["a_better_at_equal_reward"] = row["equal_reward"] and row["lower_tracking_error"]
        row["note"] = "" if ok else f"no {b} cell"
        rows.append(row)
    return pd.DataFrame(rows)


def _targets(df: pd.DataFrame, mask: pd.Series) -> str:
    return ", ".join(f"{t:g}" for t in df.loc[mask, "target_kl"]) or "none"


def verdict_text(v: pd.DataFrame, cmp: pd.DataFrame | None = None) -> str:
    """The verdict as sentences, every count from the frames (:func:`verdict`, :func:`compare_controllers`)."""
    if v.empty:
        return "No verdict: the sweep has no cell of the controller (or no static runs to compare with)."
    c = v["controller"].iloc[0]
    n = len(v)
    betas = ", ".join(f"{b:g}" for b in sorted(set(v["static_beta"].dropna())))
    seeds = f"{int(v['n'].min())}–{int(v['n'].max())}" if v["n"].min() != v["n"].max() else f"{int(v['n'].min())}"
    lines = [
        f"**{c} vs static β ({betas})**, {n} target(s), {seeds} seed(s) per cell, 95 % bootstrap intervals:",
        f"- reward similar or better (mean ≥ static's lower bound): {int(v['reward_similar_or_better'].sum())}/{n} "
        f"(targets: {_targets(v, v['reward_similar_or_better'])})",
        f"- KL closer to target (tracking error below static's interval): {int(v['kl_closer'].sum())}/{n} "
        f"(targets: {_targets(v, v['kl_closer'])})",
    ]
    if "on_or_above_frontier" in v:
        known = v["on_or_above_frontier"].notna()
        above = v["on_or_above_frontier"].fillna(False).astype(bool)
        lines.append(
            f"- on or above the fixed-β frontier at its KL: {int(above.sum())}/{int(known.sum())} targets inside "
            f"the frontier's KL range (targets: {_targets(v, above)})"
        )
    held = int(v["claim_holds"].sum())
    word = "holds" if held == n else "does not hold" if held == 0 else "holds only partly"
    lines.append(f"- **the seed's claim {word}: at {held}/{n} target(s)** (targets: {_targets(v, v['claim_holds'])})")
    if cmp is not None and not cmp.empty:
        a, b, m = cmp["a"].iloc[0], cmp["b"].iloc[0], len(cmp)
        lines += [
            "",
            f"**{a} vs {b}**, {m} target(s):",
            f"- equal reward (intervals overlap): {int(cmp['equal_reward'].sum())}/{m}",
            f"- lower tracking error: {int(cmp['lower_tracking_error'].sum())}/{m} "
            f"(targets: {_targets(cmp, cmp['lower_tracking_error'])})",
            f"- lower overshoot: {int(cmp['lower_overshoot'].sum())}/{m}; settles sooner (±{SETTLE_BAND:.0%}): "
            f"{int(cmp['settles_sooner'].sum())}/{m}",
            f"- {a} better at equal reward: {int(cmp['a_better_at_equal_reward'].sum())}/{m} "
            f"(targets: {_targets(cmp, cmp['a_better_at_equal_reward'])})",
        ]
    return "\n".join(lines)


@dataclass
class Analysis:
    """Everything the notebook and scripts/make_results.py show, computed once (:func:`analyse`)."""

    sweep: Sweep
    scores: pd.DataFrame
    cells: pd.DataFrame
    frontier: pd.DataFrame
    estimators: pd.DataFrame
    estimators_by_cell: pd.DataFrame
    verdict: pd.DataFrame
    pid_vs_adaptive: pd.DataFrame
    text: str


def analyse(
    sweep: Sweep,
    B: int = 10_000,
    seed: int = 0,
    static_beta: str | float = "matched",
    score: Callable[..., pd.DataFrame] = score_runs,
) -> Analysis:
    """Scores, cells, frontier, estimator study, verdicts and their text for a loaded sweep."""
    scores = score(sweep.curves)
    cells = cell_stats(scores, B=B, seed=seed)
    front = frontier(scores, B=B, seed=seed)
    v = verdict(cells, static_beta=static_beta, front=front if len(front) >= 2 else None)
    cmp = compare_controllers(cells)
    return Analysis(
        sweep=sweep,
        scores=scores,
        cells=cells,
        frontier=front,
        estimators=estimator_bias(sweep.curves),
        estimators_by_cell=estimator_bias(sweep.curves, by=["controller", "target_kl"]),
        verdict=v,
        pid_vs_adaptive=cmp,
        text=verdict_text(v, cmp),
    )
