"""What a run leaves behind: metrics.jsonl + W&B (one record per step), samples, summary.json, curves.png."""

from __future__ import annotations

import json
import logging
import math
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

log = logging.getLogger(__name__)

TAIL_FRACTION = 0.25  # summaries average the last 25 % of steps (RESEARCH.md §5)


class RunLogger:
    """Writes every record to metrics.jsonl and, unless disabled, to W&B. W&B never stops training:
    if it fails to start or to log, the run goes on with the local files and a warning."""

    def __init__(self, cfg: DictConfig, out: Path, resolved: dict, name: str, resume: bool) -> None:
        self.out = out
        self.metrics_path = out / "metrics.jsonl"
        self.samples_path = out / "samples.jsonl"
        self.run = None
        if cfg.wandb.mode != "disabled":
            try:
                import wandb

                id_file = out / "wandb_id.txt"
                run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
                id_file.write_text(run_id)
                self.run = wandb.init(
                    project=cfg.wandb.project,
                    entity=cfg.wandb.entity,
                    group=cfg.wandb.group,
                    job_type="train",
                    name=name,
                    tags=list(cfg.wandb.tags),
                    config=resolved,
                    dir=str(out),
                    mode=cfg.wandb.mode,
                    id=run_id,
                    resume="allow",
                    reinit="finish_previous",
                )
                self.run.define_metric("*", step_metric="step")
            except Exception as exc:  # W&B must never stop training
                log.warning("W&B failed to start (%s: %s); logging to %s only", type(exc).__name__, exc, out)
                self.run = None
        self._metrics = None

    def replay(self, history: list[dict[str, Any]]) -> None:
        """(Re)write metrics.jsonl from the checkpoint's history: lines after the last checkpoint go."""
        self._metrics = self.metrics_path.open("w")
        for rec in history:
            self._metrics.write(json.dumps(rec) + "\n")
        self._metrics.flush()

    def log(self, rec: dict[str, Any]) -> None:
        self._metrics.write(json.dumps(rec) + "\n")
        self._metrics.flush()
        self._wandb(lambda: self.run.log(rec))

    def samples(self, step: int, prompts: list[str], responses: list[str], scores: list[float]) -> None:
        rows = [[step, p, r, s] for p, r, s in zip(prompts, responses, scores, strict=True)]
        with self.samples_path.open("a") as f:
            for row in rows:
                f.write(json.dumps(dict(zip(("step", "prompt", "response", "reward"), row, strict=True))) + "\n")

        def log_table():
            import wandb

            table = wandb.Table(columns=["step", "prompt", "response", "reward"], data=rows)
            self.run.log({"samples": table, "step": step})

        self._wandb(log_table)

    def summary(self, summary: dict[str, Any]) -> None:
        self._wandb(lambda: self.run.summary.update({f"summary/{k}": v for k, v in summary.items()}))

    def _wandb(self, fn) -> None:
        if self.run is None:
            return
        try:
            fn()
        except Exception as exc:
            log.warning("W&B logging failed (%s: %s); continuing without W&B", type(exc).__name__, exc)
            self.run = None

    def finish(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
        if self.run is not None:
            try:
                self.run.finish()
            except Exception as exc:
                log.warning("W&B finish failed: %s", exc)
            self.run = None


def summarize(history: list[dict[str, Any]], cfg: DictConfig, wall_time_s: float) -> dict[str, Any]:
    """Tail-window statistics of RESEARCH.md §5 (last 25 % of steps), KL measured by `kl/exact`. The control
    metrics (tracking error, in-band fraction, IAE, settle step, overshoot, KL after the first update, mean
    approx-KL per rollout) come from :func:`kl_research.analysis.control_metrics`, the same function that
    rescores runs in the analysis, so summary.json and the analysis can never disagree."""
    from kl_research.analysis import control_metrics  # analysis imports this module: import on use

    target = float(cfg.controller.target_kl)
    n_tail = max(1, math.ceil(TAIL_FRACTION * len(history)))
    tail = history[-n_tail:]
    kl_all = np.array([r["kl/exact"] for r in history])
    approx = [r.get("policy/approx_kl", float("nan")) for r in history]
    steps = [r["step"] for r in history] if all("step" in r for r in history) else None
    ctl = control_metrics(kl_all, target, steps, approx, tail_fraction=TAIL_FRACTION)
    evals = [r for r in history if "eval/ppl_heldout" in r]
    ppl_final = evals[-1]["eval/ppl_heldout"] if evals else float("nan")
    ppl_ref = evals[-1]["eval/ppl_ref"] if evals else float("nan")
    return {
        "status": "completed",
        "controller": cfg.controller.name,
        "target_kl": target,
        "init_kl_coef": float(cfg.controller.init_kl_coef),
        "seed": int(cfg.seed),
        "steps": len(history),
        "tail_steps": n_tail,
        "reward": float(np.mean([r["reward/mean"] for r in tail])),
        "kl": float(kl_all[-n_tail:].mean()),
        "tracking_error": ctl["tracking_error"],
        "in_band": ctl["in_band"],
        "iae": ctl["iae"],
        "settle_step": None if math.isnan(ctl["settle_step"]) else ctl["settle_step"],  # null: never settled
        "settled": ctl["settled"],
        "overshoot": ctl["overshoot"],
        "kl_step2": ctl["kl_step2"],
        "approx_kl_mean": ctl["approx_kl_mean"],
        "final_beta": float(history[-1]["kl/coef_next"]),
        "ppl_final": float(ppl_final),
        "ppl_ref": float(ppl_ref),
        "ppl_change": float(ppl_final / ppl_ref - 1),
        "drift_warnings": int(history[-1]["kl/drift_warnings"]),
        "wall_time_s": float(wall_time_s),
        "kl_unit": "nats/token",
    }


def plot_curves(history: list[dict[str, Any]], target: float, path: Path, title: str = "") -> None:
    """Reward, KL (with the target and its [0.5, 2]× band), β and held-out perplexity against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in history]
    fig, ax = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    reward = np.array([r["reward/mean"] for r in history])
    window = max(1, min(10, len(reward) // 5))
    smooth = np.convolve(reward, np.ones(window) / window, mode="valid")
    ax[0, 0].plot(steps, reward, alpha=0.35, lw=0.8, label="batch mean")
    ax[0, 0].plot(steps[window - 1 :], smooth, label=f"{window}-step mean")
    ax[0, 0].set_ylabel("reward")
    ax[0, 0].legend(fontsize=8)
    ax[0, 1].plot(steps, [r["kl/exact"] for r in history], label="exact")
    ax[0, 1].plot(steps, [r["kl/k1"] for r in history], alpha=0.4, lw=0.8, label="k1")
    ax[0, 1].axhline(target, color="k", ls="--", lw=1, label="target")
    ax[0, 1].axhspan(0.5 * target, 2 * target, color="g", alpha=0.08, label="[0.5, 2]× target")
    ax[0, 1].set_ylabel("KL (nats/token)")
    ax[0, 1].legend(fontsize=8)
    ax[1, 0].plot(steps, [r["kl/coef"] for r in history])
    ax[1, 0].set_yscale("log")
    ax[1, 0].set_ylabel("β (kl/coef)")
    ev = [r for r in history if "eval/ppl_heldout" in r]
    if ev:
        # the policy starts as the reference: step 0 is the reference's perplexity
        ev_steps = [0] + [r["step"] for r in ev]
        ax[1, 1].plot(ev_steps, [ev[0]["eval/ppl_ref"]] + [r["eval/ppl_heldout"] for r in ev], "o-", label="policy")
        ax[1, 1].axhline(ev[-1]["eval/ppl_ref"], color="k", ls="--", lw=1, label="reference")
        ax[1, 1].legend(fontsize=8)
    ax[1, 1].set_ylabel("held-out perplexity")
    for a in ax[1]:
        a.set_xlabel("PPO step (rollout)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
