"""train.py end to end on a tiny model composed from the real conf/: metrics, resume, guards, W&B."""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import struct
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_job
from hydra import compose, initialize_config_dir
from transformers import AutoModelForCausalLM

import kl_research.config  # noqa: F401  (registers schemas)
import kl_research.train as train_mod
from kl_research import checkpoint, ppo, precision_probe, runlog, runtime
from kl_research.train import train

CONF = str(Path(__file__).resolve().parents[1] / "conf")

# A reference that builds in seconds, and a PPO job of a few steps.
TINY = [*tiny_job(30), "wandb.samples_every=2", "threads=1"]

METRICS = [
    "step",
    "samples",
    "reward/mean",
    "reward/std",
    "kl/exact",
    "kl/k1",
    "kl/k2",
    "kl/k3",
    "kl/seed",
    "kl/target",
    "kl/coef",
    "kl/coef_next",
    "kl/error",
    "kl/drift_warnings",
    "policy/entropy",
    "policy/approx_kl",
    "policy/approx_kl_last_epoch",
    "policy/epochs",
    "policy/clipfrac",
    "loss/policy",
    "loss/value",
    "loss/value_clipfrac",
    "loss/grad_norm",
    "loss/kl",
    "response/length",
    "time/step_s",
    "time/rollout_s",
    "throughput/tokens_per_s",
    "memory/peak_rss_mb",
]
EVAL_METRICS = ["eval/ppl_heldout", "eval/ppl_ref", "eval/distinct_2"]
TIMING = ("time/", "throughput/", "memory/")  # differ between runs of the same job


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ref_cache")


def make_cfg(cache_dir, *overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=[*TINY, f"cache_dir={cache_dir}", *overrides])


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def without_timing(recs: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in recs]


def test_short_run_writes_every_metric(cache_dir, tmp_path, caplog, monkeypatch):
    import matplotlib.figure
    import matplotlib.image

    saved = {}
    real_savefig = matplotlib.figure.Figure.savefig

    def keep(fig, path, *args, **kwargs):  # the figure behind curves.png, to read what it shows
        saved[Path(path).name] = fig
        return real_savefig(fig, path, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    cfg = make_cfg(cache_dir, "steps=3", "controller=pid", "controller.target_kl=0.05")
    with caplog.at_level(logging.INFO, logger="kl_research.train"):
        summary = train(cfg, tmp_path)
    # no terminal here (as under submitit): plain progress lines instead of a carriage-return bar
    assert "step 3/3: reward" in caplog.text and "nats/token" in caplog.text
    recs = read_metrics(tmp_path)
    assert [r["step"] for r in recs] == [1, 2, 3]
    for r in recs:
        for k in METRICS:
            assert k in r and math.isfinite(r[k]), k
        assert r["kl/target"] == 0.05
        assert r["samples"] == r["step"] * 8
        assert 1 <= r["response/length"] <= 8
    for r in (recs[1], recs[2]):  # eval_every=2, and always at the last step
        for k in EVAL_METRICS:
            assert k in r and math.isfinite(r[k]) and r[k] >= 0
    assert "eval/ppl_heldout" not in recs[0]
    # policy starts as the reference: first-rollout KL is ~0 by every unbiased measure
    assert abs(recs[0]["kl/exact"]) < 1e-4 and abs(recs[0]["kl/k1"]) < 1e-4
    assert recs[0]["kl/coef"] == 0.5  # β₀ used for the first rollout
    # rollout 1 is sampled from π = π_ref (KL 0 by construction): it updates no controller, although pid at a
    # 0.05 target would read it as a −100 % error and lower β
    assert recs[0]["kl/coef_next"] == recs[0]["kl/coef"] == recs[1]["kl/coef"]
    assert recs[2]["kl/coef"] == recs[1]["kl/coef_next"] != recs[1]["kl/coef"]  # one update between rollouts
    # exact KL in the loss (the default mode): ≥ 0 up to fp32 rounding (π = π_ref at rollout 1, scored by two kernels)
    assert recs[0]["policy/epochs"] == 2 and recs[0]["loss/kl"] >= -1e-6
    assert summary["status"] == "completed" and summary["controller"] == "pid"
    assert summary["steps"] == 3 and summary["tail_steps"] == 1
    assert summary["kl"] == pytest.approx(recs[-1]["kl/exact"])
    assert summary["final_beta"] == recs[-1]["kl/coef_next"]
    assert summary["device"] == "cpu"
    # peak memory: the process's resident peak so far, never falling
    peaks = [r["memory/peak_rss_mb"] for r in recs]
    assert peaks == sorted(peaks) and summary["peak_rss_mb"] >= peaks[-1]
    # in MB: a Python process with torch holds > 100 MB, and never more than the kernel's high-water mark of it
    hwm_kb = next(
        int(x.split()[1]) for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM")
    )
    assert 100 < peaks[0] <= summary["peak_rss_mb"] <= hwm_kb / 1024 + 1
    # precision=auto on a CPU: measured by the probe (or read from its cache), logged with its numbers; on an AVX2-only
    # CPU fp32 without a probe, saying why
    if precision_probe.without_bf16_hardware(runtime.cpu_features()) is not None:
        assert (summary["precision"], summary["precision_source"], summary["precision_fp32_s"]) == ("fp32", "cpu", None)
        assert "precision=auto → fp32: no bf16 hardware on this CPU" in caplog.text
    else:
        assert summary["precision"] in ("fp32", "bf16") and summary["precision_source"] in ("probe", "cache")
        assert summary["precision_fp32_s"] > 0 and summary["precision_bf16_s"] > 0
        assert f"precision=auto → {summary['precision']}: bf16 trunk " in caplog.text
    for f in ("summary.json", "curves.png", "samples.jsonl", "checkpoints/last.pt"):
        assert (tmp_path / f).exists(), f
    # curves.png shows this run: KL per step with the target and its band, β per step, perplexity from the reference's
    fig = saved["curves.png"]
    axes = {a.get_ylabel(): a for a in fig.axes}
    kl_ax = axes["KL (nats/token)"]
    lines = {ln.get_label(): ln for ln in kl_ax.get_lines()}
    assert list(lines["exact"].get_ydata()) == [r["kl/exact"] for r in recs]
    assert list(lines["target"].get_ydata()) == [0.05, 0.05]
    assert list(axes["β (kl/coef)"].get_lines()[0].get_ydata()) == [r["kl/coef"] for r in recs]
    ppl = {ln.get_label(): ln for ln in axes["held-out perplexity"].get_lines()}
    assert list(ppl["policy"].get_ydata()) == [
        recs[1]["eval/ppl_ref"],
        recs[1]["eval/ppl_heldout"],
        recs[2]["eval/ppl_heldout"],
    ]
    png = matplotlib.image.imread(tmp_path / "curves.png")
    assert png.shape[0] > 500 and png.shape[1] > 800 and png[..., :3].std() > 0.05  # a drawn figure, not a blank
    # samples.jsonl: the decoded prompt/response/score of the logged steps (samples_every=2, and the last step)
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in samples}) == [2, 3] and len(samples) == 16
    assert all(tuple(r) == runlog.SAMPLE_FIELDS for r in samples)  # + each response's KL and length
    assert all(isinstance(r["prompt"], str) and r["prompt"] and isinstance(r["response"], str) for r in samples)
    last = [r["reward"] for r in samples if r["step"] == 3]
    assert sum(last) / len(last) == pytest.approx(recs[2]["reward/mean"], abs=1e-6)  # the whole batch of 8: its mean
    # the final policy loads with plain transformers
    lm = AutoModelForCausalLM.from_pretrained(tmp_path / "policy")
    assert lm.config.n_layer == 1
    # re-running a finished run returns its summary without training again
    assert train(cfg, tmp_path) == summary


