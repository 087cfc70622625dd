"""What a run leaves behind: metrics.jsonl + W&B (one record per step), samples, summary.json, curves.png; and the
compact copy of it that results/ keeps (:func:`compact_run`)."""

from __future__ import annotations

import json
import logging
import math
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from kl_research.analysis.control import GOLD_METRICS, TAIL_FRACTION, control_metrics, tail_eval_mean

log = logging.getLogger(__name__)

# One record of samples.jsonl: the step, the decoded prompt and response, the task score, the exact KL of the
# response (nats, summed over its tokens) and per response token, and its length (response tokens, EOS included).
SAMPLE_FIELDS = ("step", "prompt", "response", "reward", "kl_seq", "kl_token", "length")
# Samples of each logged step that a compact run (results/<name>/runs/) keeps.
COMPACT_SAMPLES = 4
# One record of eval_samples.jsonl: the first few held-out prompts of each gold evaluation (the same prompts in every
# run and at every evaluation, kl_research.gold) with the policy's response and each scorer's score of it.
EVAL_SAMPLE_FIELDS = ("step", "prompt", "response", "gold_reward", "gold2_reward", "proxy_reward")


def trim_jsonl(path: Path, last_step: int) -> None:
    """Drop the records of ``path`` (jsonl with a ``step`` field) after ``last_step``: on resume, the steps after
    the checkpoint run again and would otherwise be written twice."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= last_step]
    path.write_text("".join(line + "\n" for line in keep))


class RunLogger:
    """Writes every record to metrics.jsonl and, unless disabled, to W&B. W&B never stops training, and an
    unreachable W&B costs neither time nor curves:

    - `wandb.init` waits at most `wandb.init_timeout` seconds (default 10; wandb's own default is 90);
    - an online run that fails to start, or whose `log` raises mid-run, is replaced by an *offline* run in the
      job directory with the same run id, holding every record of the job so far (an offline run uploaded with
      `wandb sync` replaces the history of the run with its id, so it must be complete); the warning says the
      exact `wandb sync` command;
    - if even that fails (or the run was offline already), the job goes on with the local files only.

    metrics.jsonl is written before W&B is touched: it is always complete."""

    def __init__(self, cfg: DictConfig, out: Path, resolved: dict, name: str, resume: bool) -> None:
        self.out = out
        self.metrics_path = out / "metrics.jsonl"
        self.samples_path = out / "samples.jsonl"
        self.eval_samples_path = out / "eval_samples.jsonl"
        self.run = None
        self.mode = str(cfg.wandb.mode)
        self.run_id: str | None = None
        self._records: list[dict[str, Any]] = []  # every record of the job (a fallback run replays them)
        self._replay_to_wandb = False  # an offline fallback run made before replay() gets the history too
        self._metrics = None
        self._init_kwargs: dict[str, Any] | None = None
        if self.mode == "disabled":
            return
        self.init_timeout = float(cfg.wandb.init_timeout)
        try:
            import wandb

            id_file = out / "wandb_id.txt"
            self.run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
            id_file.write_text(self.run_id)
            self._init_kwargs = dict(
                project=cfg.wandb.project,
                entity=cfg.wandb.entity,
                group=cfg.wandb.group,
                job_type="train",
                name=name,
                tags=list(cfg.wandb.tags),
                config=resolved,
                dir=str(out),
                id=self.run_id,
                resume="allow",
            )
            self.run = wandb.init(
                **self._init_kwargs,
                mode=self.mode,
                reinit="finish_previous",
                settings=wandb.Settings(init_timeout=self.init_timeout),
            )
            self.run.define_metric("*", step_metric="step")
        except Exception as exc:  # W&B must never stop training
            reason = f"W&B failed to start ({type(exc).__name__}: {exc})"
            if self.mode == "online" and self._init_kwargs is not None:
                self._go_offline(reason)
            else:
                log.warning("%s; logging to %s only", reason, out)
                self.run = None

    @property
    def offline_run_glob(self) -> str:
        """The directory (a glob: wandb adds a timestamp) of this job's offline W&B run."""
        return str(self.out / "wandb" / f"offline-run-*-{self.run_id}")

    def _go_offline(self, reason: str) -> None:
        """Replace the online run by an offline run with the same id in the job directory, replaying every record
        so far; on failure, drop W&B for the rest of the job."""
        import wandb

        old, self.run, self.mode = self.run, None, "offline"
        if old is not None:
            try:  # a run whose log raised is broken: end it (marked failed) before its replacement starts
                old.finish(exit_code=1)
            except Exception as exc:
                log.debug("finishing the failed online W&B run raised %s: %s", type(exc).__name__, exc)
        try:  # a fresh wandb service: a failed wandb.init leaves the run id taken in the old one ("run ID is in use")
            wandb.teardown()
        except (Exception, SystemExit) as exc:  # teardown sys.exit()s with the service's non-zero exit code
            log.debug("wandb.teardown raised %s: %s", type(exc).__name__, exc)
        try:
            run = wandb.init(
                **self._init_kwargs,
                mode="offline",
                reinit="create_new",
                settings=wandb.Settings(init_timeout=self.init_timeout),
            )
            run.define_metric("*", step_metric="step")
            for rec in self._records:
                run.log(rec)
        except Exception as exc:
            log.warning(
                "%s, and the offline fallback failed too (%s: %s); logging to %s only",
                reason,
                type(exc).__name__,
                exc,
                self.metrics_path,
            )
            return
        self.run = run
        self._replay_to_wandb = self._metrics is None  # replay() has not run yet: the history goes in there
        log.warning(
            "%s; W&B continues as an offline run with the same id %s in %s (every step so far included); "
            "upload it when W&B is reachable with: wandb sync %s",
            reason,
            self.run_id,
            self.offline_run_glob,
            self.offline_run_glob,
        )

    def replay(self, history: list[dict[str, Any]]) -> None:
        """(Re)write metrics.jsonl from the checkpoint's history: lines after the last checkpoint go, in the two
        sample files too."""
        last_step = int(history[-1]["step"]) if history else 0
        for path in (self.samples_path, self.eval_samples_path):
            trim_jsonl(path, last_step)
        self._metrics = self.metrics_path.open("w")
        for rec in history:
            self._metrics.write(json.dumps(rec) + "\n")
        self._metrics.flush()
        self._records = list(history)
        if self._replay_to_wandb:
            self._replay_to_wandb = False
            for rec in history:
                self._wandb(lambda rec=rec: self.run.log(rec), retry=False)

    def log(self, rec: dict[str, Any]) -> None:
        self._metrics.write(json.dumps(rec) + "\n")
        self._metrics.flush()
        self._records.append(rec)
        self._wandb(lambda: self.run.log(rec), retry=False)  # a fallback run replays _records, rec included

    def samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        """Append step ``step``'s samples (:data:`SAMPLE_FIELDS` after ``step``) to samples.jsonl and, as a table, to
        W&B."""
        rows = [[step, *(x[k] for k in SAMPLE_FIELDS[1:])] for x in samples]
        with self.samples_path.open("a") as f:
            for row in rows:
                f.write(json.dumps(dict(zip(SAMPLE_FIELDS, row, strict=True))) + "\n")

        def log_table():
            import wandb

            table = wandb.Table(columns=list(SAMPLE_FIELDS), data=rows)
            self.run.log({"samples": table, "step": step})

        self._wandb(log_table)

    def eval_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        """Append a gold evaluation's samples (:data:`EVAL_SAMPLE_FIELDS` after ``step``) to eval_samples.jsonl."""
        with self.eval_samples_path.open("a") as f:
            for x in samples:
                f.write(json.dumps({"step": step, **{k: x[k] for k in EVAL_SAMPLE_FIELDS[1:]}}) + "\n")

    def summary(self, summary: dict[str, Any]) -> None:
        self._wandb(lambda: self.run.summary.update({f"summary/{k}": v for k, v in summary.items()}))

    def _wandb(self, fn, retry: bool = True) -> None:
        """fn() against the current run. If it raises on an online run: switch to the offline fallback (which
        replays the records) and, with retry, call fn() once more there. Otherwise: drop W&B with a warning."""
        if self.run is None:
            return
        try:
            fn()
            return
        except Exception as exc:
            reason = f"W&B logging failed ({type(exc).__name__}: {exc})"
            if self.mode != "online":
                log.warning("%s; continuing without W&B (every record is in %s)", reason, self.metrics_path)
                self.run = None
                return
        self._go_offline(reason)
        if retry and self.run is not None:
            self._wandb(fn, retry=False)

    def finish(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
        if self.run is not None:
            try:
                self.run.finish()
            except Exception as exc:
                log.warning("W&B finish failed: %s", exc)
            self.run = None


def compact_run(run_dir: str | Path, dest: str | Path, samples_per_step: int = COMPACT_SAMPLES) -> Path:
    """Copy what results/ keeps of a finished run into ``dest``: ``metrics.jsonl``, ``summary.json``,
    ``.hydra/*.yaml``, the first ``samples_per_step`` samples of each logged step (``samples.jsonl``, when the run
    has one) and the gold evaluations' samples (``eval_samples.jsonl``), without its checkpoints, policy or W&B files.
    Returns ``dest``."""
    src, dest = Path(run_dir), Path(dest)
    if not (src / "summary.json").is_file():
        raise FileNotFoundError(f"{src} is not a finished run: it has no summary.json")
    (dest / ".hydra").mkdir(parents=True, exist_ok=True)
    for name in ("metrics.jsonl", "summary.json"):
        shutil.copyfile(src / name, dest / name)
    for f in sorted((src / ".hydra").glob("*.yaml")):
        shutil.copyfile(f, dest / ".hydra" / f.name)
    if (src / "samples.jsonl").is_file():
        per_step: dict[int, int] = {}
        kept = []
        for line in (src / "samples.jsonl").read_text().splitlines():
            step = json.loads(line)["step"]
            per_step[step] = per_step.get(step, 0) + 1
            if per_step[step] <= samples_per_step:
                kept.append(line + "\n")
        (dest / "samples.jsonl").write_text("".join(kept))
    if (src / "eval_samples.jsonl").is_file():  # a few fixed held-out prompts per evaluation: kept whole
        shutil.copyfile(src / "eval_samples.jsonl", dest / "eval_samples.jsonl")
    return dest


def summarize(history: list[dict[str, Any]], cfg: DictConfig, wall_time_s: float) -> dict[str, Any]:
    """Tail-window statistics of docs/sweeps.md (last 25 % of steps), KL measured by `kl/exact`. The control
    metrics (tracking error, in-band fraction, IAE, settle step, overshoot, KL after the first update, mean
    approx-KL per rollout) come from :func:`kl_research.analysis.control.control_metrics`, the same function that
    rescores runs in the analysis, so summary.json and the analysis can never disagree."""
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
    # the gold evaluation (docs/gold.md): the tail's evaluations, and π_ref's values; NaN for a run without it
    gold: dict[str, float] = {}
    for name, key in GOLD_METRICS.items():
        gold[name] = tail_eval_mean([r.get(key, math.nan) for r in history], n_tail)
        if key.startswith("eval/"):  # π_ref's value, measured at the first evaluation (reward/judge has none)
            refs = [r[f"{key}_ref"] for r in history if f"{key}_ref" in r]
            gold[f"{name}_ref"] = float(refs[-1]) if refs else math.nan
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
        **gold,
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
