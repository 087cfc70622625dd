"""precision=auto on a CPU: the measured probe decides (by a margin), its decision is cached per machine and shape,
reused without probing again, re-probed when the cache is unreadable; explicit precisions and CUDA never probe."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from kl_research import precision_probe, runtime
from kl_research.policy import PolicyWithValue
from kl_research.precision_probe import MARGIN, Workload, auto_precision, cache_file, probe_key

CPU = torch.device("cpu")
WORK = Workload(batch=8, minibatch=4, updates=4, prompt_len=4, response_len=4)


def micro_policy(n_layer: int = 1) -> PolicyWithValue:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=n_layer, n_head=2, n_embd=32, vocab_size=64, n_positions=16)
    return PolicyWithValue.from_reference(GPT2LMHeadModel(config)).eval()


@pytest.fixture
def fake_measure(monkeypatch):
    """Replace the timing with given numbers (seconds per step's model work); counts the probes. The CPU is treated
    as one that must be measured (on an AVX2-only CPU precision=auto would not probe at all)."""
    calls = []
    monkeypatch.setattr(precision_probe, "without_bf16_hardware", lambda cpu: None)

    def install(fp32_s: float, bf16_s: float):
        def measure(policy, work, device):
            calls.append(work)
            return {"fp32_s": fp32_s, "bf16_s": bf16_s, "probe_s": 0.5, "rounds": 3}

        monkeypatch.setattr(precision_probe, "measure", measure)
        return calls

    return install


@pytest.mark.parametrize(
    ("fp32_s", "bf16_s", "chosen"),
    [
        (1.0, 0.5, "bf16"),  # 2× faster
        (1.0, 1 / (MARGIN + 0.01), "bf16"),  # just past the margin
        (1.0, 1 / (MARGIN - 0.02), "fp32"),  # faster, but by less than the margin
        (1.0, 1.3, "fp32"),  # slower (the tiny default on an AMX Xeon)
    ],
)
def test_probe_picks_bf16_only_when_it_is_faster_by_the_margin(tmp_path, fake_measure, fp32_s, bf16_s, chosen):
    calls = fake_measure(fp32_s, bf16_s)
    choice = auto_precision(micro_policy(), WORK, CPU, tmp_path)
    assert (choice.precision, choice.source, len(calls)) == (chosen, "probe", 1)
    assert (choice.fp32_s, choice.bf16_s) == (fp32_s, bf16_s)
    amp = runtime.autocast(CPU, choice.precision)
    assert isinstance(amp, torch.autocast) == (chosen == "bf16")


def test_decision_is_cached_and_reused_without_probing_again(tmp_path, fake_measure):
    calls = fake_measure(0.3, 0.2)
    policy = micro_policy()
    first = auto_precision(policy, WORK, CPU, tmp_path)
    again = auto_precision(policy, WORK, CPU, tmp_path)
    assert len(calls) == 1
    assert (first.source, again.source) == ("probe", "cache")
    assert first.precision == again.precision == "bf16" and (again.fp32_s, again.bf16_s) == (0.3, 0.2)
    path = cache_file(tmp_path, probe_key(policy.lm, WORK))
    files = [p.name for p in path.parent.iterdir() if p.suffix != ".lock"]  # the probe's lock may stay beside it
    assert path.parent == tmp_path / "precision" and files == [path.name]
    rec = json.loads(path.read_text())  # the decision with its measurements and what they were measured on
    assert rec["precision"] == "bf16" and rec["fp32_s"] == 0.3 and rec["bf16_s"] == 0.2
    assert rec["key"]["work"]["minibatch"] == 4 and rec["key"]["threads"] == torch.get_num_threads()
    assert {"model", "flags"} <= set(rec["key"]["cpu"]) and rec["key"]["torch"] == torch.__version__
    assert f"cached in {path}" in first.reason and f"read from the cache {path}" in again.reason


def test_jobs_starting_together_share_one_probe(tmp_path, monkeypatch):
    """A local sweep's jobs start at once: one probes, the others wait for its answer (a lock beside the cache
    file) instead of timing their trunks beside each other's probes and perhaps deciding differently."""
    import threading
    import time

    monkeypatch.setattr(precision_probe, "without_bf16_hardware", lambda cpu: None)
    calls, answers = [], iter([(0.30, 0.20), (0.20, 0.30)])  # a second probe would decide the other way

    def slow_measure(policy, work, device):
        fp32_s, bf16_s = next(answers)
        calls.append(work)
        time.sleep(0.3)  # the others arrive while it measures
        return {"fp32_s": fp32_s, "bf16_s": bf16_s, "probe_s": 0.3, "rounds": 3}

    monkeypatch.setattr(precision_probe, "measure", slow_measure)
    policies = [micro_policy() for _ in range(3)]
    choices = [None] * 3

    def job(i):
        choices[i] = auto_precision(policies[i], WORK, CPU, tmp_path)

    threads = [threading.Thread(target=job, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert {c.precision for c in choices} == {"bf16"}
    assert sorted(c.source for c in choices) == ["cache", "cache", "probe"]
    assert sum("measured by another job" in c.reason for c in choices) == 2


def test_cache_key_changes_with_the_model_and_batch_shapes_and_the_threads(tmp_path, fake_measure):
    calls = fake_measure(1.0, 2.0)
    policy, threads = micro_policy(), torch.get_num_threads()
    base = cache_file(tmp_path, probe_key(policy.lm, WORK))
    other_work = [
        Workload(16, 4, 4, 4, 4),
        Workload(8, 2, 4, 4, 4),
        Workload(8, 4, 8, 4, 4),
        Workload(8, 4, 4, 4, 8),
        Workload(8, 4, 4, 4, 4, scoring_passes=1),  # the policy's numbers from the sampler: one pass fewer
    ]
    keys = {cache_file(tmp_path, probe_key(policy.lm, w)) for w in other_work}
    keys.add(cache_file(tmp_path, probe_key(micro_policy(n_layer=2).lm, WORK)))
    try:
        torch.set_num_threads(threads + 1)
        keys.add(cache_file(tmp_path, probe_key(policy.lm, WORK)))
        auto_precision(policy, WORK, CPU, tmp_path)  # another thread count: a probe of its own
    finally:
        torch.set_num_threads(threads)
    assert base not in keys and len(keys) == len(other_work) + 2
    auto_precision(policy, WORK, CPU, tmp_path)
    auto_precision(policy, Workload(16, 4, 4, 4, 4), CPU, tmp_path)
    assert len(calls) == 3  # the extra-thread key, the base key, the bigger batch: none reused another's
    assert auto_precision(policy, WORK, CPU, tmp_path).source == "cache" and len(calls) == 3


def test_cache_key_carries_the_fp32_gemm_library_only_when_onednn_runs_them(tmp_path):
    """With onednn_fp32 on, fp32's side of the ratio is oneDNN's GEMMs: another key, another probe. Off, the key is
    what it was before the setting existed, so decisions cached then stay valid."""
    from kl_research.runtime import use_onednn_fp32

    policy = micro_policy()
    before = probe_key(policy.lm, WORK)
    use_onednn_fp32(policy.lm, False)
    assert probe_key(policy.lm, WORK) == before and "onednn_fp32" not in before
    use_onednn_fp32(policy.lm, True)
    on = probe_key(policy.lm, WORK)
    assert on["onednn_fp32"] is True and cache_file(tmp_path, on) != cache_file(tmp_path, before)


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "",
        '{"precision": "bf16"}',  # fields missing
        None,  # a valid record whose numbers contradict its decision
    ],
)
def test_a_corrupt_cache_file_is_probed_again_not_a_crash(tmp_path, fake_measure, caplog, content):
    calls = fake_measure(1.0, 2.0)
    policy = micro_policy()
    path = cache_file(tmp_path, probe_key(policy.lm, WORK))
    auto_precision(policy, WORK, CPU, tmp_path)
    if content is None:
        rec = json.loads(path.read_text())
        content = json.dumps({**rec, "precision": "bf16"})  # bf16 is 2× slower in its own numbers
    path.write_text(content)
    with caplog.at_level(logging.WARNING, logger="kl_research.precision_probe"):
        choice = auto_precision(policy, WORK, CPU, tmp_path)
    assert (choice.precision, choice.source, len(calls)) == ("fp32", "probe", 2)
    assert "probing again" in caplog.text and str(path) in caplog.text
    assert json.loads(path.read_text())["precision"] == "fp32"  # replaced by a valid record
    assert auto_precision(policy, WORK, CPU, tmp_path).source == "cache" and len(calls) == 2


