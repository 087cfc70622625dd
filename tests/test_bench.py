"""The benchmark runs the real trainer on a tiny shape and emits its JSON keys (no timing assertions)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmark import bench

KEYS = {
    "seconds",
    "gen_tokens_per_s",
    "train_tokens_per_s",
    "peak_rss_mb",
    "threads",
    "device",
    "versions",
    "floor_seconds",
    "overhead",
}
PHASES = {"generate", "score", "advantages", "update", "total"}


@pytest.fixture
def tiny_shape(monkeypatch):
    shape = {"n_layer": 1, "n_head": 2, "n_embd": 32, "vocab_size": 256, "n_positions": 32}
    monkeypatch.setitem(bench.SHAPES, "micro", shape)
    threads = torch.get_num_threads()
    yield "micro"
    torch.set_num_threads(threads)


def test_bench_tiny_shape_is_the_embedded_default_reference():
    """The bench's (and TRL's) tiny model has the architecture of the reference `python train.py` builds."""
    from kl_research.reference import GPT2_ACTIVATION, compose_config

    tiny = compose_config([]).model  # the Hydra-composed model group the reference builder reads
    shape = bench.model_shape("tiny")  # plain YAML, for TRL's venv
    assert shape["activation_function"] == GPT2_ACTIVATION
    assert {k: shape[k] for k in bench.DIMS} == {k: tiny[k] for k in bench.DIMS}
    _, policy, _ = bench.build_models("tiny")
    assert policy.lm.config.activation_function == GPT2_ACTIVATION and policy.lm.config.n_layer == tiny["n_layer"]


def test_bench_cli_emits_one_json_line(tiny_shape, capsys):
    argv = ["--shape", tiny_shape, "--batch", "4", "--minibatch", "2", "--epochs", "1"]
    bench.main([*argv, "--prompt-len", "4", "--response-len", "4", "--warmup", "1", "--steps", "1", "--threads", "1"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    rec = json.loads(lines[0])
    assert KEYS <= set(rec)
    assert PHASES <= set(rec["seconds"])
    assert {"generate", "score", "update"} <= set(rec["floor_seconds"]) and set(rec["overhead"]) >= {"generate"}
    assert rec["threads"] == 1 and rec["device"] == "cpu" and rec["epochs"] == 1
    assert all(v > 0 for v in rec["seconds"].values())


def test_tiny_default_shape_is_the_config():
    """model_shape("tiny") (plain YAML, for TRL's venv) is exactly the GPT2Config arguments of the embedded default
    reference: every dimension as Hydra composes conf/model/tiny.yaml, its activation, and nothing else (the dict
    goes into GPT2Config(**dims): an extra key would time another model). Unknown shapes are refused."""
    from kl_research.reference import GPT2_ACTIVATION, compose_config

    tiny = compose_config([]).model
    assert bench.model_shape("tiny") == {**{k: tiny[k] for k in bench.DIMS}, "activation_function": GPT2_ACTIVATION}
    assert all(type(v) is int for k, v in bench.model_shape("tiny").items() if k in bench.DIMS)
    with pytest.raises(ValueError, match=r"shape='tinyy'; valid: tiny, "):
        bench.model_shape("tinyy")


def test_bf16_trunk_keeps_batch_kl(tiny_shape):
    """bf16 autocast of the trunk (logits in fp32) moves the batch KL of a moved policy by far less than 0.01."""
    rec = bench.kl_noise_floor(tiny_shape, batch_size=16, prompt_len=4, response_len=8, move=0.5, threads=1)
    assert rec["fp32"]["exact"] > 1e-3  # the policy has moved
    assert rec["abs_err"]["exact"] < 1e-3 and rec["abs_err"]["k1"] < 1e-3


@pytest.mark.parametrize("sampler", ["hf", "fast"])
def test_rollout_scores_each_model_once(tiny_shape, sampler):
    """No forward pass done twice: one full-sequence trunk pass each for policy (+values) and reference. The fast
    sampler decodes with its own loop over the same weights, so the policy's trunk module runs only to score."""
    import contextlib

    from kl_research.rollout import rollout

    ref, policy, dims = bench.build_models(tiny_shape)
    P, R = 4, 6
    seen = {"policy": [], "ref": []}

    def hook(name):
        def record(module, args, kwargs, out):
            ids = args[0] if args else kwargs.get("input_ids")
            seen[name].append(ids.shape[1])

        return record

    for name, lm in (("policy", policy.lm), ("ref", ref)):
        lm.base_model.register_forward_hook(hook(name), with_kwargs=True)
    prompts = torch.randint(1, dims["vocab_size"], (3, P))
    rollout(
        policy,
        ref,
        prompts,
        response_length=R,
        temperature=1.0,
        eos_token_id=None,
        pad_token_id=0,
        amp=contextlib.nullcontext(),
        sampler=sampler,
    )
    # the reference scores the rollout once (all but the last token, whose output predicts nothing we use)
    assert seen["ref"] == [P + R - 1]
    assert seen["policy"].count(P + R - 1) == 1  # generation (prompt, then 1 token per step, KV cache) + 1 score
    if sampler == "hf":
        assert sorted(set(seen["policy"]) - {P + R - 1}) == [1, P]
    else:
        assert seen["policy"] == [P + R - 1]


def test_gemm_recorder_counts_and_times_the_matmuls():
    """Every mm/addmm/bmm of forward and backward is recorded with its shape; the floor sums 2·m·k·n per call."""
    from benchmark.gemm import GemmRecorder, gemm_floor

    x = torch.randn(8, 5, requires_grad=True)
    w = torch.randn(5, 3, requires_grad=True)
    b = torch.randn(4, 6, 7)
    with GemmRecorder() as rec:
        (x @ w).sum().backward()  # forward mm + 2 backward mms (grad x, grad w)
        torch.bmm(b, torch.randn(4, 7, 2))
    with GemmRecorder() as rec_inf, torch.inference_mode():  # linear is not decomposed here: still counted
        torch.nn.functional.linear(torch.randn(2, 8, 5), torch.randn(3, 5))
    floor = gemm_floor(rec.calls + rec_inf.calls, repeats=2)
    assert floor["calls"] == 5
    assert floor["gflop"] * 1e9 == pytest.approx(3 * 2 * 8 * 5 * 3 + 2 * 4 * 6 * 7 * 2 + 2 * 16 * 5 * 3)
    assert floor["seconds"] > 0 and len(floor["by_shape"]) == 5
    assert x.grad is not None and w.grad.shape == (5, 3)  # the work itself ran normally


def test_gemm_recorder_counts_onednn_linears():
    """The head's GEMMs through oneDNN (onednn_fp32) are GEMMs too: recorded, timed alone with the same op, linear's
    FLOPs; without this the bench's "GEMMs alone" left the head out whenever the key was on."""
    from benchmark.gemm import GemmRecorder, gemm_floor
    from kl_research.runtime import onednn_fp32_reason, onednn_linear

    if onednn_fp32_reason() is not None:
        pytest.skip(f"no oneDNN here: {onednn_fp32_reason()}")
    with GemmRecorder() as rec:
        onednn_linear(torch.randn(6, 5), torch.randn(3, 5), torch.randn(3))
        onednn_linear(torch.randn(6, 5), torch.randn(3, 5), torch.randn(3))
    floor = gemm_floor(rec.calls, repeats=2)
    assert floor["calls"] == 2 and len(floor["by_shape"]) == 1 and floor["by_shape"][0]["op"] == "_linear_pointwise"
    assert floor["gflop"] * 1e9 == pytest.approx(2 * (2 * 6 * 5 * 3))
    assert floor["seconds"] > 0


def test_score_lm_equals_the_full_forward(tiny_shape):
    """Dropping the last token and projecting only response positions leaves the numbers we use unchanged."""
    ref, policy, dims = bench.build_models(tiny_shape)
    P, R = 5, 7
    seqs = torch.randint(1, dims["vocab_size"], (3, P + R))
    with torch.no_grad():
        logits, values = policy.score(seqs, P)
        full = policy.lm(seqs)
        ref_logits, no_values = bench_score(ref, seqs, P)
    assert no_values is None
    torch.testing.assert_close(logits, full.logits[:, P - 1 : -1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ref_logits, ref(seqs).logits[:, P - 1 : -1], rtol=1e-5, atol=1e-5)
    assert values.shape == (3, R)


def bench_score(lm, seqs, P):
    from kl_research.policy import score_lm

    return score_lm(lm, seqs, P)


def test_temperature_one_skips_the_division_bit_for_bit():
    from kl_research.kl import exact_token_kl, tempered

    x = torch.randn(2, 3, 50)
    assert tempered(x, 1.0) is x  # no pass over the logits at T = 1
    torch.testing.assert_close(tempered(x, 0.7), x / 0.7, rtol=0, atol=0)
    y = torch.randn(2, 3, 50)
    assert torch.equal(
        exact_token_kl(x, y, 1.0),
        (torch.log_softmax(x / 1.0, -1).exp() * (torch.log_softmax(x / 1.0, -1) - torch.log_softmax(y / 1.0, -1))).sum(
            -1
        ),
    )


def test_fused_gelu_is_gpt2_gelu_new(tiny_shape):
    """The trainer's loader swaps gelu_new for the fused tanh-GELU: same outputs to fp32 rounding."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from kl_research.policy import fuse_activations

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=16)).eval()
    x = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        before = model(x).logits
        assert fuse_activations(model) == 2 and fuse_activations(model) == 0
        after = model(x).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_side_by_side_reports_each_jobs_step_and_the_machine_throughput(tmp_path):
    """benchmark/side_by_side.py: J bench processes at once with T threads each; throughput = Σ 60 / (s per step)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "sbs.jsonl"
    argv = ["--layouts", "2x1", "--rounds", "1", "--batch", "8", "--minibatch", "4", "--steps", "1", "--out", str(out)]
    res = subprocess.run(
        [sys.executable, "benchmark/side_by_side.py", *argv], cwd=root, capture_output=True, text=True, check=True
    )
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    (steps,) = summary["layouts"]["2x1"]["step_s"]
    assert len(steps) == 2 and all(s > 0 for s in steps)
    assert summary["layouts"]["2x1"]["steps_per_min"][0] == pytest.approx(sum(60 / s for s in steps), rel=1e-2)
    jobs = [json.loads(line) for line in out.read_text().splitlines()[:-1]]
    assert [(j["threads"], j["batch_size"], j["layout"]) for j in jobs] == [(1, 8, "2x1")] * 2


def test_bench_precision_auto_is_resolved_as_the_trainer_does(tiny_shape, monkeypatch, tmp_path, capsys):
    """`--precision auto` on a CPU: the same cached probe as train(); the record says what ran and why."""
    from kl_research import precision_probe

    calls = []

    def measure(policy, work, device):
        calls.append(work)
        return {"fp32_s": 0.3, "bf16_s": 0.2, "probe_s": 0.5, "rounds": 3}

    monkeypatch.setattr(precision_probe, "measure", measure)
    monkeypatch.setattr(precision_probe, "without_bf16_hardware", lambda cpu: None)  # a CPU that is measured
    monkeypatch.setenv("KL_RESEARCH_CACHE", str(tmp_path))
    argv = ["--shape", tiny_shape, "--batch", "4", "--minibatch", "2", "--epochs", "1", "--precision", "auto"]
    for _ in range(2):
        bench.main([*argv, "--prompt-len", "4", "--response-len", "4", "--warmup", "1", "--steps", "1", "--no-floors"])
    first, second = (json.loads(line) for line in capsys.readouterr().out.strip().splitlines())
    assert first["precision"] == second["precision"] == "bf16" and len(calls) == 1
    assert (first["precision_source"], second["precision_source"]) == ("probe", "cache")
    assert calls[0] == precision_probe.Workload(batch=4, minibatch=2, updates=2, prompt_len=4, response_len=4)
    assert "bf16 trunk 1.50× faster" in first["precision_reason"] and first["precision_fp32_s"] == 0.3
