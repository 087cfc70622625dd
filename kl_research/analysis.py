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
- ``cells`` (:func:`cell_stats`): per (controller, target, β₀, ``ppo.kl_mode``/``ppo.kl_penalty``): mean, sd and
  95 % Student-t interval of the mean across seeds of each metric (:func:`t_interval`; NaN with one seed).
- :func:`frontier` (fixed-β reward against KL), :func:`controllability` (can β reach every target? RESEARCH.md
  §5, first), :func:`estimator_bias` (k1, k2, k3, seed against exact), :func:`verdict` (the seed's claim, per
  target), :func:`hold_band` (does each controller hold [0.5, 2] × target?) and :func:`compare_controllers`
  (pid against adaptive, Welch's t-test per metric).

Runs that differ in ``ppo.kl_mode`` or ``ppo.kl_penalty`` (:data:`POOL_KEYS`) are never pooled: cells split by
them, and every comparison raises on a mix until one setting is selected (``analyse(..., select=...)``).
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
# The band of RESEARCH.md §5: KL in [0.5, 2] × target (in-band fraction, settle step, holding the band), and the
# tighter ±20 % band of the older ``settling_step``.
BAND = (0.5, 2.0)
SETTLE_BAND = 0.2
# A controller holds the band at a target when its tail-KL interval lies inside BAND × target and its mean tail
# in-band fraction is at least this (hold_band).
HOLD_IN_BAND = 0.8
# Controllers that track a target (hold_band).
TARGETED = ("adaptive", "pid", "exponential", "pid_ci")
# The target grid of RESEARCH.md §5 (nats/token) and the controllability checks on the fixed-β frontier: every
# target spanned with this margin on both sides; tail KL at the smallest β at least, at the largest at most.
GRID_TARGETS = (0.01, 0.02, 0.05, 0.1, 0.2)
CONTROL_MARGIN = 2.0
KL_AT_SMALLEST_BETA = 0.3
KL_AT_LARGEST_BETA = 0.007
# Config keys that change what the KL penalty is: runs that differ in them are never pooled or compared.
POOL_KEYS = ("ppo.kl_mode", "ppo.kl_penalty")
UNRECORDED = "unrecorded"  # a POOL_KEYS value for runs whose config lacks the key
# Per-run metrics of score_runs, in table order. Lower is better for reward, in_band and settled excepted.
METRICS = [
    "reward",
    "kl",
    "tracking_error",
    "in_band",
    "iae",
    "settle_step",
    "settled",
    "overshoot",
    "settling_step",
    "kl_step2",
    "approx_kl_mean",
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
def control_metrics(
    kl: Sequence[float] | np.ndarray,
    target: float,
    steps: Sequence[int] | np.ndarray | None = None,
    approx_kl: Sequence[float] | np.ndarray | None = None,
    tail_fraction: float = TAIL_FRACTION,
    band: tuple[float, float] = BAND,
    settle_band: float = SETTLE_BAND,
) -> dict[str, Any]:
    """The control metrics of one run (RESEARCH.md §5) from its per-step KL (``kl/exact``, in step order) and a
    ``target``: the one function behind both a run's summary.json (:func:`kl_research.runlog.summarize`) and
    :func:`score_runs` (which rescores each ``fixed`` run against every target with it). Pure: arrays in, dict out.

    With n steps, step numbers ``steps`` (default 1..n), tail = the last max(1, ⌈tail_fraction·n⌉) steps,
    e_t = |KL_t − target| / target and the band = [band[0], band[1]] × target ([0.5, 2] × target):

    - ``tracking_error``: mean of e_t over the tail (relative, so comparable across targets).
    - ``in_band``: fraction of tail steps with KL_t inside the band (ends included).
    - ``iae``: Σ e_t over *all* steps (integrated absolute error, dt = one rollout; grows with the run length).
    - ``settle_step``: the first step from which KL stays inside the band until the end (every later step in
      band too); NaN if the last step is outside the band. ``settled``: whether it is in band at the last step
      (bool). Step 1 has KL = 0 (the policy starts as its reference), so the earliest possible is step 2.
    - ``overshoot``: max over the steps at and after the first step with KL_t ≥ target of KL_t / target − 1;
      0 if KL never reaches the target.
    - ``settling_step``: the tighter settling of earlier reports, kept for comparison: the first step from
      which e_t ≤ settle_band (±20 %) until the end, censored at last step + 1 if the last step is outside.
    - ``kl_step2``: KL at step 2, the KL the first PPO update produced (rollout 1 is sampled from the
      reference); NaN if the run has no step 2. ``approx_kl_mean``: mean of ``approx_kl`` (the logged
      ``policy/approx_kl``: the per-rollout update size) over the run, NaN if not given. Both are target-free:
      they show whether one rollout's update is small against the smallest target (RESEARCH.md §4).
    """
    kl = np.asarray(kl, dtype=float)
    n = len(kl)
    keys = ["tracking_error", "in_band", "iae", "settle_step", "settled", "overshoot", "settling_step"]
    if n == 0:
        return {**dict.fromkeys(keys, math.nan), "settled": False, "kl_step2": math.nan, "approx_kl_mean": math.nan}
    steps = np.arange(1, n + 1) if steps is None else np.asarray(steps)
    n_tail = max(1, math.ceil(tail_fraction * n))
    rel = np.abs(kl - target) / target
    in_band = (kl >= band[0] * target) & (kl <= band[1] * target)
    settled = bool(in_band[-1])
    if settled:
        outside = np.flatnonzero(~in_band)
        settle_step = float(steps[outside[-1] + 1] if len(outside) else steps[0])
    else:
        settle_step = math.nan
    reached = np.flatnonzero(kl >= target)
    overshoot = float(kl[reached[0] :].max() / target - 1) if len(reached) else 0.0
    tight = rel <= settle_band
    if tight[-1]:
        outside = np.flatnonzero(~tight)
        settling = float(steps[outside[-1] + 1] if len(outside) else steps[0])
    else:
        settling = float(steps[-1] + 1)
    at2 = np.flatnonzero(steps == 2)
    ak = np.asarray(approx_kl, dtype=float) if approx_kl is not None else np.array([])
    ak = ak[~np.isnan(ak)]
    return {
        "tracking_error": float(rel[-n_tail:].mean()),
        "in_band": float(in_band[-n_tail:].mean()),
        "iae": float(rel.sum()),
        "settle_step": settle_step,
        "settled": settled,
        "overshoot": overshoot,
        "settling_step": settling,
        "kl_step2": float(kl[at2[0]]) if len(at2) else math.nan,
        "approx_kl_mean": float(ak.mean()) if len(ak) else math.nan,
    }


track = control_metrics  # the name earlier notebooks used


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
    ``steps`` and :data:`METRICS`. KL is ``kl_key`` (``kl/exact``, RESEARCH.md §5); see :func:`control_metrics`.
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
        approx = g["policy/approx_kl"].to_numpy(float) if "policy/approx_kl" in g else None
        for t in targets if (untracked and targets) else [own]:
            scored = control_metrics(kl, t, g["step"].to_numpy(), approx, tail_fraction=tail_fraction, **track_kw)
            rows.append(
                {**base, "target_kl": t, "logged_target_kl": own, "rescored": bool(untracked), **metrics, **scored}
            )
    df = pd.DataFrame(rows)
    first_cols = [*ID_COLUMNS, "logged_target_kl", "rescored", "steps", *METRICS]
    df = df[first_cols + [c for c in df.columns if c not in first_cols]]
    return df.sort_values(["controller", "target_kl", "init_kl_coef", "seed", "run"]).reset_index(drop=True)


def attach_config(scores: pd.DataFrame, configs: pd.DataFrame, keys: Sequence[str] | None = None) -> pd.DataFrame:
    """``scores`` with the config columns ``keys`` (default :data:`POOL_KEYS`) of each run added from ``configs``
    (:attr:`Sweep.configs`), where the scores do not have them yet (curves loaded with ``config=True`` do). A key
    no run's config has is not added; a run whose config lacks a key others have gets ``"unrecorded"``, so runs
    from before a key existed are never pooled with runs that set it."""
    keys = POOL_KEYS if keys is None else keys
    out = scores.copy()
    by_run = configs.set_index("run") if "run" in configs and len(configs) else pd.DataFrame()
    for k in keys:
        if k not in out and k in by_run:
            out[k] = out["run"].map(by_run[k].to_dict())
        if k in out:
            out[k] = out[k].astype(object).where(out[k].notna(), UNRECORDED)
    return out


def variants(df: pd.DataFrame, keys: Sequence[str] | None = None) -> pd.DataFrame:
    """The distinct combinations of the :data:`POOL_KEYS` columns present in ``df`` (one row each, with ``runs``
    when ``df`` has a ``run`` column); one row and no key column if it has none of them."""
    keys = [k for k in (POOL_KEYS if keys is None else keys) if k in df]
    if not keys:
        return pd.DataFrame([{"runs": df["run"].nunique() if "run" in df else len(df)}])
    if "run" in df:
        return df.groupby(keys, dropna=False)["run"].nunique().rename("runs").reset_index()
    return df[keys].drop_duplicates().reset_index(drop=True)


def require_one_variant(df: pd.DataFrame, what: str) -> None:
    """Raise ValueError if ``df`` mixes runs that differ in a :data:`POOL_KEYS` setting (``ppo.kl_mode``,
    ``ppo.kl_penalty``): no comparison across controllers may pool or mix them. Select one first
    (``analyse(..., select={"ppo.kl_mode": "loss"})``, ``make_results.py --select ppo.kl_mode=loss``)."""
    v = variants(df)
    if len(v) > 1:
        keys = [k for k in POOL_KEYS if k in v]
        listed = "; ".join(
            ", ".join(f"{k}={r[k]}" for k in keys) + (f" ({r['runs']} runs)" if "runs" in r else "")
            for _, r in v.iterrows()
        )
        raise ValueError(
            f"{what}: the runs differ in {', '.join(keys)} ({listed}); they must not be pooled or compared "
            f"as one sweep. Select one, e.g. select={{{keys[0]!r}: {v[keys[0]].iloc[0]!r}}}."
        )


def select_runs(df: pd.DataFrame, select: Mapping[str, Any] | None) -> pd.DataFrame:
    """Rows of ``df`` whose columns equal every ``select`` value (as text: ``"k1"``, ``"loss"``). Raises
    KeyError for a column ``df`` lacks."""
    if not select:
        return df
    mask = pd.Series(True, index=df.index)
    for k, v in select.items():
        if k not in df:
            raise KeyError(f"select: no column {k!r} (have: {', '.join(c for c in df.columns if '.' in c)})")
        mask &= df[k].astype(str) == str(v)
    return df[mask]


# ================================================================================================ statistics
def t_interval(values: Sequence[float] | np.ndarray, level: float = 0.95) -> tuple[float, float, float, float, int]:
    """(mean, lower, upper, sd, n): the mean of the values and its Student-t interval,
    mean ± t_{(1+level)/2, n−1} · sd / √n (sd with ddof = 1). NaNs are dropped first. n < 2: the bounds and sd
    are NaN (one seed has no spread to estimate: no interval is honest); no values: everything NaN, n = 0.

    This replaces the percentile bootstrap of earlier versions: with 3 seeds a bootstrap of the mean returns
    the seeds' minimum and maximum (RESEARCH.md §5), far narrower than the uncertainty of a 3-sample mean."""
    from scipy import stats

    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    n = len(x)
    if n == 0:
        return math.nan, math.nan, math.nan, math.nan, 0
    mean = float(x.mean())
    if n == 1:
        return mean, math.nan, math.nan, math.nan, 1
    sd = float(x.std(ddof=1))
    half = float(stats.t.ppf((1 + level) / 2, n - 1)) * sd / math.sqrt(n)
    return mean, mean - half, mean + half, sd, n


def welch(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, level: float = 0.95) -> dict[str, float]:
    """Welch's t-test of mean(a) − mean(b) (unequal variances) and the difference's Student-t interval with
    Welch–Satterthwaite degrees of freedom: ``diff``, ``lo``, ``hi``, ``df``, ``t``, ``p`` (two-sided). The
    interval excludes 0 exactly when p < 1 − level. NaNs dropped; fewer than 2 values on either side: all NaN
    (``diff`` still given). Both samples constant: p = 0 if the means differ, 1 if not."""
    from scipy import stats

    x = np.asarray(a, dtype=float)
    y = np.asarray(b, dtype=float)
    x, y = x[~np.isnan(x)], y[~np.isnan(y)]
    out = dict.fromkeys(["diff", "lo", "hi", "df", "t", "p"], math.nan)
    if len(x) and len(y):
        out["diff"] = float(x.mean() - y.mean())
    if len(x) < 2 or len(y) < 2:
        return out
    va, vb = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
    se = math.sqrt(va + vb)
    if se == 0:
        p = 0.0 if out["diff"] != 0 else 1.0
        return {
            **out,
            "lo": out["diff"],
            "hi": out["diff"],
            "df": math.inf,
            "t": math.copysign(math.inf, out["diff"]) if p == 0 else 0.0,
            "p": p,
        }
    df = (va + vb) ** 2 / (va**2 / (len(x) - 1) + vb**2 / (len(y) - 1))
    t = out["diff"] / se
    half = float(stats.t.ppf((1 + level) / 2, df)) * se
    return {
        **out,
        "lo": out["diff"] - half,
        "hi": out["diff"] + half,
        "df": float(df),
        "t": float(t),
        "p": float(2 * stats.t.sf(abs(t), df)),
    }


CELL_KEYS = ["controller", "target_kl", "init_kl_coef"]


def _stat_columns(row: dict, prefix: str, values: pd.Series | np.ndarray, level: float) -> None:
    mean, lo, hi, sd, n = t_interval(np.asarray(values, dtype=float), level)
    row[f"{prefix}_mean"], row[f"{prefix}_lo"], row[f"{prefix}_hi"], row[f"{prefix}_sd"], row[f"{prefix}_n"] = (
        mean,
        lo,
        hi,
        sd,
        n,
    )


def _pool_keys(df: pd.DataFrame) -> list[str]:
    return [k for k in POOL_KEYS if k in df.columns]


def cell_stats(
    scores: pd.DataFrame, metrics: Sequence[str] = METRICS, by: Sequence[str] = (), level: float = 0.95
) -> pd.DataFrame:
    """Per cell (controller, target, β₀, each :data:`POOL_KEYS` column present — runs that differ in
    ``ppo.kl_mode`` or ``ppo.kl_penalty`` are never pooled —, and ``by``, e.g. a swept ``ppo.lr``): ``n`` (runs),
    ``n_seeds`` (distinct seeds) and, for each metric, ``<m>_mean``, ``<m>_lo``, ``<m>_hi`` (the 95 % Student-t
    interval of the mean across seeds, :func:`t_interval`; NaN with one seed), ``<m>_sd`` and ``<m>_n`` (seeds
    with a value: ``settle_step`` is NaN for a run that did not settle, so its mean is over the settled runs and
    ``settled_mean`` is the fraction that settled). ``scores`` is :func:`score_runs`' frame, so ``fixed`` has one
    cell per β × target."""
    keys = [*CELL_KEYS, *_pool_keys(scores), *by]
    metrics = [m for m in metrics if m in scores.columns]
    rows = []
    for key, g in scores.groupby(keys, sort=True, dropna=False):
        row = dict(zip(keys, key, strict=True))
        row["n"] = len(g)
        row["n_seeds"] = g["seed"].nunique() if "seed" in g else len(g)
        for m in metrics:
            _stat_columns(row, m, g[m].astype(float), level)
        rows.append(row)
    cols = [*keys, "n", "n_seeds", *(f"{m}_{s}" for m in metrics for s in ("mean", "lo", "hi", "sd", "n"))]
    return pd.DataFrame(rows, columns=cols)


FRONTIER_METRICS = ("reward", "kl", "ppl_change", "kl_step2", "approx_kl_mean")


def frontier(scores: pd.DataFrame, controller: str = "fixed", level: float = 0.95) -> pd.DataFrame:
    """The reward–KL frontier of the fixed-β runs: per β₀ (and :data:`POOL_KEYS` setting), ``n``/``n_seeds`` and
    mean, 95 % Student-t interval and sd across seeds of tail reward, tail KL, Δ perplexity, ``kl_step2`` and
    ``approx_kl_mean`` (the per-rollout update size), plus ``steps`` (the runs' length), sorted by KL. These do
    not depend on the scoring target: each run counts once."""
    runs = scores[scores["controller"] == controller].drop_duplicates("run")
    keys = ["init_kl_coef", *_pool_keys(runs)]
    metrics = [m for m in FRONTIER_METRICS if m in runs]
    rows = []
    for key, g in runs.groupby(keys, sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        row = {**dict(zip(keys, key, strict=True)), "n": len(g), "n_seeds": g["seed"].nunique()}
        row["init_kl_coef"] = float(row["init_kl_coef"])
        row["steps"] = int(g["steps"].max()) if "steps" in g and g["steps"].notna().any() else math.nan
        for m in metrics:
            _stat_columns(row, m, g[m].astype(float), level)
        rows.append(row)
    cols = [*keys, "n", "n_seeds", "steps", *(f"{m}_{s}" for m in metrics for s in ("mean", "lo", "hi", "sd", "n"))]
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


# ========================================================================================== controllability
@dataclass
class Controllability:
    """:func:`controllability`'s answer: ``table`` (one row per β), ``checks`` (one row per check: ``check``,
    ``required``, ``passed``, ``value``, ``rule``), ``spanned`` (the targets spanned with margin), ``text``."""

    table: pd.DataFrame
    checks: pd.DataFrame
    spanned: list[float]
    text: str

    @property
    def passed(self) -> bool:
        """Every required check passed (and there was a frontier to check)."""
        req = self.checks[self.checks["required"]] if len(self.checks) else self.checks
        return bool(len(req)) and bool(req["passed"].fillna(False).astype(bool).all())


def controllability(
    front: pd.DataFrame,
    targets: Sequence[float] | None = None,
    steps: int | None = None,
    margin: float = CONTROL_MARGIN,
    kl_at_smallest_beta: float = KL_AT_SMALLEST_BETA,
    kl_at_largest_beta: float = KL_AT_LARGEST_BETA,
) -> Controllability:
    """RESEARCH.md §5 "First show that the experiment can answer": from the fixed-β frontier (:func:`frontier`),
    per β (ascending) the tail KL and tail reward with their 95 % Student-t intervals, ``kl_step2`` and
    ``approx_kl_mean`` (means over seeds), and these checks, all computed on the means:

    - ``monotone``: tail KL non-increasing in β (every consecutive pair; the violations are listed).
    - ``smallest_beta``: tail KL at the smallest β ≥ ``kl_at_smallest_beta`` (0.3 nats/token).
    - ``largest_beta``: tail KL at the largest β ≤ ``kl_at_largest_beta`` (0.007 nats/token).
    - ``spans <t>`` for each target (default :data:`GRID_TARGETS`): some β with tail KL ≥ margin·t and some β
      with tail KL ≤ t/margin (margin 2: the target lies well inside the range β can reach).
    - ``job_length`` (only with ``steps``, the sweep's job length): every frontier β ran ``steps`` steps.
    - not required, for the reader (RESEARCH.md §4): ``first_update`` (largest mean ``kl_step2`` < smallest
      target: one update moves π by less than the smallest target) and ``update_size`` (largest mean
      ``approx_kl_mean`` < smallest target).

    A frontier with mixed :data:`POOL_KEYS` settings raises ValueError."""
    require_one_variant(front, "controllability")
    targets = sorted(float(t) for t in (GRID_TARGETS if targets is None else targets))
    f = front.sort_values("init_kl_coef").reset_index(drop=True)
    cols = [
        "init_kl_coef",
        "n_seeds",
        "steps",
        "kl_mean",
        "kl_lo",
        "kl_hi",
        "kl_sd",
        "reward_mean",
        "reward_lo",
        "reward_hi",
        "reward_sd",
        "kl_step2_mean",
        "approx_kl_mean_mean",
    ]
    table = f[[c for c in cols if c in f]].copy()
    checks: list[dict] = []

    def check(name: str, passed: Any, value: str, rule: str, required: bool = True) -> None:
        checks.append({"check": name, "required": required, "passed": passed, "value": value, "rule": rule})

    if f.empty:
        text = "No fixed-β runs: the experiment's controllability is not shown (run `python sweep.py sweep=frontier`)."
        return Controllability(
            table, pd.DataFrame(checks, columns=["check", "required", "passed", "value", "rule"]), [], text
        )
    beta, kl = f["init_kl_coef"].to_numpy(float), f["kl_mean"].to_numpy(float)
    bad = [
        f"β {beta[i]:g}→{beta[i + 1]:g}: {kl[i]:.3g}→{kl[i + 1]:.3g}" for i in range(len(f) - 1) if kl[i + 1] > kl[i]
    ]
    check(
        "monotone",
        len(f) >= 2 and not bad,
        "; ".join(bad) or f"{len(f)} β values, no increase",
        "tail KL non-increasing in β (means)",
    )
    check(
        "smallest_beta",
        bool(kl[0] >= kl_at_smallest_beta),
        f"β {beta[0]:g}: {kl[0]:.3g}",
        f"tail KL at the smallest β ≥ {kl_at_smallest_beta:g}",
    )
    check(
        "largest_beta",
        bool(kl[-1] <= kl_at_largest_beta),
        f"β {beta[-1]:g}: {kl[-1]:.3g}",
        f"tail KL at the largest β ≤ {kl_at_largest_beta:g}",
    )
    spanned = []
    for t in targets:
        above, below = beta[kl >= margin * t], beta[kl <= t / margin]
        ok = bool(len(above) and len(below))
        spanned += [t] if ok else []
        value = (
            f"≥{margin:g}×: β {', '.join(f'{b:g}' for b in above) or 'none'}; "
            f"≤{1 / margin:g}×: β {', '.join(f'{b:g}' for b in below) or 'none'}"
        )
        check(f"spans {t:g}", ok, value, f"some β with tail KL ≥ {margin:g}×{t:g} and some with ≤ {t:g}/{margin:g}")
    if steps is not None and "steps" in f:
        short = f[f["steps"] != steps]
        check(
            "job_length",
            short.empty,
            ", ".join(f"β {b:g}: {s:g}" for b, s in zip(short["init_kl_coef"], short["steps"], strict=True))
            or f"all {steps}",
            f"every β ran the sweep's {steps} steps",
        )
    smallest = targets[0] if targets else math.nan
    for name, col, what in (
        ("first_update", "kl_step2_mean", "KL after the first update (step 2)"),
        ("update_size", "approx_kl_mean_mean", "mean approx-KL per rollout"),
    ):
        if col in f and f[col].notna().any():
            worst = float(f[col].max())
            check(
                name,
                bool(worst < smallest),
                f"max over β {worst:.3g}",
                f"{what} < smallest target {smallest:g}",
                required=False,
            )
    checks_df = pd.DataFrame(checks)
    ctl = Controllability(table, checks_df, spanned, "")
    ctl.text = controllability_text(ctl, targets)
    return ctl


def controllability_text(c: Controllability, targets: Sequence[float]) -> str:
    """The controllability checks as sentences, every number from ``c``."""
    t = c.table
    by = c.checks.set_index("check")
    seeds = _seed_range(t["n_seeds"]) if "n_seeds" in t else "?"

    def said(name: str) -> str:
        return "yes" if bool(by.loc[name, "passed"]) else "**no**"

    lines = [
        f"**Controllability of the fixed-β frontier**: {len(t)} β values ({_join(t['init_kl_coef'])}), "
        f"{seeds} seed(s) each, tail KL in nats/token, 95 % Student-t intervals over seeds:",
        f"- tail KL non-increasing in β (means): {said('monotone')} ({by.loc['monotone', 'value']})",
        f"- tail KL at the smallest β ≥ {KL_AT_SMALLEST_BETA:g}: {said('smallest_beta')} "
        f"({by.loc['smallest_beta', 'value']}); at the largest β ≤ {KL_AT_LARGEST_BETA:g}: {said('largest_beta')} "
        f"({by.loc['largest_beta', 'value']})",
    ]
    missed = [x for x in targets if x not in c.spanned]
    req = c.checks[c.checks["required"]] if len(c.checks) else c.checks
    failed = [str(x) for x in req.loc[~req["passed"].fillna(False).astype(bool), "check"]] if len(req) else []
    lines.append(
        f"- targets spanned with a {CONTROL_MARGIN:g}× margin on both sides: {len(c.spanned)}/{len(targets)} "
        f"({_join(c.spanned)}); not spanned: {_join(missed)}"
    )
    if "job_length" in by.index:
        lines.append(
            f"- frontier runs as long as the sweep's jobs: {said('job_length')} ({by.loc['job_length', 'value']})"
        )
    for name in ("first_update", "update_size"):
        if name in by.index:
            lines.append(f"- {by.loc[name, 'rule']}: {said(name)} ({by.loc[name, 'value']})")
    lines.append(
        f"- **the experiment {'can' if c.passed else 'cannot'} answer its question at every target** "
        f"({'every required check passes' if c.passed else 'failed: ' + ', '.join(failed)}); a controller can "
        f"only be judged at a target β can reach with margin: {_join(c.spanned)}."
    )
    return "\n".join(lines)


def _join(values: Iterable[float]) -> str:
    return ", ".join(f"{x:g}" for x in values) or "none"


def _seed_range(n: pd.Series) -> str:
    n = n.dropna()
    if n.empty:
        return "0"
    lo, hi = int(n.min()), int(n.max())
    return f"{lo}" if lo == hi else f"{lo}–{hi}"


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


_EVIDENCE = (
    "reward",
    "tracking_error",
    "kl",
    "in_band",
    "iae",
    "overshoot",
    "settle_step",
    "settled",
    "settling_step",
    "ppl_change",
)


def _evidence(prefix: str, cell: pd.Series | None, cols: Sequence[str]) -> dict[str, float]:
    out = {f"{prefix}n": cell["n"] if cell is not None else 0}
    out[f"{prefix}n_seeds"] = cell.get("n_seeds", cell["n"]) if cell is not None else 0
    for m in cols:
        for s in ("mean", "lo", "hi", "sd"):
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
    keeping KL closer to the target? Computed from :func:`cell_stats`' numbers (95 % Student-t intervals across
    seeds), one row per (target, controller β₀), whichever way it falls:

    - ``reward_similar_or_better``: the controller's mean reward ≥ the lower bound of the static run's 95 %
      interval (inside that interval, or above it).
    - ``kl_closer``: the controller's mean tracking error < the lower bound of the static run's interval (below
      it: lower by more than the static runs' own uncertainty).
    - ``claim_holds``: both.
    - ``on_or_above_frontier`` (only with ``front``, :func:`frontier`, of ≥ 2 β): the controller's mean reward ≥
      the frontier's lower reward bound interpolated at the controller's mean KL; NA outside the frontier.

    A static cell with fewer than 2 seeds has no interval: both tests are False and ``note`` says why. The
    static run (``static_beta``): ``matched`` (the fixed run with the controller's β₀: what one gets without
    control), ``closest`` (the fixed β whose KL is nearest that target: a static β tuned per target, a fair
    but harder baseline; needs a frontier sweep) or a number. Evidence columns: ``<metric>_{mean,lo,hi,sd}`` for
    the controller, ``static_<metric>_…`` for the static run, ``n``/``static_n`` runs, ``note`` when a cell is
    missing (then all booleans are False). Mixed :data:`POOL_KEYS` settings raise ValueError.
    """
    require_one_variant(cells, "verdict")
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
        if s is not None and (math.isnan(row["static_reward_lo"]) or math.isnan(row["static_tracking_error_lo"])):
            note = f"{baseline} cell has {int(row['static_n'])} seed(s): no interval"
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


BAND_EVIDENCE = ("kl", "in_band", "settle_step", "settled", "overshoot", "tracking_error", "reward", "ppl_change")


def hold_band(
    cells: pd.DataFrame, controllers: Sequence[str] = TARGETED, min_in_band: float = HOLD_IN_BAND
) -> pd.DataFrame:
    """Per target and controller (and β₀): does it *hold the band*? Defined as: the 95 % Student-t interval of
    its tail KL across seeds lies inside [0.5, 2] × target (``kl_interval_in_band``) AND the mean tail in-band
    fraction is ≥ ``min_in_band`` (0.8; ``mostly_in_band``). ``holds_band``: both; False with one seed (no
    interval; ``note`` says so). Evidence per cell: ``<m>_{mean,lo,hi,sd}`` for tail KL, in-band fraction, settle
    step (mean over the runs that settled, ``settled_mean`` = the fraction that did), overshoot, tail tracking
    error, reward and Δ perplexity; ``n``, ``n_seeds``. Mixed :data:`POOL_KEYS` settings raise ValueError."""
    require_one_variant(cells, "hold_band")
    rows = []
    sub = cells[cells["controller"].isin(controllers)].sort_values(["target_kl", "controller", "init_kl_coef"])
    for _, c in sub.iterrows():
        t = float(c["target_kl"])
        row: dict[str, Any] = {"target_kl": t, "controller": c["controller"], "init_kl_coef": float(c["init_kl_coef"])}
        row.update(_evidence("", c, BAND_EVIDENCE))
        row["kl_interval_in_band"] = bool(row["kl_lo"] >= BAND[0] * t and row["kl_hi"] <= BAND[1] * t)
        row["mostly_in_band"] = bool(row["in_band_mean"] >= min_in_band)
        row["holds_band"] = row["kl_interval_in_band"] and row["mostly_in_band"]
        row["note"] = "" if not math.isnan(row["kl_lo"]) else f"{int(row['n'])} seed(s): no interval"
        rows.append(row)
    return pd.DataFrame(rows)


COMPARE_METRICS = ("reward", "tracking_error", "in_band", "overshoot", "settle_step", "kl", "iae", "ppl_change")


def compare_controllers(
    scores: pd.DataFrame,
    a: str = "pid",
    b: str = "adaptive",
    metrics: Sequence[str] = COMPARE_METRICS,
    alpha: float = 0.05,
) -> pd.DataFrame:
    """``a`` against ``b`` at each target they share (same β₀), run by run (``scores``, :func:`score_runs`' frame:
    one row per run). Per metric: each side's mean, 95 % Student-t interval and sd (``a_<m>_mean`` …,
    ``b_<m>_…``), the difference a − b with its Welch interval (``diff_<m>``, ``diff_<m>_lo``, ``diff_<m>_hi``)
    and Welch's two-sided p (``p_<m>``), ``significant_<m>`` = p < ``alpha`` (5 %; False when either side has
    fewer than 2 seeds). ``settle_step`` is compared over the runs that settled (``a_settled_mean``: the
    fraction). Booleans, each a significant difference in the direction named:

    - ``equal_reward``: the reward difference is *not* significant (both sides with ≥ 2 seeds);
    - ``lower_tracking_error``, ``lower_overshoot``, ``settles_sooner``: ``a``'s mean is significantly lower;
    - ``a_better_at_equal_reward``: equal reward and lower tracking error.

    ``n_a``, ``n_b``: the seeds on each side. Mixed :data:`POOL_KEYS` settings raise ValueError."""
    if "run" not in scores:
        raise TypeError("compare_controllers takes score_runs' per-run frame (one row per run), not cell_stats'")
    require_one_variant(scores[scores["controller"].isin([a, b])], "compare_controllers")
    metrics = [m for m in metrics if m in scores]
    rows = []
    sa_all, sb_all = scores[scores["controller"] == a], scores[scores["controller"] == b]
    for (t, beta0), ga in sa_all.groupby(["target_kl", "init_kl_coef"], sort=True):
        gb = sb_all[np.isclose(sb_all["target_kl"], t) & np.isclose(sb_all["init_kl_coef"], beta0)]
        row: dict[str, Any] = {
            "target_kl": float(t),
            "a": a,
            "b": b,
            "init_kl_coef": float(beta0),
            "n_a": int(ga["seed"].nunique()),
            "n_b": int(gb["seed"].nunique()),
        }
        for m in [*metrics, "settled"]:
            if m not in scores:
                continue
            for side, g in (("a", ga), ("b", gb)):
                mean, lo, hi, sd, _ = t_interval(g[m].astype(float))
                row[f"{side}_{m}_mean"], row[f"{side}_{m}_lo"], row[f"{side}_{m}_hi"], row[f"{side}_{m}_sd"] = (
                    mean,
                    lo,
                    hi,
                    sd,
                )
            if m == "settled":
                continue
            w = welch(ga[m].astype(float), gb[m].astype(float))
            row[f"diff_{m}"], row[f"diff_{m}_lo"], row[f"diff_{m}_hi"], row[f"p_{m}"] = (
                w["diff"],
                w["lo"],
                w["hi"],
                w["p"],
            )
            row[f"significant_{m}"] = bool(not math.isnan(w["p"]) and w["p"] < alpha)

        def lower(m: str, row: dict = row) -> bool:
            return bool(row.get(f"significant_{m}", False) and row[f"diff_{m}"] < 0)

        ok = len(gb) > 0
        row["equal_reward"] = bool(ok and not math.isnan(row.get("p_reward", math.nan)) and row["p_reward"] >= alpha)
        row["lower_tracking_error"] = lower("tracking_error")
        row["lower_overshoot"] = lower("overshoot")
        row["settles_sooner"] = lower("settle_step")
        row["a_better_at_equal_reward"] = row["equal_reward"] and row["lower_tracking_error"]
        row["note"] = "" if ok else f"no {b} runs"
        rows.append(row)
    return pd.DataFrame(rows)


# ============================================================================================ verdict text
NAMES = {
    "reward": "reward",
    "tracking_error": "tail tracking error",
    "in_band": "tail in-band fraction",
    "overshoot": "overshoot",
    "settle_step": "settle step",
    "kl": "tail KL",
    "iae": "IAE",
    "ppl_change": "Δ perplexity",
}


def _targets(df: pd.DataFrame, mask: pd.Series) -> str:
    return ", ".join(f"{t:g}" for t in df.loc[mask, "target_kl"]) or "none"


def _claim_lines(v: pd.DataFrame) -> list[str]:
    c = v["controller"].iloc[0]
    n = len(v)
    betas = ", ".join(f"{b:g}" for b in sorted(set(v["static_beta"].dropna())))
    lines = [
        f"**{c} vs static β ({betas or 'none'})**, {n} target(s), {_seed_range(v['n_seeds'])} seed(s) per cell "
        f"(static: {_seed_range(v['static_n_seeds'])}), 95 % Student-t intervals over seeds:",
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
    notes = v.loc[v["note"].astype(bool), ["target_kl", "note"]]
    for t, note in notes.itertuples(index=False):
        lines.append(f"- target {t:g}: not decidable ({note})")
    held = int(v["claim_holds"].sum())
    word = "holds" if held == n else "does not hold" if held == 0 else "holds only partly"
    lines.append(f"- **the seed's claim {word}: at {held}/{n} target(s)** (targets: {_targets(v, v['claim_holds'])})")
    return lines


def _band_lines(band: pd.DataFrame) -> list[str]:
    lines = [
        f"**Holding the band**: a controller holds the band at a target when the 95 % Student-t interval of its "
        f"tail KL lies inside [{BAND[0]:g}, {BAND[1]:g}] × target and its mean tail in-band fraction is "
        f"≥ {HOLD_IN_BAND:g}:"
    ]
    for c, g in band.groupby("controller", sort=False):
        n = len(g)
        held = g["holds_band"].astype(bool)
        settled = g["settled_mean"].fillna(0)
        lines.append(
            f"- {c} ({_seed_range(g['n_seeds'])} seed(s)): holds the band at {int(held.sum())}/{n} target(s) "
            f"(targets: {_targets(g, held)}); KL interval inside the band at "
            f"{int(g['kl_interval_in_band'].sum())}/{n}, "
            f"in-band fraction ≥ {HOLD_IN_BAND:g} at {int(g['mostly_in_band'].sum())}/{n}; every seed settled in the "
            f"band at {int((settled >= 1).sum())}/{n} (targets: {_targets(g, settled >= 1)})"
        )
    return lines


def _fmt_p(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.2g}"


def _compare_lines(cmp: pd.DataFrame, alpha: float = 0.05) -> list[str]:
    a, b, m = cmp["a"].iloc[0], cmp["b"].iloc[0], len(cmp)
    seeds = f"{_seed_range(cmp['n_a'])} vs {_seed_range(cmp['n_b'])} seeds"
    lines = [
        f"**{a} vs {b}**, {m} target(s), {seeds} per cell; Welch's t-test per metric, significant at "
        f"{alpha:.0%} (a difference below what {seeds} can resolve is reported as not significant):",
    ]
    metrics = [k for k in NAMES if f"p_{k}" in cmp]
    for _, r in cmp.iterrows():
        sig = [k for k in metrics if r[f"significant_{k}"]]
        if r["note"]:
            lines.append(f"- target {r['target_kl']:g}: not compared ({r['note']})")
            continue
        if math.isnan(r.get("p_reward", math.nan)):
            lines.append(f"- target {r['target_kl']:g}: not tested (fewer than 2 seeds on a side)")
            continue
        parts = [
            f"{NAMES[k]} {'lower' if r[f'diff_{k}'] < 0 else 'higher'} for {a} ({r[f'a_{k}_mean']:.3g} vs "
            f"{r[f'b_{k}_mean']:.3g}, {_fmt_p(r[f'p_{k}'])})"
            for k in sig
        ]
        rest = [NAMES[k] for k in metrics if k not in sig and not math.isnan(r[f"p_{k}"])]
        lines.append(
            f"- target {r['target_kl']:g}: significant: {'; '.join(parts) or 'none'}; not significant: "
            f"{', '.join(rest) or 'none'}"
        )
    lines += [
        f"- equal reward (no significant reward difference): {int(cmp['equal_reward'].sum())}/{m} "
        f"(targets: {_targets(cmp, cmp['equal_reward'])})",
        f"- significantly lower tracking error: {int(cmp['lower_tracking_error'].sum())}/{m} "
        f"(targets: {_targets(cmp, cmp['lower_tracking_error'])}); lower overshoot: "
        f"{int(cmp['lower_overshoot'].sum())}/{m}; settles sooner in the band: {int(cmp['settles_sooner'].sum())}/{m}",
        f"- {a} better at equal reward: {int(cmp['a_better_at_equal_reward'].sum())}/{m} "
        f"(targets: {_targets(cmp, cmp['a_better_at_equal_reward'])})",
    ]
    return lines


def verdict_text(v: pd.DataFrame, cmp: pd.DataFrame | None = None, band: pd.DataFrame | None = None) -> str:
    """The verdict as sentences, every count and number from the frames (:func:`verdict`,
    :func:`compare_controllers`, :func:`hold_band`), whichever way they fall."""
    lines = (
        _claim_lines(v)
        if not v.empty
        else ["No verdict on the seed's claim: the sweep has no cell of the controller (or no static runs)."]
    )
    if band is not None and not band.empty:
        lines += ["", *_band_lines(band)]
    if cmp is not None and not cmp.empty:
        lines += ["", *_compare_lines(cmp)]
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
    controllability: Controllability | None = None
    band: pd.DataFrame | None = None


def analyse(
    sweep: Sweep,
    static_beta: str | float = "matched",
    score: Callable[..., pd.DataFrame] = score_runs,
    select: Mapping[str, Any] | None = None,
    level: float = 0.95,
) -> Analysis:
    """Scores, cells, frontier, controllability, band holding, estimator study, verdicts and their text for a
    loaded sweep. The runs' :data:`POOL_KEYS` settings come from their configs; a sweep that mixes them raises
    ValueError unless ``select`` (e.g. ``{"ppo.kl_mode": "loss"}``) keeps one."""
    scores = select_runs(attach_config(score(sweep.curves), sweep.configs), select)
    require_one_variant(scores, "analyse")
    runs = set(scores["run"])
    curves = sweep.curves[sweep.curves["run"].isin(runs)] if select else sweep.curves
    cells = cell_stats(scores, level=level)
    front = frontier(scores, level=level)
    tracked = scores.loc[~scores["controller"].isin(UNTARGETED)]
    targets = sorted({float(t) for t in tracked["target_kl"].dropna()}) or None
    steps = int(tracked["steps"].max()) if len(tracked) else None
    v = verdict(cells, static_beta=static_beta, front=front if len(front) >= 2 else None)
    cmp = compare_controllers(scores)
    band = hold_band(cells)
    return Analysis(
        sweep=sweep,
        scores=scores,
        cells=cells,
        frontier=front,
        estimators=estimator_bias(curves),
        estimators_by_cell=estimator_bias(curves, by=["controller", "target_kl"]),
        verdict=v,
        pid_vs_adaptive=cmp,
        text=verdict_text(v, cmp, band),
        controllability=controllability(front, targets, steps),
        band=band,
    )