def test_reason_names_the_choice_and_the_numbers(tmp_path, fake_measure):
    fake_measure(0.25, 0.2)
    choice = auto_precision(micro_policy(), WORK, CPU, tmp_path)
    assert choice.reason.startswith(
        "bf16 trunk 1.25× faster (≥ 1.20× needed) in a 0.5 s probe (fp32 0.25 s, bf16 0.2 s"
    )
    assert "4 fwd+bwd of 4×8 tokens + 2 scoring fwd of 8×8 + generating 8×4" in choice.reason
    fake_measure(0.25, 0.31)
    slower = auto_precision(micro_policy(), WORK, CPU, tmp_path / "other")
    assert slower.precision == "fp32" and slower.reason.startswith("bf16 trunk 1.24× slower in a 0.5 s probe")
    fake_measure(0.25, 0.24)
    close = auto_precision(micro_policy(), WORK, CPU, tmp_path / "third")
    assert close.precision == "fp32" and close.reason.startswith("bf16 trunk only 1.04× faster (< the 1.20× needed)")
    assert close.record() == {
        "precision": "fp32",
        "precision_source": "probe",
        "precision_reason": close.reason,
        "precision_fp32_s": 0.25,
        "precision_bf16_s": 0.24,
    }


def test_explicit_precision_and_cuda_never_probe():
    def probe():
        raise AssertionError("probed")

    for p in ("fp32", "bf16"):
        for dev in (CPU, torch.device("cuda")):
            choice = runtime.resolve_precision(dev, p, probe)
            assert (choice.precision, choice.source, choice.fp32_s) == (p, "explicit", None)
    cuda = runtime.resolve_precision(torch.device("cuda"), "auto", probe)
    assert (cuda.precision, cuda.source) == ("bf16", "cuda") and "no probe" in cuda.reason
    picked = runtime.PrecisionChoice("fp32", "probe", "measured")
    assert runtime.resolve_precision(CPU, "auto", lambda: picked) is picked
    with pytest.raises(ValueError, match="resolved precision"):
        runtime.autocast(CPU, "auto")  # "auto" must be resolved first