def test_samples_carry_each_responses_kl_and_length_and_compact_runs_keep_a_few(cache_dir, tmp_path):
    """samples.jsonl: per response, its exact KL in nats (kl_seq, summed over its tokens), per token (kl_token) and its
    length in tokens; a logged step's samples are its whole batch here (8), so they add up to the step's record. The
    compact copy that results/ keeps (scripts/compact_runs.py) holds the first 4 of each logged step, and the analysis
    shows them per cell (analysis.samples_table)."""
    scripts = str(Path(__file__).resolve().parents[1] / "scripts")
    sys.path.insert(0, scripts)
    try:
        import compact_runs
    finally:
        sys.path.remove(scripts)
    from omegaconf import OmegaConf

    from kl_research import analysis

    # seed 2: step 1's 8 responses hold a word VADER scores. Where every reward is 0 (seed 0) the gradient is exactly
    # 0 and π stays π_ref; autograd's log-softmax once left ~1e-9 of rounding there, which AdamW made a visible move
    cfg = make_cfg(cache_dir, "steps=3", "controller=pid", "controller.target_kl=0.05", "seed=2")
    run = tmp_path / "sweep" / "pid_kl0.05_s2"
    train(cfg, run)
    (run / ".hydra").mkdir()  # as a sweep's job has it
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    (run / "wandb").mkdir()  # what a compact run leaves behind
    recs = {r["step"]: r for r in read_metrics(run)}
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in samples] == [2] * 8 + [3] * 8  # wandb.samples_every=2, and the last step
    for r in samples:
        assert isinstance(r["length"], int) and 1 <= r["length"] <= cfg.ppo.response_length
        assert r["kl_seq"] >= -1e-5  # ≥ 0 up to fp32 rounding of sums over V
        assert r["kl_token"] * r["length"] == pytest.approx(r["kl_seq"], rel=1e-9, abs=1e-12)
    for step in (2, 3):
        batch = [r for r in samples if r["step"] == step]
        n_tokens = sum(r["length"] for r in batch)
        assert n_tokens / len(batch) == pytest.approx(recs[step]["response/length"])
        assert sum(r["kl_seq"] for r in batch) / n_tokens == pytest.approx(recs[step]["kl/exact"], rel=1e-4, abs=1e-9)
    assert recs[1]["reward/std"] > 0  # the signal the next line needs
    assert all(r["kl_seq"] > 0 for r in samples)  # π has moved from π_ref by step 2: every response has KL > 0

    compact = tmp_path / "results" / "runs"
    compact_runs.main([str(run.parent), str(compact)])
    kept = compact / run.name
    assert sorted(str(p.relative_to(kept)) for p in kept.rglob("*") if p.is_file()) == [
        ".hydra/config.yaml",
        "eval_samples.jsonl",  # the gold evaluations' few fixed held-out prompts, kept whole
        "metrics.jsonl",
        "samples.jsonl",
        "summary.json",
    ]
    assert (kept / "eval_samples.jsonl").read_text() == (run / "eval_samples.jsonl").read_text()
    assert (kept / "metrics.jsonl").read_text() == (run / "metrics.jsonl").read_text()
    kept_samples = [json.loads(line) for line in (kept / "samples.jsonl").read_text().splitlines()]
    assert kept_samples == samples[:4] + samples[8:12]  # the first 4 of each logged step
    table = analysis.samples_table(compact, n=3)
    assert list(table.columns) == analysis.SAMPLE_COLUMNS and len(table) == 3
    assert (table["step"] == 3).all() and (table["controller"] == "pid").all() and (table["seed"] == 2).all()
    assert table[["prompt", "response", "kl_seq", "length"]].to_dict("records") == [
        {k: r[k] for k in ("prompt", "response", "kl_seq", "length")} for r in samples[8:11]
    ]
    (run / "summary.json").unlink()  # an unfinished run stops the copy
    with pytest.raises(SystemExit, match=r"unfinished runs in .* \(no summary\.json\): pid_kl0\.05_s2"):
        compact_runs.main([str(run.parent), str(tmp_path / "again")])


def test_keep_checkpoints_false_deletes_a_finished_runs_resume_state_only(cache_dir, tmp_path, caplog):
    """keep_checkpoints=false (experiment=smollm2: 2 × 1.6 GB per run): once summary.json is written, checkpoints/ goes;
    policy/, the metrics and the summary stay, and running the job again returns the summary without training."""
    cfg = make_cfg(cache_dir, "steps=2", "checkpoint_every=1", "keep_checkpoints=false")
    with caplog.at_level(logging.INFO, logger="kl_research.train"):
        summary = train(cfg, tmp_path)
    assert summary["status"] == "completed" and not (tmp_path / "checkpoints").exists()
    assert (tmp_path / "policy" / "config.json").is_file() and len(read_metrics(tmp_path)) == 2
    assert "keep_checkpoints=false: deleted" in caplog.text
    assert train(cfg, tmp_path) == summary
    with pytest.raises(ValueError, match=r"keep_checkpoints='no' is invalid; allowed: true, false"):
        train(make_cfg(cache_dir, "keep_checkpoints=no"), tmp_path / "bad")


@pytest.fixture
def probe_says(cache_dir, monkeypatch):
    """probe_says(fp32_s, bf16_s): the CPU precision probe measures these (seconds per step's model work); returns
    the list of its calls from then on. The module's probe cache is emptied before and after, so no other test reads
    a made-up decision."""

    def install(fp32_s: float, bf16_s: float) -> list:
        calls = []

        def measure(policy, work, device):
            calls.append(work)
            return {"fp32_s": fp32_s, "bf16_s": bf16_s, "probe_s": 0.5, "rounds": 3}

        monkeypatch.setattr(precision_probe, "measure", measure)
        monkeypatch.setattr(precision_probe, "without_bf16_hardware", lambda cpu: None)  # a CPU that is measured
        shutil.rmtree(cache_dir / "precision", ignore_errors=True)
        return calls

    yield install
    shutil.rmtree(cache_dir / "precision", ignore_errors=True)


def test_auto_precision_trains_the_trunk_the_cpu_probe_picks(cache_dir, tmp_path, monkeypatch, probe_says, caplog):
    """precision=auto on a CPU runs the job with the trunk the probe measured faster, logs why with the numbers and
    keeps them in its summary; the next job with the same shapes reads the decision from the cache."""
    calls = probe_says(0.3, 0.2)  # bf16 1.5× faster
    seen = []
    real_autocast = train_mod.autocast
    monkeypatch.setattr(train_mod, "autocast", lambda d, p: seen.append(p) or real_autocast(d, p))
    with caplog.at_level(logging.INFO, logger="kl_research.train"):
        summary = train(make_cfg(cache_dir, "steps=2"), tmp_path / "first")
    assert seen and set(seen) == {"bf16"} and len(calls) == 1  # every stage in bf16, one probe
    assert summary["precision"] == "bf16" and summary["precision_source"] == "probe"
    assert (summary["precision_fp32_s"], summary["precision_bf16_s"]) == (0.3, 0.2)
    assert "precision=auto → bf16: bf16 trunk 1.50× faster (≥ 1.20× needed)" in caplog.text
    assert "(fp32 0.3 s, bf16 0.2 s per step's model work: 4 fwd+bwd of 4×16 tokens" in caplog.text
    recs = read_metrics(tmp_path / "first")
    assert all(math.isfinite(r["kl/exact"]) for r in recs) and abs(recs[0]["kl/exact"]) < 1e-3
    seen.clear()
    again = train(make_cfg(cache_dir, "steps=1", "seed=1"), tmp_path / "again")
    assert len(calls) == 1 and again["precision"] == "bf16" and again["precision_source"] == "cache"
    assert seen and set(seen) == {"bf16"}
    seen.clear()
    explicit = train(make_cfg(cache_dir, "steps=1", "precision=fp32"), tmp_path / "explicit")
    assert len(calls) == 1 and explicit["precision"] == "fp32" and explicit["precision_source"] == "explicit"
    assert seen and set(seen) == {"fp32"}


