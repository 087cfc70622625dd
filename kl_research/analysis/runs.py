"""Loading a sweep's runs (run dirs on disk, or W&B) into pandas frames, and the config keys that decide which runs may
be pooled (:data:`POOL_KEYS`): attach them, list the variants, select one.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

# Columns that identify a run; load_summaries/load_curves put them first.
ID_COLUMNS = ["run", "controller", "target_kl", "init_kl_coef", "seed"]
# Config keys that change what is being compared: runs that differ in them are never pooled or compared. algo.name
# (ppo | grpo) first, then what the KL penalty is.
POOL_KEYS = ("model", "algo.name", "ppo.kl_mode", "ppo.kl_penalty")  # "model": model_id(), derived from model.*
UNRECORDED = "unrecorded"  # a POOL_KEYS value for runs whose config lacks the key
# ... except where the value such a run had is known: every run from before the algo group was PPO.
KEY_DEFAULTS = {"algo.name": "ppo"}


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
    return with_model_id(flatten(container))


def model_id(cfg: Mapping[str, Any]) -> str | None:
    """Which model a run fine-tuned, from its flat config: ``tiny`` (the embedded reference), a pretrained model's
    hub id or directory name (``model.path``: gpt2, pythia-70m), a packaged GGUF's file stem (``model.gguf_file``:
    SmolLM2-135M-Instruct.Q4_1); None for a config without ``model.name``. Runs of two models are never pooled
    (:data:`POOL_KEYS`), and figures name the model."""
    name = cfg.get("model.name")
    if name is None:
        return None
    source = {"pretrained": cfg.get("model.path"), "gguf": cfg.get("model.gguf_file")}.get(str(name))
    if not source:
        return str(name)
    path = Path(str(source).rstrip("/"))
    return path.stem if str(name) == "gguf" else path.name


def with_model_id(cfg: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` (flat) plus its ``model`` column, :func:`model_id`, where the config names a model."""
    mid = model_id(cfg)
    return cfg if mid is None else {**cfg, "model": mid}


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

    Columns are the summary's keys (docs/sweeps.md: tail ``reward``, ``kl``, ``tracking_error``, ``in_band``,
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


# Columns of samples_table: the run's identity, then one logged sample (kl_research.runlog.SAMPLE_FIELDS).
SAMPLE_COLUMNS = [*ID_COLUMNS, "step", "prompt", "response", "reward", "kl_seq", "kl_token", "length"]


def last_eval_samples(dirs: Sequence[str | Path]) -> dict[str, list[dict]]:
    """Each run's answers at its last gold evaluation (its ``eval_samples.jsonl``, kl_research.gold: the same held-out
    prompts in every run), keyed ``<sweep dir>/<run dir>`` as the protocol and gold analyses name runs."""
    answers: dict[str, list[dict]] = {}
    for d in dirs:
        for r in run_dirs(d):
            f = r / "eval_samples.jsonl"
            if f.is_file():
                recs = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
                last = max((x["step"] for x in recs), default=None)
                answers[f"{Path(d).name}/{r.name}"] = [x for x in recs if x["step"] == last]
    return answers


def samples_table(sweep_dir: str | Path, n: int = 3, step: str = "last") -> pd.DataFrame:
    """A few generations per cell to read beside the numbers: per (controller, target, β₀), the first ``n`` samples
    of the runs' ``samples.jsonl`` (seeds in order), from each run's last logged step (``step="last"``: what the
    policy became) or from every logged step (``step="all"``). Columns :data:`SAMPLE_COLUMNS`: ``kl_seq`` is the
    exact KL of the response in nats (summed over its tokens), ``kl_token`` the same per response token, ``length``
    its response tokens; NaN in runs logged before they were recorded. Runs without samples are left out (a W&B run
    keeps them in its ``samples`` tables); with none, an empty frame. ``sweep_dir`` may also be a single run dir."""
    if step not in ("last", "all"):
        raise ValueError(f"step={step!r}; allowed: last, all")
    frames = []
    for d in run_dirs(sweep_dir):
        f = d / "samples.jsonl"
        if not f.is_file():
            continue
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        if not rows:
            continue
        if step == "last":
            rows = [r for r in rows if r["step"] == rows[-1]["step"]]
        info = run_info(d)
        frames.append(pd.DataFrame([{**{k: info[k] for k in ID_COLUMNS}, **r} for r in rows]))
    if not frames:
        return pd.DataFrame(columns=SAMPLE_COLUMNS)
    df = pd.concat(frames, ignore_index=True).reindex(columns=SAMPLE_COLUMNS)
    df = df.sort_values([*ID_COLUMNS[1:], "run", "step"], kind="stable", na_position="first")
    cell = ["controller", "target_kl", "init_kl_coef"]
    return df.groupby(cell, dropna=False, sort=False).head(n).reset_index(drop=True)


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
        cfg = with_model_id(flatten(dict(r.config)))
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


def attach_config(scores: pd.DataFrame, configs: pd.DataFrame, keys: Sequence[str] | None = None) -> pd.DataFrame:
    """``scores`` with the config columns ``keys`` (default :data:`POOL_KEYS`) of each run added from ``configs``
    (:attr:`Sweep.configs`), where the scores do not have them yet (curves loaded with ``config=True`` do). A key
    no run's config has is not added; a run whose config lacks a key others have gets ``"unrecorded"``, so runs
    from before a key existed are never pooled with runs that set it, unless the value it had is known
    (:data:`KEY_DEFAULTS`: a run from before the algo group was PPO)."""
    keys = POOL_KEYS if keys is None else keys
    out = scores.copy()
    by_run = configs.set_index("run") if "run" in configs and len(configs) else pd.DataFrame()
    for k in keys:
        if k not in out and k in by_run:
            out[k] = out["run"].map(by_run[k].to_dict())
        if k in out:
            out[k] = out[k].astype(object).where(out[k].notna(), KEY_DEFAULTS.get(k, UNRECORDED))
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
        keys = [k for k in POOL_KEYS if k in v and v[k].astype(str).nunique() > 1]  # the settings that differ
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