@pytest.mark.parametrize("passes", [2, 1])
def test_the_real_probe_times_both_precisions_and_leaves_the_policy_and_rng_alone(passes):
    policy = micro_policy()
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    work = WORK if passes == 2 else Workload(8, 4, 4, 4, 4, scoring_passes=passes)
    m = precision_probe.measure(policy, work, CPU)
    assert torch.equal(torch.rand(3), expected_draw)  # the global RNG is where it was
    assert all(torch.equal(v, before[k]) for k, v in policy.state_dict().items())
    assert all(p.grad is None for p in policy.parameters())
    assert m["fp32_s"] > 0 and m["bf16_s"] > 0 and m["rounds"] >= 1
    ratio = m["fp32_s"] / m["bf16_s"]
    assert precision_probe.done(m["rounds"], ratio, m["probe_s"])  # it stopped by its own rule
    for p in ("fp32", "bf16"):  # step = updates × update + scoring passes × score + generate
        step = work.updates * m["update_s"][p] + passes * m["score_s"][p] + m["generate_s"][p]
        assert m[f"{p}_s"] == pytest.approx(step) and m["generate_s"][p] > 0


def test_the_probe_costs_in_proportion_to_what_it_must_tell_apart():
    """One timed round when bf16 is far from the margin either way (≥ 1.25x slower, as on AVX2-only CPUs, or ≥ 1.8x
    faster); at least 3 rounds and then a time budget when it is close; never more than REPS[1]."""
    done, (lo, hi), budget = precision_probe.done, precision_probe.REPS, precision_probe.BUDGET_S
    assert done(1, 1 / 8, 0.1) and done(1, 0.79, 0.1) and done(1, 1.81, 0.1)  # decisive: one round
    assert not done(1, 1.1, 100.0) and not done(2, 0.85, 100.0)  # close: not before REPS[0] rounds
    assert not done(lo, 1.1, budget / 2) and done(lo, 1.1, budget + 0.1)  # then until the budget is spent
    assert done(hi, 1.2, 0.0)
    assert not done(0, 1 / 8, 100.0)  # nothing timed yet