def test_resume_keeps_the_precision_the_checkpoint_ran_with(cache_dir, tmp_path, probe_says, caplog):
    """A run resumed on the same kind of device keeps its checkpoint's precision and does not probe again, even
    where a probe would now choose the other one: its trajectory continues as an uninterrupted run's."""
    probe_says(0.2, 0.3)  # fp32 faster
    train(make_cfg(cache_dir, "steps=2", "checkpoint_every=1"), tmp_path)
    (tmp_path / "summary.json").unlink()  # as if killed after its last checkpoint
    calls = probe_says(0.3, 0.1)  # now bf16 would win, and the cache is empty
    with caplog.at_level(logging.INFO, logger="kl_research.train"):
        summary = train(make_cfg(cache_dir, "steps=3", "checkpoint_every=1"), tmp_path)
    assert calls == [] and summary["steps"] == 3
    assert summary["precision"] == "fp32" and summary["precision_source"] == "checkpoint"
    assert (summary["precision_fp32_s"], summary["precision_bf16_s"]) == (0.2, 0.3)
    assert "precision=auto → fp32: kept from the checkpoint: steps 1-2 ran with it" in caplog.text
    assert "chosen by probe: bf16 trunk 1.50× slower" in summary["precision_reason"]
    assert "resumed on" not in caplog.text  # no "not bit-identical" warning
    ckpt = torch.load(tmp_path / train_mod.CHECKPOINT, weights_only=False)
    assert ckpt["precision"] == "fp32" and ckpt["precision_choice"]["precision_source"] == "probe"


def test_resume_keeps_the_vocabulary_path_the_checkpoint_ran_with(cache_dir, tmp_path, monkeypatch, caplog):
    """fused_vocab=auto resolves per machine (the C kernel where it builds): a run that started without it resumes
    on the torch-ops version even where the kernel now builds (its trajectory continues bit for bit); a run that ran
    the kernel and resumes where it cannot build falls back and warns that its trajectory is no longer bit-identical."""
    from kl_research import vocab_kernel

    if not any(shutil.which(c) for c in vocab_kernel.COMPILERS):
        pytest.skip("no C compiler on this machine: the kernel cannot be built")
    real_load = vocab_kernel.load
    monkeypatch.setattr(vocab_kernel, "load", lambda cache: (False, "no C compiler (simulated)"))
    train(make_cfg(cache_dir, "steps=2", "checkpoint_every=1"), tmp_path / "a")
    assert torch.load(tmp_path / "a" / train_mod.CHECKPOINT, weights_only=False)["fused_vocab"] is True
    (tmp_path / "a" / "summary.json").unlink()
    monkeypatch.setattr(vocab_kernel, "load", real_load)
    with caplog.at_level(logging.INFO, logger="kl_research.train"):
        train(make_cfg(cache_dir, "steps=3", "checkpoint_every=1"), tmp_path / "a")
    assert "fused_vocab=auto → auto: kept from the checkpoint (steps 1-2 ran with it)" in caplog.text
    assert "resumed with fused_vocab" not in caplog.text
    assert torch.load(tmp_path / "a" / train_mod.CHECKPOINT, weights_only=False)["fused_vocab"] is True

    caplog.clear()
    train(make_cfg(cache_dir, "steps=2", "checkpoint_every=1"), tmp_path / "b")
    assert torch.load(tmp_path / "b" / train_mod.CHECKPOINT, weights_only=False)["fused_vocab"] == "kernel"
    (tmp_path / "b" / "summary.json").unlink()
    monkeypatch.setattr(vocab_kernel, "_LIB", None)
    monkeypatch.setattr(vocab_kernel, "load", lambda cache: (False, "no C compiler (simulated)"))
    with caplog.at_level(logging.INFO, logger="kl_research.train"):
        train(make_cfg(cache_dir, "steps=3", "checkpoint_every=1"), tmp_path / "b")
    assert "resumed with fused_vocab resolved to True; steps 1-2 ran with kernel" in caplog.text


def test_resume_on_another_kind_of_device_resolves_again_and_warns(cache_dir, tmp_path, probe_says, caplog):
    """A checkpoint from a GPU (bf16 trunk) resumed on a CPU: precision=auto is resolved for the CPU (probed), and
    the log says the trajectory is no longer the uninterrupted one."""
    train(make_cfg(cache_dir, "steps=2", "checkpoint_every=1"), tmp_path)
    (tmp_path / "summary.json").unlink()
    path = tmp_path / train_mod.CHECKPOINT
    ckpt = torch.load(path, weights_only=False)
    torch.save({**ckpt, "device_type": "cuda", "precision": "bf16"}, path)  # as if steps 1-2 ran on a GPU
    calls = probe_says(0.2, 0.3)
    with caplog.at_level("WARNING", logger="kl_research.train"):
        summary = train(make_cfg(cache_dir, "steps=3", "checkpoint_every=1"), tmp_path)
    assert len(calls) == 1 and summary["steps"] == 3 and summary["precision"] == "fp32"
    assert "resumed on cpu with a fp32 trunk; steps 1-2 ran on cuda with a bf16 trunk" in caplog.text


def assert_kill_and_resume_continues_identical_trajectory(cfg, tmp_path, monkeypatch) -> None:
    """Run cfg (5 steps, checkpoint every 2) once whole, once killed at step 4 and resumed: identical records.
    Shared with tests/test_cuda.py, which runs it on the GPU."""
    full = tmp_path / "full"
    train(cfg, full)

    crashed = tmp_path / "crashed"
    real_rollout, calls = train_mod.rollout, {"n": 0}

    def dying_rollout(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # step 4: the checkpoint is at step 2, step 3 was logged but not saved
            raise KeyboardInterrupt("simulated kill")
        return real_rollout(*args, **kwargs)

    monkeypatch.setattr(train_mod, "rollout", dying_rollout)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, crashed)
    before = read_metrics(crashed)
    assert len(before) == 3 and not (crashed / "summary.json").exists()
    resumed = {"n": 0}

    def counting_rollout(*args, **kwargs):
        resumed["n"] += 1
        return real_rollout(*args, **kwargs)

    monkeypatch.setattr(train_mod, "rollout", counting_rollout)
    train(cfg, crashed)
    monkeypatch.setattr(train_mod, "rollout", real_rollout)

    a, b = read_metrics(full), read_metrics(crashed)
    # a resume, not a rerun: only rollouts 3-5 ran again (the checkpoint is at step 2), and steps 1-2 are the records
    # the killed process wrote, its own timings included (a rerun from step 1 would have measured new ones)
    assert resumed["n"] == 3
    assert b[:2] == before[:2]
    assert [r["kl/coef"] for r in a] == [r["kl/coef"] for r in b]  # the same β trajectory, bit for bit
    assert len({r["kl/coef"] for r in a}) > 1  # ... and β did move
    assert without_timing(a) == without_timing(b)
    for name in ("samples.jsonl", "eval_samples.jsonl"):  # the steps after the checkpoint are not written twice
        if (full / name).exists():
            assert (crashed / name).read_text() == (full / name).read_text(), name


def test_kill_and_resume_continues_identical_trajectory(cache_dir, tmp_path, monkeypatch):
    # the drift diagnostic judging from rollout 2 and warning after 2 rollouts out of the band: its state (the
    # stretch out of the band, the count) must come back from the checkpoint too
    drift = ["drift_grace=1", "drift_patience=2"]
    cfg = make_cfg(cache_dir, "steps=5", "controller=adaptive", "controller.horizon=16", *drift)
    assert_kill_and_resume_continues_identical_trajectory(cfg, tmp_path, monkeypatch)
    assert [r["kl/drift_warnings"] for r in read_metrics(tmp_path / "crashed")] == [0, 0, 1, 2, 3]


