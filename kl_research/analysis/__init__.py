"""Load a sweep's runs into pandas and compute the statistics of docs/sweeps.md: the library the report, the
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
- ``samples`` (:func:`samples_table`): a few generations per cell from the runs' ``samples.jsonl`` (prompt,
  response, reward, the response's exact KL in nats and per token, its length), to read beside the numbers.
- ``scores`` (:func:`score_runs`): one row per (run, target it is judged against), every §5 metric recomputed
  from the curve. A ``fixed`` run's β ignores the target, so it is run once per seed (and β) and scored
  against *every* target of the sweep: that row is the static controller at that target.
- ``cells`` (:func:`cell_stats`): per (controller, target, β₀, ``ppo.kl_mode``/``ppo.kl_penalty``): mean, sd and
  95 % Student-t interval of the mean across seeds of each metric (:func:`t_interval`; NaN with one seed).
- :func:`frontier` (fixed-β reward against KL), :func:`controllability` (can β reach every target? docs/sweeps.md:
  first), :func:`estimator_bias` (k1, k2, k3, seed against exact), :func:`verdict` (the seed's claim, per
  target), :func:`hold_band` (does each controller hold [0.5, 2] × target?) and :func:`compare_controllers`
  (pid against adaptive, Welch's t-test per metric).

Runs that differ in the model, ``algo.name``, ``ppo.kl_mode`` or ``ppo.kl_penalty`` (:data:`POOL_KEYS`) are never
pooled: cells split by them, and every comparison raises on a mix until one setting is selected
(``analyse(..., select=...)``).

The package, one module per concern (this namespace re-exports each one's public names, so
``from kl_research import analysis as A; A.analyse(...)`` reads a sweep without knowing where a function lives):

- :mod:`kl_research.analysis.runs`: loading runs (files, W&B) and the pooling keys;
- :mod:`kl_research.analysis.control`: control metrics of one curve and the per-run scores (imports nothing of the
  project: kl_research.runlog uses it for summary.json);
- :mod:`kl_research.analysis.stats`: statistics across seeds, the frontier, the estimators' bias;
- :mod:`kl_research.analysis.verdict`: controllability, the verdicts, their text, :func:`analyse`.
"""

from __future__ import annotations

from kl_research.analysis.control import (
    BAND,
    ESTIMATORS,
    METRICS,
    SETTLE_BAND,
    TAIL_FRACTION,
    UNTARGETED,
    control_metrics,
    score_runs,
    track,
)
from kl_research.analysis.runs import (
    ID_COLUMNS,
    KEY_DEFAULTS,
    POOL_KEYS,
    SAMPLE_COLUMNS,
    UNRECORDED,
    Sweep,
    add_frontier_runs,
    attach_config,
    flatten,
    is_run_dir,
    latest_sweep,
    load_configs,
    load_curves,
    load_summaries,
    load_sweep,
    load_wandb,
    model_id,
    require_one_variant,
    run_config,
    run_dirs,
    run_info,
    samples_table,
    select_runs,
    variants,
)
from kl_research.analysis.stats import (
    CELL_KEYS,
    FRONTIER_METRICS,
    cell_stats,
    estimator_bias,
    frontier,
    frontier_at,
    t_interval,
    welch,
)
from kl_research.analysis.verdict import (
    BAND_EVIDENCE,
    COMPARE_METRICS,
    CONTROL_MARGIN,
    GRID_TARGETS,
    HOLD_IN_BAND,
    NAMES,
    TARGETED,
    Analysis,
    Controllability,
    analyse,
    compare_controllers,
    controllability,
    controllability_text,
    hold_band,
    verdict,
    verdict_text,
)

__all__ = [
    "BAND",
    "BAND_EVIDENCE",
    "CELL_KEYS",
    "COMPARE_METRICS",
    "CONTROL_MARGIN",
    "ESTIMATORS",
    "FRONTIER_METRICS",
    "GRID_TARGETS",
    "HOLD_IN_BAND",
    "ID_COLUMNS",
    "KEY_DEFAULTS",
    "METRICS",
    "NAMES",
    "POOL_KEYS",
    "SAMPLE_COLUMNS",
    "SETTLE_BAND",
    "TAIL_FRACTION",
    "TARGETED",
    "UNRECORDED",
    "UNTARGETED",
    "Analysis",
    "Controllability",
    "Sweep",
    "add_frontier_runs",
    "analyse",
    "attach_config",
    "cell_stats",
    "compare_controllers",
    "control_metrics",
    "controllability",
    "controllability_text",
    "estimator_bias",
    "flatten",
    "frontier",
    "frontier_at",
    "hold_band",
    "is_run_dir",
    "latest_sweep",
    "load_configs",
    "load_curves",
    "load_summaries",
    "load_sweep",
    "load_wandb",
    "model_id",
    "require_one_variant",
    "run_config",
    "run_dirs",
    "run_info",
    "samples_table",
    "score_runs",
    "select_runs",
    "t_interval",
    "track",
    "variants",
    "verdict",
    "verdict_text",
    "welch",
]