AVX2_ONLY = {"model": "AMD EPYC", "arch": "x86_64", "id": "AuthenticAMD 25 1", "flags": ["avx2"], "capability": "AVX2"}


@pytest.mark.parametrize(
    ("cpu", "probed"),
    [
        ({**AVX2_ONLY, "amx": False}, False),  # Zen 3: no bf16 arithmetic, fp32 without a probe
        ({**AVX2_ONLY, "amx": False, "flags": ["avx512_bf16", "avx512f", "avx2"]}, True),  # Zen 4/5: measured
        ({**AVX2_ONLY, "amx": False, "flags": ["avx512f", "avx2"]}, True),  # AVX-512 without BF16: measured
        ({**AVX2_ONLY, "amx": True, "flags": ["amx_tile", "amx_bf16", "avx512f", "avx2"]}, True),  # AMX Xeon
        ({**AVX2_ONLY, "amx": False, "arch": "aarch64", "flags": []}, True),  # ARM: measured
        ({**AVX2_ONLY, "amx": False, "flags": []}, True),  # x86 without AVX2: not what the rule was measured on
    ],
)
def test_a_cpu_without_bf16_hardware_is_not_probed(tmp_path, monkeypatch, cpu, probed):
    """On an x86 CPU with AVX2 but neither AVX-512 nor AMX precision=auto is fp32 at once, says why, and caches
    nothing; every other CPU is measured."""
    calls = []

    def measure(policy, work, device):
        calls.append(work)
        return {"fp32_s": 1.0, "bf16_s": 0.5, "probe_s": 0.5, "rounds": 1}

    monkeypatch.setattr(precision_probe, "cpu_features", lambda: cpu)
    monkeypatch.setattr(precision_probe, "measure", measure)
    choice = precision_probe.auto_precision(micro_policy(), WORK, CPU, tmp_path)
    assert bool(calls) == probed
    if probed:
        assert (choice.precision, choice.source) == ("bf16", "probe")
    else:
        assert (choice.precision, choice.source, choice.fp32_s) == ("fp32", "cpu", None)
        assert "no bf16 hardware" in choice.reason and "AMD EPYC" in choice.reason
        assert not (tmp_path / "precision").exists()


def test_the_probe_cli_answers_help_without_composing_a_config(capsys, monkeypatch):
    """`python -m kl_research.precision_probe --help` prints what the command does; it used to hand "--help" to
    Hydra's compose as an override and fail with a parse traceback."""

    def no_compose(*_args, **_kwargs):
        raise AssertionError("--help must not compose a config")

    monkeypatch.setattr("kl_research.reference.compose_config", no_compose)
    for flag in ("--help", "-h"):
        precision_probe.main([flag])
        out = capsys.readouterr().out
        assert "python -m kl_research.precision_probe [--fresh] [overrides]" in out