def test_kill_and_resume_writes_each_steps_samples_once(cache_dir, tmp_path, monkeypatch):
    """Samples and the gold evaluation's samples at every step: the killed process wrote step 3's, which the resume
    (from the checkpoint at step 2) writes again; the files end as the uninterrupted run's."""
    cfg = make_cfg(cache_dir, "steps=5", "wandb.samples_every=1", "eval_every=1", "gold.prompts=8")
    assert_kill_and_resume_continues_identical_trajectory(cfg, tmp_path, monkeypatch)
    evals = [json.loads(line) for line in (tmp_path / "full" / "eval_samples.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [s for s in range(1, 6) for _ in range(8)]  # the first 8 (gold.keep) each
    assert set(evals[0]) == {"step", "prompt", "response", "gold_reward", "gold2_reward", "proxy_reward"}
    # the same 8 held-out prompts at every evaluation, all of them kept here (gold.prompts = keep = 8), so their
    # scores' mean is the logged eval/gold_reward
    assert len({e["prompt"] for e in evals}) <= 8
    recs = read_metrics(tmp_path / "full")
    for r in recs:
        mine = [e["gold_reward"] for e in evals if e["step"] == r["step"]]
        assert sum(mine) / len(mine) == pytest.approx(r["eval/gold_reward"], abs=1e-6)
    # reward/judge: AFINN of the rollout's own responses (batch 8 = the 8 samples kept per step), not the training
    # reward's VADER
    from kl_research.rewards import AfinnReward

    samples = [json.loads(line) for line in (tmp_path / "full" / "samples.jsonl").read_text().splitlines()]
    for r in recs:
        mine = [x for x in samples if x["step"] == r["step"]]
        afinn = AfinnReward(include_prompt=False)([x["prompt"] for x in mine], [x["response"] for x in mine])
        assert r["reward/judge"] == pytest.approx(float(afinn.mean()), abs=1e-6)
    assert any(r["reward/judge"] != r["reward/mean"] for r in recs)


@pytest.mark.parametrize(
    "paths",
    [
        ["sampler=hf", "compile_vocab=false", "fast_trunk=false", "fused_vocab=true"],
        ["sampler=fast", "compile_vocab=true"],
        ["sampler=fast", "precision=bf16"],
    ],
)
def test_kill_and_resume_is_exact_with_and_without_the_fast_paths(cache_dir, tmp_path, monkeypatch, paths):
    """The fallbacks (HF generate, eager vocabulary work in torch ops, transformers' forward), the fast paths forced on,
    and a bf16 trunk (its sampler's weights cast once per rollout, the head's backward in bf16; the vocabulary kernel,
    as `fused_vocab=auto` picks it where it builds): the same guarantee."""
    from kl_research.runtime import resolve_compile_vocab

    if "compile_vocab=true" in paths and not resolve_compile_vocab("auto", torch.device("cpu"))[0]:
        pytest.skip("no C++ compiler for torch.compile's CPU backend")
    cfg = make_cfg(cache_dir, "steps=5", "controller=adaptive", "controller.horizon=16", *paths)
    assert_kill_and_resume_continues_identical_trajectory(cfg, tmp_path, monkeypatch)


def test_resume_keeps_the_head_library_the_checkpoint_ran_with(cache_dir, tmp_path, monkeypatch, caplog):
    """onednn_fp32=auto resolves per machine (oneDNN on a non-Intel AVX-512 CPU): a run that started on MKL's head
    resumes on it where auto would now pick oneDNN, and its summary says so; a run that ran oneDNN and resumes where
    oneDNN cannot run falls back and warns. Both resolutions are simulated, so the test means the same on any CPU."""
    if runtime.onednn_fp32_reason() is not None:
        pytest.skip(f"no oneDNN here: {runtime.onednn_fp32_reason()}")
    ckpt = lambda run: torch.load(tmp_path / run / train_mod.CHECKPOINT, weights_only=False)  # noqa: E731
    monkeypatch.setattr(train_mod, "resolve_onednn_fp32", lambda s, d: (False, "auto: MKL (simulated)"))
    train(make_cfg(cache_dir, "steps=2", "checkpoint_every=1", "onednn_fp32=auto"), tmp_path / "a")
    assert ckpt("a")["onednn_fp32"] is False
    (tmp_path / "a" / "summary.json").unlink()
    monkeypatch.setattr(train_mod, "resolve_onednn_fp32", lambda s, d: (True, "auto: oneDNN (simulated)"))
    with caplog.at_level(logging.INFO, logger="kl_research.train"):
        train(make_cfg(cache_dir, "steps=3", "checkpoint_every=1", "onednn_fp32=auto"), tmp_path / "a")
    assert "onednn_fp32=auto → auto: kept from the checkpoint (steps 1-2 ran with it)" in caplog.text
    assert "resumed with onednn_fp32" not in caplog.text
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["onednn_fp32"] is False

    caplog.clear()
    train(make_cfg(cache_dir, "steps=2", "checkpoint_every=1", "onednn_fp32=auto"), tmp_path / "b")
    assert ckpt("b")["onednn_fp32"] is True
    (tmp_path / "b" / "summary.json").unlink()
    monkeypatch.setattr(train_mod, "resolve_onednn_fp32", lambda s, d: (False, "auto: no oneDNN (simulated)"))
    monkeypatch.setattr(train_mod, "onednn_fp32_reason", lambda: "no oneDNN (simulated)")
    with caplog.at_level(logging.INFO, logger="kl_research.train"):
        train(make_cfg(cache_dir, "steps=3", "checkpoint_every=1", "onednn_fp32=auto"), tmp_path / "b")
    assert "resumed with onednn_fp32 resolved to False; steps 1-2 ran with True" in caplog.text
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["onednn_fp32"] is False


def test_fast_trunk_leaves_the_trajectory_bit_identical(cache_dir, tmp_path, caplog):
    """fast_trunk (the scoring pass's and the update's forward in kl_research/gpt2.py's plain ops) against
    transformers' forward, under a bf16 trunk: every logged number of every step the same, to the bit."""
    with caplog.at_level("INFO", logger="kl_research.train"):
        train(make_cfg(cache_dir, "steps=3", "precision=bf16", "seed=2", "fast_trunk=false"), tmp_path / "hf")
        assert "fast_trunk=False → transformers' forward" in caplog.text
        train(make_cfg(cache_dir, "steps=3", "precision=bf16", "seed=2"), tmp_path / "plain")
        assert "fast_trunk=True → plain ops" in caplog.text
    hf, plain = read_metrics(tmp_path / "hf"), read_metrics(tmp_path / "plain")
    assert hf[-1]["kl/exact"] > 0 and without_timing(hf) == without_timing(plain)


def test_grpo_kill_and_resume_continues_identical_trajectory(cache_dir, tmp_path, monkeypatch):
    """The same guarantee under algo=grpo (its policy has no value head; its prompts are drawn in groups)."""
    cfg = make_cfg(
        cache_dir, "steps=5", "algo=grpo", "algo.group_size=4", "controller=adaptive", "controller.horizon=16"
    )
    assert_kill_and_resume_continues_identical_trajectory(cfg, tmp_path, monkeypatch)
    recs = read_metrics(tmp_path / "full")
    assert not any("loss/value" in r for r in recs)  # no value head, no value loss
    # short VADER-scored responses often tie within a group (advantage 0); where they do not, the update moves π
    assert any(r["reward/std"] > 0 for r in recs) and recs[-1]["kl/exact"] > 1e-6
    assert not (tmp_path / "full" / "policy" / "value_head.safetensors").exists()
    ckpt = torch.load(tmp_path / "full" / train_mod.CHECKPOINT, weights_only=True)
    assert not any(k.startswith("v_head") for k in ckpt["policy"]) and ckpt["config"]["algo"]["name"] == "grpo"


def test_truncated_last_checkpoint_falls_back_to_the_previous_one(cache_dir, tmp_path, monkeypatch, caplog):
    """A disk fault after the atomic rename leaves last.pt truncated: the resume warns naming it, continues from the
    previous checkpoint, and ends on the uninterrupted run's trajectory."""
    full = tmp_path / "full"
    train(make_cfg(cache_dir, "steps=6", "controller=adaptive", "controller.horizon=16"), full)
    out = tmp_path / "faulty"
    train(make_cfg(cache_dir, "steps=4", "controller=adaptive", "controller.horizon=16"), out)
    (out / "summary.json").unlink()
    last = out / train_mod.CHECKPOINT
    assert (out / train_mod.PREVIOUS_CHECKPOINT).exists()
    last.write_bytes(last.read_bytes()[:1024])
    calls = {"n": 0}
    real_rollout = train_mod.rollout

    def counting_rollout(*args, **kwargs):
        calls["n"] += 1
        return real_rollout(*args, **kwargs)

    monkeypatch.setattr(train_mod, "rollout", counting_rollout)
    with caplog.at_level("WARNING", logger="kl_research.train"):
        train(make_cfg(cache_dir, "steps=6", "controller=adaptive", "controller.horizon=16"), out)
    assert f"checkpoint {last} cannot be read" in caplog.text and "previous.pt (step 2)" in caplog.text
    assert calls["n"] == 4  # steps 3-6, from the previous checkpoint
    a, b = read_metrics(full), read_metrics(out)
    assert [r["kl/coef"] for r in a] == [r["kl/coef"] for r in b]
    assert without_timing(a) == without_timing(b)


def test_no_readable_checkpoint_is_a_clear_error(cache_dir, tmp_path):
    ckpt = tmp_path / train_mod.CHECKPOINT
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"PK\x03\x04 not a checkpoint")
    with pytest.raises(
        RuntimeError, match=r"no readable checkpoint in .*checkpoints.*last\.pt.*Delete the checkpoints"
    ):
        train(make_cfg(cache_dir, "steps=2"), tmp_path)


class _OpensAFile:
    """A pickle that runs code when loaded: its __reduce__ calls open(path, "w")."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_checkpoint_that_would_run_code_is_refused_naming_the_file(cache_dir, tmp_path):
    marker = tmp_path / "opened_by_the_checkpoint"
    ckpt = tmp_path / "run" / train_mod.CHECKPOINT
    ckpt.parent.mkdir(parents=True)
    torch.save({"step": 1, "payload": _OpensAFile(str(marker))}, ckpt)
    with pytest.raises(RuntimeError, match=rf"refusing to load {ckpt}"):
        train(make_cfg(cache_dir, "steps=2"), tmp_path / "run")
    assert not marker.exists()


def test_resume_refuses_a_different_config(cache_dir, tmp_path, monkeypatch):
    train(make_cfg(cache_dir, "steps=2"), tmp_path)
    (tmp_path / "summary.json").unlink()  # pretend it did not finish
    with pytest.raises(ValueError, match=r"different config.*ppo\.lr"):
        train(make_cfg(cache_dir, "steps=4", "ppo.lr=0.5"), tmp_path)


def test_a_second_copy_of_a_job_in_its_run_dir_fails_at_once_naming_the_first(cache_dir, tmp_path, monkeypatch):
    """A run dir has one job at a time (checkpoint.run_dir_lock): a copy started while another holds it fails before it
    loads anything, and the dir is free again once the holder's lock is gone."""
    import fcntl

    loaded = []
    monkeypatch.setattr("kl_research.reference.load_reference", lambda cfg: loaded.append(cfg) or 1 / 0)
    with open(tmp_path / checkpoint.LOCK_FILE, "a+") as holder:  # another process's lock (flock: per open file)
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        holder.write("pid 4242 on node7 since 2026-11-29T10:00:00\n")
        holder.flush()
        with pytest.raises(RuntimeError, match=r"in use by another copy of this job \(pid 4242 on node7 since"):
            train(make_cfg(cache_dir, "steps=2"), tmp_path)
    assert loaded == []
    with pytest.raises(ZeroDivisionError):  # free: the job starts (and here fails at its first load)
        train(make_cfg(cache_dir, "steps=2"), tmp_path)
    assert len(loaded) == 1


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("ppo.minibatch_size=3", r"ppo\.minibatch_size=3 is invalid; allowed: a divisor of ppo\.batch_size=8"),
        ("ppo.response_length=0", r"ppo\.response_length=0 is invalid"),
        ("ppo.kl_penalty=k9", r"ppo\.kl_penalty='k9' with ppo\.kl_mode='sequence' is refused: it is not a KL"),
        ("ppo.kl_penalty=k3", r"ppo\.kl_penalty='k3' with ppo\.kl_mode='sequence' is refused.*ppo\.kl_penalty=exact"),
        ("ppo.kl_mode=reward", r"ppo\.kl_penalty='exact' with ppo\.kl_mode='reward' is refused.*kl_penalty=k1"),
        ("ppo.target_approx_kl=0", r"ppo\.target_approx_kl=0\.0 is invalid"),
        (
            "ppo.response_length=60",
            r"data\.prompt_tokens \+ ppo\.response_length = 8 \+ 60 = 68 is invalid: the model's context is 64 tokens",
        ),
        ("data.eval_max_length=128", r"data\.eval_max_length=128 is invalid: the model's context is 64 tokens"),
        (
            "controller=adaptive controller.horizon=1.5",
            r"controller\.horizon=1\.5 is invalid with ppo\.batch_size=8.*allowed: controller\.horizon > ",
        ),
        ("ppo.kl_signal=nope", r"ppo\.kl_signal='nope'.*exact"),
        ("controller.target_kl=-1", r"controller\.target_kl=-1\.0 is invalid"),
        ("steps=0", r"steps=0 is invalid"),
        ("drift_grace=0", r"drift_grace=0 is invalid; allowed: an int >= 1 \(rollout 1 has KL 0 by construction\)"),
        ("drift_patience=0", r"drift_patience=0 is invalid; allowed: an int > 0"),
        ("precision=fp8", r"precision='fp8' is invalid; allowed: auto, fp32, bf16"),
        ("compile=fast", r"compile='fast' is invalid; allowed: false, default, reduce-overhead"),
        ("algo=grpo ppo.vf_coef=0.5", r"ppo\.vf_coef=0\.5 is invalid with algo=grpo: it is a PPO setting"),
        ("algo=grpo ppo.detach_value_head=true", r"ppo\.detach_value_head=True is invalid with algo=grpo"),
        ("algo=grpo algo.group_size=3", r"algo\.group_size=3 is invalid with ppo\.batch_size=8"),
        ("algo=grpo algo.group_size=1", r"algo\.group_size=1 is invalid; allowed: an int >= 2"),
        ("ppo.gamma=null", r"ppo\.gamma=None is invalid with algo=ppo"),
        ("algo=grpo ppo.kl_mode=loss ppo.kl_penalty=k1", r"ppo\.kl_penalty='k1' with ppo\.kl_mode='loss' is refused"),
    ],
)
def test_bad_config_fails_before_anything_loads(cache_dir, tmp_path, monkeypatch, override, message):
    import kl_research.reference as reference

    def no_loading(*a, **k):
        raise AssertionError("model loaded before validation")

    monkeypatch.setattr(reference, "load_reference", no_loading)
    with pytest.raises(ValueError, match=message):
        train(make_cfg(cache_dir, *override.split()), tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: device=cuda is valid here")
def test_device_cuda_without_cuda_fails_before_anything_loads(cache_dir, tmp_path):
    with pytest.raises(ValueError, match=r"device='cuda' is invalid; allowed: auto or cpu on this machine"):
        train(make_cfg(cache_dir, "device=cuda"), tmp_path)


def test_pretrained_context_is_read_from_a_local_config_before_loading(compose, tmp_path):
    """model=gpt2 with a local directory: its config.json's context is checked before any weights load (there are
    none in this directory: the error must come first)."""
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_positions": 16}))
    with pytest.raises(ValueError, match=r"8 \+ 24 = 32 is invalid: the model's context is 16 tokens"):
        train(compose("model=gpt2", f"model.path={tmp_path / 'm'}", "ppo.response_length=24"), tmp_path / "out")


def test_sampler_fast_on_a_model_it_cannot_run_fails_before_the_precision_probe(cache_dir, tmp_path, monkeypatch):
    """sampler=fast on a model the fast sampler does not implement (a Llama, say): the trainer's error naming the key,
    before the precision probe (which samples with the chosen sampler) spends any compute."""
    probed = []
    monkeypatch.setattr(train_mod, "fast_sampler_reason", lambda lm: "model_type 'llama' (gpt2 only)")
    monkeypatch.setattr(train_mod, "run_precision", lambda *a, **k: probed.append(1))
    with pytest.raises(ValueError, match=r"sampler='fast' is invalid for this model: model_type 'llama'.*allowed"):
        train(make_cfg(cache_dir, "sampler=fast", "precision=auto"), tmp_path)
    assert not probed


def test_same_trajectory_whether_the_reference_was_built_now_or_cached(tmp_path):
    """Building the reference draws from the global RNG; the job is seeded after it, so the first run on a fresh
    cache (builds) and the next (loads) sample the same tokens and log the same numbers."""
    cache = tmp_path / "fresh_cache"
    built, cached = tmp_path / "built", tmp_path / "cached"
    train(make_cfg(cache, "steps=2"), built)
    assert (built / "summary.json").exists() and any((cache / "reference").iterdir())
    train(make_cfg(cache, "steps=2"), cached)
    assert without_timing(read_metrics(built)) == without_timing(read_metrics(cached))


@pytest.mark.slow
def test_compiled_trunk_gives_the_eager_numbers(cache_dir, tmp_path, monkeypatch):
    """compile=default: scoring and the update run through torch.compile's trunk (tens of seconds to compile on
    a CPU) and give the eager run's first step: same sampled tokens and reward, log-probs to fp32 rounding."""
    compiled = []
    real = train_mod.compile_trunks
    monkeypatch.setattr(train_mod, "compile_trunks", lambda mode, *lms: compiled.extend(lms) or real(mode, *lms))
    eager = read_metrics_of(train(make_cfg(cache_dir, "steps=1"), tmp_path / "eager"), tmp_path / "eager")
    assert compiled == []
    comp = read_metrics_of(train(make_cfg(cache_dir, "steps=1", "compile=default"), tmp_path / "c"), tmp_path / "c")
    assert len(compiled) == 2  # policy and reference trunks
    assert comp[0]["reward/mean"] == eager[0]["reward/mean"]  # generation is eager: the same tokens
    for k in ("kl/exact", "kl/k1", "policy/entropy", "loss/policy", "loss/value", "policy/approx_kl"):
        assert comp[0][k] == pytest.approx(eager[0][k], rel=1e-3, abs=1e-5), k


def read_metrics_of(summary: dict, out: Path) -> list[dict]:
    assert summary["status"] == "completed"
    return read_metrics(out)


def test_unknown_group_option_and_key_fail_at_compose(cache_dir):
    from hydra.errors import ConfigCompositionException, MissingConfigException

    with pytest.raises(MissingConfigException, match=r"(?s)pidd.*adaptive.*exponential.*fixed.*pid"):
        make_cfg(cache_dir, "controller=pidd")
    with pytest.raises(ConfigCompositionException, match=r"ppo\.lrr"):
        make_cfg(cache_dir, "ppo.lrr=1")


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(cache_dir, tmp_path, monkeypatch):
    cfg = make_cfg(cache_dir, "steps=6")
    real, calls = ppo.policy_loss, {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss, clipfrac, akl = real(*args, **kwargs)
        if calls["n"] > 2 * 2 * 2:  # 2 steps x 2 epochs x 2 minibatches pass; step 3 goes NaN
            loss = loss * float("nan")
        return loss, clipfrac, akl

    monkeypatch.setattr(ppo, "policy_loss", poisoned)
    with pytest.raises(FloatingPointError, match="non-finite PPO loss"):
        train(cfg, tmp_path)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)
    assert ckpt["step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["policy"].values())
    assert not (tmp_path / "summary.json").exists()


def test_non_finite_reward_stops_with_clear_error(cache_dir, tmp_path, monkeypatch):
    import kl_research.rewards as rewards

    real = rewards.build_reward

    def nan_reward(cfg, device):
        fn = real(cfg, device)
        fn.score = lambda texts: torch.full((len(texts),), float("nan"))
        return fn

    monkeypatch.setattr(rewards, "build_reward", nan_reward)
    with pytest.raises(ValueError, match=r"reward 'sentiment' is not finite \(nan\) for sample 0"):
        train(make_cfg(cache_dir, "steps=2"), tmp_path)


def _wandb_records(path: Path):
    """Read a .wandb transaction log with wandb's own protobuf Record type (LevelDB log framing)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    block, pos, header_len = 32768, 7, 7  # file header ":W&B" + magic (2 bytes) + version (1 byte)
    assert data[:4] == b":W&B"
    records, chunk = [], b""
    while pos + header_len <= len(data):
        left = block - pos % block
        if left < header_len:
            pos += left
            continue
        _crc, length, rtype = struct.unpack("<IHB", data[pos : pos + header_len])
        pos += header_len
        chunk += data[pos : pos + length]
        pos += length
        if rtype in (1, 4):  # FULL or LAST
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(chunk)
            records.append(rec)
            chunk = b""
        elif rtype == 0 and length == 0:
            break
    return records


def test_wandb_offline_history_reads_back(cache_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = make_cfg(cache_dir, "steps=2", "wandb.mode=offline", "wandb.group=test-group")
    train(cfg, tmp_path)
    files = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    deadline = time.monotonic() + 30  # wandb-core writes the log from its own process: allow it to flush
    while True:
        history = [
            {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in rec.history.item}
            for rec in _wandb_records(files[0])
            if rec.WhichOneof("record_type") == "history"
        ]
        rows = [h for h in history if "kl/exact" in h]
        if len(rows) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    local = read_metrics(tmp_path)
    assert [h["step"] for h in rows] == [1, 2]
    for h, m in zip(rows, local, strict=True):
        assert h["kl/coef"] == m["kl/coef"] and h["reward/mean"] == pytest.approx(m["reward/mean"])
    assert any("samples" in h for h in history)  # the generations table
    runs = [rec.run for rec in _wandb_records(files[0]) if rec.WhichOneof("record_type") == "run"]
    assert runs, "no run record"
    run = runs[0]
    assert run.run_group == "test-group" and run.job_type == "train"
    assert run.display_name == "adaptive_kl0.05_s0"  # <controller>_kl<target>_s<seed>
    assert run.run_id == (tmp_path / "wandb_id.txt").read_text().strip()
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["ppo"]["kl_mode"] == "sequence" and config["controller"]["name"] == "adaptive"
    assert config["seed"] == 0 and config["steps"] == 2


# ------------------------------------------------------------------------------------- a bad day: W&B outage
def _offline_history(run_dir: Path, n_steps: int) -> tuple[list[dict], list]:
    """(history rows, run records) of the offline W&B run in run_dir, waiting for wandb-core to flush."""
    (path,) = run_dir.glob("run-*.wandb")
    deadline = time.monotonic() + 30
    while True:
        records = _wandb_records(path)
        history = [
            {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in rec.history.item}
            for rec in records
            if rec.WhichOneof("record_type") == "history"
        ]
        if len([h for h in history if "kl/exact" in h]) >= n_steps or time.monotonic() > deadline:
            return history, [rec.run for rec in records if rec.WhichOneof("record_type") == "run"]
        time.sleep(0.5)


def _online_outage(monkeypatch, online):
    """wandb.init: mode=online calls online(settings) (no network is reached); any other mode is the real one."""
    import wandb

    real_init, calls = wandb.init, []

    def init(*args, mode=None, settings=None, **kwargs):
        calls.append({"mode": mode, "init_timeout": settings.init_timeout if settings else None, **kwargs})
        if mode == "online":
            return online(settings)
        return real_init(*args, mode=mode, settings=settings, **kwargs)

    monkeypatch.setattr(wandb, "init", init)
    monkeypatch.setenv("WANDB_MODE", "offline")  # conftest disables W&B; the fallback run must be a real one
    monkeypatch.setenv("WANDB_SILENT", "true")
    return calls


def _assert_outage_fell_back_offline(out: Path, calls: list[dict], caplog, n_steps: int) -> None:
    run_id = (out / "wandb_id.txt").read_text().strip()
    # the online attempt was bounded (wandb's default is 90 s), then one offline run with the same id, same group
    assert [c["mode"] for c in calls] == ["online", "offline"]
    assert calls[0]["init_timeout"] == 3.0 and [c["id"] for c in calls] == [run_id, run_id]
    assert calls[1]["group"] == calls[0]["group"] == "outage"
    # metrics.jsonl is complete
    recs = read_metrics(out)
    assert [r["step"] for r in recs] == list(range(1, n_steps + 1))
    assert all(k in r for r in recs for k in METRICS)
    # the offline run sits in the job dir, under the run's id, and holds every step (a `wandb sync` of it
    # replaces the history of the run with that id: it must not start at the step that failed)
    (run_dir,) = (out / "wandb").glob(f"offline-run-*-{run_id}")
    history, runs = _offline_history(run_dir, n_steps)
    rows = [h for h in history if "kl/exact" in h]
    assert [h["step"] for h in rows] == [r["step"] for r in recs]
    assert [h["kl/coef"] for h in rows] == [r["kl/coef"] for r in recs]
    assert any("samples" in h for h in history)  # the generations table too
    assert runs and runs[0].run_id == run_id and runs[0].run_group == "outage"
    # one warning, with the way to upload it later
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "W&B" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert f"same id {run_id}" in warnings[0]
    assert f"wandb sync {out / 'wandb'}/offline-run-*-{run_id}" in warnings[0]


def _outage_cfg(cache_dir, *overrides):
    from omegaconf import open_dict

    cfg = make_cfg(cache_dir, "steps=2", "wandb.mode=online", "wandb.group=outage", *overrides)
    with open_dict(cfg.wandb):  # a key of its own once the schema has it (wandb.init_timeout, default 10 s)
        cfg.wandb.init_timeout = 3
    return cfg


def test_wandb_init_timeout_falls_back_to_an_offline_run_with_the_same_id(cache_dir, tmp_path, monkeypatch, caplog):
    import wandb

    def unreachable(settings):
        raise wandb.errors.CommError(
            f"Run initialization has timed out after {settings.init_timeout} sec. Please try increasing the timeout "
            "with the `init_timeout` setting"
        )

    calls = _online_outage(monkeypatch, unreachable)
    with caplog.at_level(logging.WARNING, logger="kl_research.runlog"):
        summary = train(_outage_cfg(cache_dir), tmp_path)
    assert summary["status"] == "completed"
    _assert_outage_fell_back_offline(tmp_path, calls, caplog, n_steps=2)
    assert "W&B failed to start (CommError: Run initialization has timed out after 3.0 sec" in caplog.text


class _FlakyOnlineRun:
    """An online run whose second `log` call raises (the connection to W&B goes down at step 2)."""

    def __init__(self):
        self.logged, self.finished_with = [], None
        self.summary = {}

    def define_metric(self, *args, **kwargs):
        pass

    def log(self, rec):
        if len(self.logged) == 1:
            raise ConnectionError("simulated: W&B went away")
        self.logged.append(rec)

    def finish(self, exit_code=None):
        self.finished_with = exit_code


def test_wandb_log_failing_mid_run_continues_in_an_offline_run_with_the_same_id(
    cache_dir, tmp_path, monkeypatch, caplog
):
    flaky = _FlakyOnlineRun()
    calls = _online_outage(monkeypatch, lambda settings: flaky)
    with caplog.at_level(logging.WARNING, logger="kl_research.runlog"):
        summary = train(_outage_cfg(cache_dir), tmp_path)
    assert summary["status"] == "completed"
    assert [r["step"] for r in flaky.logged] == [1]  # step 1 went online, step 2 raised
    assert flaky.finished_with == 1  # the broken online run is closed (failed) before the offline one starts
    _assert_outage_fell_back_offline(tmp_path, calls, caplog, n_steps=2)
    assert "W&B logging failed (ConnectionError: simulated: W&B went away)" in caplog.text


# --------------------------------------------------------------------------------- a bad day: the KL guards
def test_non_finite_kl_stops_and_keeps_last_good_checkpoint(cache_dir, tmp_path, monkeypatch):
    """The reference's log-probs go NaN at step 3 (as a bf16 overflow would): the job stops with the KL guard's
    error before that step updates anything, and the checkpoint of step 2 stays."""
    real, calls = train_mod.rollout, {"n": 0}

    def nan_reference(*args, **kwargs):
        calls["n"] += 1
        batch = real(*args, **kwargs)
        if calls["n"] == 3:
            batch["ref_logp"] = batch["ref_logp"] * float("nan")
        return batch

    monkeypatch.setattr(train_mod, "rollout", nan_reference)
    with pytest.raises(FloatingPointError, match=r"non-finite KL at step \d+: .*'k1': nan.*last good checkpoint"):
        train(make_cfg(cache_dir, "steps=4"), tmp_path)
    assert calls["n"] == 3
    ckpt = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)
    assert ckpt["step"] == 2 and len(ckpt["history"]) == 2
    assert all(torch.isfinite(v).all() for v in ckpt["policy"].values())
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]  # the bad step was never logged
    assert not (tmp_path / "summary.json").exists()


def drift_messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("KL drift:")]


def test_drift_diagnostic_stays_quiet_while_the_controller_can_still_act(cache_dir, tmp_path, caplog):
    """A healthy run: the KL of a short job is still rising far below its target (the old rule, any window mean out of
    [0.5, 2]x target, counted every step from rollout 1, whose KL is 0 by construction), while adaptive's β moves
    freely inside its bounds. Judged from rollout 2 on, with a window of 1: no warning, because β can still correct
    it and the stretch out of the band is shorter than drift_patience. A fixed β is never judged against a target."""
    cfg = make_cfg(
        cache_dir, "steps=4", "controller=adaptive", "controller.horizon=16", "drift_grace=1", "drift_window=1"
    )
    with caplog.at_level(logging.WARNING, logger="kl_research.train"):
        summary = train(cfg, tmp_path / "adaptive")
    recs = read_metrics(tmp_path / "adaptive")
    assert all(r["kl/exact"] < 0.5 * r["kl/target"] for r in recs)  # out of the band all along ...
    assert all(1e-4 < r["kl/coef_next"] < 10 for r in recs) and recs[-1]["kl/coef_next"] < recs[0]["kl/coef"]
    assert [r["kl/drift_warnings"] for r in recs] == [0, 0, 0, 0] and summary["drift_warnings"] == 0  # ... no alarm
    assert drift_messages(caplog) == []
    cfg = make_cfg(cache_dir, "steps=3", "controller=fixed", "controller.target_kl=1000", "drift_grace=1")
    with caplog.at_level(logging.WARNING, logger="kl_research.train"):
        assert train(cfg, tmp_path / "fixed")["drift_warnings"] == 0
    assert drift_messages(caplog) == []


def test_drift_diagnostic_warns_once_when_beta_is_pinned_at_its_upper_bound(cache_dir, tmp_path, caplog):
    """β capped at 0.001 (controller.kl_coef_max, its start) with a target far below the KL the first update adds:
    the controller would raise β and cannot. Every step after the grace counts; the log says it once, with what
    to do."""
    cfg = make_cfg(
        cache_dir,
        "steps=4",
        "controller=adaptive",
        "controller.horizon=16",
        "controller.target_kl=1e-7",
        "controller.init_kl_coef=1e-3",
        "controller.kl_coef_max=1e-3",
        "drift_grace=1",
        "drift_window=2",
        # 32 responses per rollout: with 8, a batch of the 30-step reference's text can hold no word VADER scores, so
        # every advantage is 0, nothing moves and KL stays 0 (it happened under one sampler's draws)
        "ppo.batch_size=32",
        "ppo.minibatch_size=8",
    )
    with caplog.at_level(logging.WARNING, logger="kl_research.train"):
        summary = train(cfg, tmp_path)
    recs = read_metrics(tmp_path)
    assert all(r["kl/coef_next"] == 1e-3 for r in recs) and all(r["kl/exact"] > 1e-6 for r in recs[1:])
    assert [r["kl/drift_warnings"] for r in recs] == [0, 1, 2, 3] and summary["drift_warnings"] == 3
    (message,) = drift_messages(caplog)
    assert re.match(
        r"KL drift: β is at its upper bound 0\.001 and the recent mean KL \S+ nats/token is \S+x the target 1e-07: "
        r"the controller cannot raise β further; lower ppo\.lr \(the per-rollout step\) or raise "
        r"controller\.kl_coef_max$",
        message,
    ), message


def test_a_checkpoint_from_before_the_drift_rule_resumes(cache_dir, tmp_path, caplog):
    """A checkpoint written before drift_grace and drift_patience existed: its config lacks them and its drift state
    is the seed rule's ({warnings, state, window}). It resumes, the count carried on; another drift_patience is no
    reason to refuse a checkpoint either (the diagnostic never changes the trajectory)."""
    train(make_cfg(cache_dir, "steps=2", "checkpoint_every=1"), tmp_path)
    (tmp_path / "summary.json").unlink()  # as if killed after its last checkpoint
    path = tmp_path / train_mod.CHECKPOINT
    ckpt = torch.load(path, weights_only=True)
    config = {k: v for k, v in ckpt["config"].items() if k not in ("drift_grace", "drift_patience")}
    old_drift = {"warnings": 2, "state": "low", "window": [0.0, 1e-5]}
    torch.save({**ckpt, "config": config, "drift": old_drift}, path)
    summary = train(make_cfg(cache_dir, "steps=4", "checkpoint_every=1", "drift_patience=7"), tmp_path)
    assert summary["steps"] == 4 and summary["drift_warnings"] == 2  # nothing judged in the grace (20 rollouts)
    drift = torch.load(path, weights_only=True)["drift"]
    assert drift == {**old_drift, "window": drift["window"], "out_of_band": 0} and len(drift["window"]) == 4


class FakeController:
    """What watch_drift reads of a controller: its name, target, β, bounds and the knob that sets its speed (pid's
    horizon, exponential's gain)."""

    def __init__(self, name="pid", value=0.5, target_kl=0.05, kl_coef_min=1e-4, kl_coef_max=10.0, **knobs):
        self.name, self.value, self.target_kl = name, value, target_kl
        self.kl_coef_min, self.kl_coef_max = kl_coef_min, kl_coef_max
        for k, v in (knobs or ({"horizon": 256.0} if name == "pid" else {"gain": 0.1})).items():
            setattr(self, k, v)


def feed(kls, controller, drift=None, grace=3, window=2, patience=4):
    """Run watch_drift over rollouts 1.. with these KLs; (the state, the messages by rollout)."""
    drift = train_mod.new_drift_state() if drift is None else drift
    said = {}
    for rollout, kl in enumerate(kls, start=1):
        msg = train_mod.watch_drift(drift, kl, rollout, controller, window, grace, patience)
        if msg is not None:
            said[rollout] = msg
    return drift, said


def test_drift_rule_pinned_stuck_grace_and_fixed():
    """The rule on made-up KL sequences (target 0.05, band [0.025, 0.1], grace 3, window 2, patience 4)."""
    far_above = [0.0] + [0.4] * 7
    # β pinned at kl_coef_max (pid's exp(log 10) is not exactly 10) while KL is 8x the target: warns from rollout 4
    drift, said = feed(far_above, FakeController(value=math.exp(math.log(10.0))))
    assert drift["warnings"] == 5 and list(said) == [4]
    assert said[4] == (
        "KL drift: β is at its upper bound 10 and the recent mean KL 0.4 nats/token is 8x the target 0.05: the "
        "controller cannot raise β further; lower ppo.lr (the per-rollout step) or raise controller.kl_coef_max"
    )
    # the same KL with β free to rise: only once out of the band for `patience` rollouts after the grace (4..7)
    drift, said = feed(far_above, FakeController(value=2.0))
    assert drift["warnings"] == 2 and list(said) == [7] and "above 2x for 4 rollouts while β reached 2" in said[7]
    assert "shorten controller.horizon, or lower ppo.lr" in said[7]
    # β at kl_coef_min while KL stays far below the target (an exponential controller: its faster knob is the gain)
    drift, said = feed([0.0, 0.001, 0.001, 0.001, 0.001], FakeController(name="exponential", value=1e-4))
    assert drift["warnings"] == 2 and "β is at its lower bound 0.0001" in said[4]
    drift, said = feed([0.0, 0.001] + [0.001] * 6, FakeController(name="exponential", value=0.2))
    assert "raise controller.gain or set controller.relative_error=true" in said[7]
    # β at a bound that would not correct it (KL high, β at its minimum) is no alarm; back in the band resets
    drift, said = feed([0.0, 0.4, 0.4, 0.4, 0.4, 0.05, 0.05], FakeController(value=1e-4))
    assert drift["warnings"] == 0 and said == {} and drift["out_of_band"] == 0
    # within the grace nothing is judged, whatever KL and β are (rollout 1: KL 0 by construction)
    assert feed([0.0, 9.0, 9.0], FakeController(value=10.0))[0]["warnings"] == 0
    # a fixed β aims at no target: never a warning about it
    assert feed(far_above, FakeController(name="fixed", value=10.0))[0]["warnings"] == 0
    # a checkpoint from before the rule holds the old state (no out_of_band): it resumes
    old = {"warnings": 27, "state": "low", "window": [0.01, 0.02]}
    drift, said = feed([0.4] * 8, FakeController(value=10.0), drift={**train_mod.new_drift_state(), **old})
    assert drift["warnings"] == 27 + 5 and list(said) == [4]


@pytest.mark.slow
def test_sigkilled_train_py_resumes_the_identical_trajectory_and_wandb_run(cache_dir, tmp_path):
    """A real kill: SIGKILL a `python train.py` subprocess after its first checkpoint, rerun the same command, and
    compare with an uninterrupted run: the same records (timing fields aside) and the killed run's W&B id kept."""
    import os
    import signal
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    overrides = [
        *TINY,
        f"cache_dir={cache_dir}",
        "steps=40",
        "checkpoint_every=2",
        "controller=adaptive",
        "controller.horizon=16",
        "wandb.mode=offline",
    ]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}

    def command(out: Path) -> list[str]:
        return [sys.executable, "train.py", *overrides, f"hydra.run.dir={out}"]

    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(command(full), cwd=repo, env=env, check=True, capture_output=True, timeout=600)

    proc = subprocess.Popen(command(killed), cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = killed / train_mod.CHECKPOINT
    deadline = time.monotonic() + 300
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL  # killed mid-run, not finished
    assert ckpt.exists() and not (killed / "summary.json").exists()
    run_id = (killed / "wandb_id.txt").read_text().strip()
    before = read_metrics(killed)
    assert len(before) < 40
    saved_at = torch.load(ckpt, map_location="cpu", weights_only=True)["step"]
    assert saved_at >= 2

    rerun = subprocess.run(command(killed), cwd=repo, env=env, check=True, capture_output=True, timeout=600, text=True)
    a, b = read_metrics(full), read_metrics(killed)
    assert len(b) == 40 and (killed / "summary.json").exists()
    # it resumed rather than starting over: it says so, and the steps up to the checkpoint are the killed process's
    # records, timings included (a run from step 1 would have measured its own)
    assert f"resumed from a checkpoint at step {saved_at} of 40" in rerun.stdout + rerun.stderr
    assert b[:saved_at] == before[:saved_at]
    assert without_timing(a) == without_timing(b)
    assert (killed / "wandb_id.txt").read_text().strip() == run_id  # the resumed W&B run is the killed one
    assert len(list((killed / "wandb").glob(f"offline-run-*-{run_id}"))) >= 1
