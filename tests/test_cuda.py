"""The CUDA path: device=auto picks the GPU, the trunk runs under bf16 autocast (precision=auto), the vocabulary
projection, log-softmax and value head stay fp32. These need a GPU and skip, saying so, where there is none;
`bash benchmark/gpu_check.sh` runs them (and the GPU benchmarks) on a GPU machine."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_job
from test_train import METRICS, assert_kill_and_resume_continues_identical_trajectory, read_metrics

from kl_research.reference import compose_config
from kl_research.train import train

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device on this machine (run on a GPU: bash benchmark/gpu_check.sh)"
)

GPU = [*tiny_job(30), "threads=1", "device=auto", "precision=auto"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ref_cache_cuda")


def gpu_cfg(cache_dir, *overrides):
    return compose_config([*GPU, f"cache_dir={cache_dir}", *overrides])


def test_train_runs_on_the_gpu_with_a_bf16_trunk(cache_dir, tmp_path):
    summary = train(gpu_cfg(cache_dir, "steps=3", "controller=pid", "controller.target_kl=0.05"), tmp_path)
    recs = read_metrics(tmp_path)
    assert [r["step"] for r in recs] == [1, 2, 3]
    for r in recs:
        for k in METRICS:
            assert k in r and math.isfinite(r[k]), k
    # policy == reference at the first rollout: the same bf16 trunk on the same tokens gives KL 0
    assert abs(recs[0]["kl/exact"]) < 1e-6 and abs(recs[0]["kl/k1"]) < 1e-6
    assert summary["status"] == "completed"
    ckpt = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)  # no map_location: as saved
    assert next(iter(ckpt["policy"].values())).is_cuda  # the job really ran on the GPU


def test_gpu_kill_and_resume_continues_the_same_beta_trajectory(cache_dir, tmp_path, monkeypatch):
    cfg = gpu_cfg(cache_dir, "steps=5", "controller=adaptive", "controller.horizon=16")
    assert_kill_and_resume_continues_identical_trajectory(cfg, tmp_path, monkeypatch)


def test_gpu_scoring_matches_the_cpu_in_fp32_and_bf16_kl_error_is_far_below_the_smallest_target():
    from benchmark.bench import build_models, kl_noise_floor
    from kl_research.policy import score_lm

    _ref, policy, dims = build_models("tiny", seed=3)
    g = torch.Generator().manual_seed(0)
    seqs = torch.randint(1, dims["vocab_size"], (8, 40), generator=g)
    with torch.inference_mode():
        cpu_logits, cpu_values = policy.score(seqs, 16)
        policy.cuda()
        gpu_logits, gpu_values = policy.score(seqs.cuda(), 16)
    cpu_lp, gpu_lp = cpu_logits.log_softmax(-1), gpu_logits.float().cpu().log_softmax(-1)
    assert (cpu_lp - gpu_lp).abs().max() < 1e-4  # fp32 on both (TF32 matmuls are off by default)
    assert (cpu_values - gpu_values.cpu()).abs().max() < 1e-4
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        bf16_logits, _ = score_lm(policy.lm, seqs.cuda(), 16)
    assert bf16_logits.dtype == torch.float32  # the head runs in fp32 under autocast

    rec = kl_noise_floor("tiny", batch_size=32, move=1.0, device="cuda")  # a random-init model needs a big move
    assert rec["device"].startswith("cuda")
    assert rec["fp32"]["exact"] > 0.01  # the moved policy is measurably away from the reference
    assert rec["abs_err"]["exact"] < 1e-3 and rec["abs_err"]["k1"] < 1e-3  # ≥10× below a 0.01 target


def test_bench_times_a_gpu_step_against_its_floors():
    from benchmark.bench import bench

    rec = bench("tiny", batch_size=16, warmup=1, steps=2, device="auto", precision="auto")
    assert rec["device"].startswith("cuda") and "gpu" in rec["versions"] and rec["peak_gpu_mb"] > 0
    for k in ("generate", "score", "update", "total"):
        assert 0 < rec["seconds"][k] < 60, k
        assert rec["overhead"][k] > 0, k  # measured / floor: total against the sum of the three floors
    assert set(rec["floor_seconds"]) == {"generate", "score", "update"}  # the bare ops have no "total" of their own
    for k in ("generate", "score", "update"):
        assert 0 < rec["floor_seconds"][k] < 60, k
    assert rec["gemm_floor_seconds"]["update"] > 0
