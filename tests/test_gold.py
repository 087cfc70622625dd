"""Gold vs proxy (docs/gold.md): the second gold scorer (AFINN), the learned reward model (kl_research/reward_model.py:
its cache key, that it learns the gold, that it is what the policy is trained on) and the gold evaluation on held-out
prompts (kl_research/gold.py: what it measures, that it never moves the training trajectory), in tiny training runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import afinn
import numpy as np
import pytest
import torch
from conftest import TINY_OVERRIDES, tiny_job
from hydra import compose, initialize_config_dir

import kl_research.config  # noqa: F401  (registers the schemas)
from kl_research import gold as gold_mod
from kl_research import reward_model as rm
from kl_research.data import build_prompts, load_corpus
from kl_research.reference import compose_config
from kl_research.rewards import AfinnReward, SentimentReward
from kl_research.train import Job, train

CONF = str(Path(__file__).resolve().parents[1] / "conf")
TIMING = ("time/", "throughput/", "memory/")
GOLD_KEYS = ["eval/gold_reward", "eval/gold2_reward", "eval/proxy_reward"]
# a learned RM small enough to build inside a 2-step job in about a second (its quality is not the question there)
SMALL_RM = ["reward=learned", "reward.n_labels=40", "reward.test_labels=20", "reward.epochs=2"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("gold_cache")


def job_cfg(cache_dir, *overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=[*tiny_job(30), "threads=1", f"cache_dir={cache_dir}", *overrides])


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def without(recs: list[dict], prefixes: tuple[str, ...]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(prefixes)} for r in recs]


# ------------------------------------------------------------------------------------------------- AFINN
def test_afinn_is_offline_and_squashed_by_tanh_of_sum_over_5():
    assert (Path(afinn.__file__).parent / "data" / "AFINN-en-165.txt").is_file()  # the lexicon ships in the package
    score = AfinnReward()
    # good = +3, terrible = awful = -3, outstanding = +5 (AFINN-165); no lexicon word: 0
    out = score(["", "", "", "ignored"], ["good", "terrible, awful day", "outstanding and good", "the table"])
    want = [math.tanh(3 / 5), math.tanh(-6 / 5), math.tanh(8 / 5), 0.0]
    assert out.tolist() == pytest.approx(want, abs=1e-6)
    assert out.dtype == torch.float32 and SentimentReward()([""], ["good"]).item() > 0  # both gold scorers agree here


def test_afinn_lexicon_sum_is_afinns_score():
    """AfinnReward's own matcher (one dict lookup per word run) against the afinn package's regex, on 4000 fortunes
    (every 4th of the corpus: quotes, dialogue, punctuation, capitals) and 3000 strings built to stress it: lexicon
    entries and phrases ("does not work", "can't stand") glued by spaces, hyphens, apostrophes, underscores, digits,
    nothing, in upper case, with non-ASCII letters whose lower case changes length."""
    import random

    from kl_research.data import read_fortunes

    mine, theirs = AfinnReward(), afinn.Afinn(language="en", emoticons=False)
    texts = read_fortunes()[::4][:4000]
    rng = random.Random(0)
    words = [*theirs._dict, "not", "kind", "of", "some", "cant", "-", "'", "_", "1", "é", "İ", "ß", "x"]
    seps = [" ", "  ", "\n", "-", "'", ",", ".", "_", "", "\t", "!"]
    for _ in range(3000):
        t = "".join(rng.choice(words) + rng.choice(seps) for _ in range(rng.randint(1, 12)))
        texts.append(t.upper() if rng.random() < 0.2 else t)
    got = [mine.lexicon_sum(t) for t in texts]
    want = [theirs.score(t) for t in texts]
    assert sum(w != 0 for w in want) > 3000  # the texts hit the lexicon
    assert [t for t, g, w in zip(texts, got, want, strict=True) if g != w] == []


# --------------------------------------------------------------------------------------------- cache key
def test_reward_model_cache_key_is_its_inputs_and_nothing_else():
    base = [*tiny_job(30), "reward=learned", "reward.n_labels=500"]
    corpus = load_corpus(compose_config(base).data)

    def key(*overrides):
        return rm.reward_model_key(compose_config([*base, *overrides]), corpus)[0]

    k = key()
    # what determines the RM changes the key: n, the trunk (the model group), any RM setting, the labels' sampling
    for change in ("reward.n_labels=2000", "model.n_layer=2", "model.n_embd=64", "reward.lr=3e-4", "reward.seed=1",
                   "ppo.response_length=12", "ppo.temperature=0.7", "data.prompt_tokens=6"):  # fmt: skip
        assert key(change) != k, change
    # what does not, does not: the PPO seed, the controller, β, the gold evaluation, W&B, the model's eval cadence
    for same in ("seed=3", "controller=pid", "controller.init_kl_coef=2", "gold.prompts=8", "wandb.mode=offline",
                 "model.eval_every=7", "steps=5"):  # fmt: skip
        assert key(same) == k, same
    assert (
        rm.reward_model_key(compose_config(base), load_corpus(compose_config([*base, "data.max_texts=1400"]).data))[0]
        != k
    )  # another corpus
    cfg = compose_config([*base, "cache_dir=/x"])
    assert rm.reward_model_dir(cfg, corpus) == Path("/x/reward_model") / f"learned-{k[:16]}"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", r"reward\.n_labels=0 is invalid; allowed: an int >= 10"),
        ("-500", r"reward\.n_labels=-500 is invalid; allowed: an int >= 10"),
        ("2.5", r"reward\.n_labels=2\.5"),  # not an int: refused when Hydra composes, naming the key
        ("many", r"reward\.n_labels=many"),
    ],
)
def test_a_bad_n_labels_fails_before_anything_loads(cache_dir, tmp_path, monkeypatch, value, message):
    import kl_research.reference as reference

    def no_loading(*a, **k):
        raise AssertionError("model loaded before validation")

    monkeypatch.setattr(reference, "load_reference", no_loading)
    with pytest.raises(Exception, match=message):
        train(job_cfg(cache_dir, "reward=learned", f"reward.n_labels={value}"), tmp_path)


# ---------------------------------------------------------------------------------------- the learned RM
def test_reward_model_learns_the_gold_and_is_cached(tiny_reference):
    """On the session's tiny reference (2 layers × 64, built in seconds), 2000 gold labels give an RM whose held-out
    scores clearly track the gold; the build is cached, its splits are clean, and LearnedReward scores as it was
    evaluated, whatever the padding of the batch."""
    ref_cfg = tiny_reference[0]
    cfg = compose_config(
        [*TINY_OVERRIDES, f"cache_dir={ref_cfg.cache_dir}", "threads=1", "reward=learned", "reward.n_labels=2000",
         "reward.test_labels=500", "reward.epochs=8"]
    )  # fmt: skip
    path, built = rm.ensure_reward_model(cfg, "cpu")
    assert built and rm.ensure_reward_model(cfg, "cpu") == (path, False)  # the second call finds it
    meta = rm.reward_model_meta(path)
    assert meta["key_sha256"] == rm.reward_model_key(cfg, load_corpus(cfg.data))[0]
    test = meta["test"]
    assert test["n"] == 500 and test["pearson"] > 0.12 and test["spearman"] > 0.08 and test["accuracy"] > 0.6, test
    assert meta["n_train"] + meta["n_val"] == 2000 and meta["n_val"] == 400  # ceil(0.2 · 2000)
    assert 1 <= meta["best_epoch"] <= meta["epochs_run"] <= 8 and len(meta["history"]) == meta["epochs_run"]
    best = max(h["val_pearson"] for h in meta["history"])
    assert meta["history"][meta["best_epoch"] - 1]["val_pearson"] == best  # the kept weights are the best epoch's
    rows = [json.loads(line) for line in (path / "data.jsonl").read_text().splitlines()]
    texts = {s: [r["text"] for r in rows if r["split"] == s] for s in ("train", "val", "test")}
    assert [len(texts[s]) for s in ("train", "val", "test")] == [1600, 400, 500]
    every = [t for s in texts.values() for t in s]
    assert len(set(every)) == len(every)  # deduplicated, and no test text among the labels it learned from
    # labels standardised by the training split for training; the score calibrated back to the gold's units
    train_gold = np.array([r["gold"] for r in rows if r["split"] == "train"])
    assert (meta["label_mean"], meta["label_sd"]) == pytest.approx((train_gold.mean(), train_gold.std()))
    # the reward the trainer gets reproduces the reported agreement, in the gold's units: its score is the least-squares
    # line through the validation labels (a head left in standardised units would miss the gold by far more than its
    # spread), and a text scores the same alone or padded
    val_gold = np.array([r["gold"] for r in rows if r["split"] == "val"])
    reward = rm.LearnedReward(path)
    val_pred = reward([""] * 400, texts["val"]).numpy()
    assert np.polyfit(val_pred, val_gold, 1) == pytest.approx([1.0, 0.0], abs=1e-4)  # calibrated: gold ≈ 0 + 1·score
    pred = reward([""] * 500, texts["test"]).numpy()
    gold = np.array([r["gold"] for r in rows if r["split"] == "test"])
    again = rm.agreement(pred, gold)
    assert (again["pearson"], again["mse"]) == pytest.approx((test["pearson"], test["mse"]), abs=1e-6)
    assert test["mse"] < 1.5 * gold.var() and abs(pred.mean() - gold.mean()) < gold.std()
    short = next(t for t in texts["test"] if 0 < len(t) < 20)
    alone = reward([""], [short]).item()
    padded = reward(["", ""], [short, max(texts["test"], key=len)])[0].item()
    empty = reward([""], [""]).item()  # an empty response is read at its BOS
    assert alone == pytest.approx(padded, abs=1e-5) and math.isfinite(empty)


def test_agreement_hand_computed():
    pred, gold = np.array([0.1, 0.2, 0.2, 0.9]), np.array([0.0, 0.5, -0.5, 0.5])
    a = rm.agreement(pred, gold)
    # pairs with different gold: (0,1) ok, (0,2) wrong, (1,2) tie in pred → ½, (0,3) ok, (2,3) ok; (1,3) same gold
    assert a["accuracy"] == pytest.approx((1 + 0 + 0.5 + 1 + 1) / 5)
    assert a["mse"] == pytest.approx(np.mean((pred - gold) ** 2))
    assert a["pearson"] == pytest.approx(np.corrcoef(pred, gold)[0, 1])
    assert math.isnan(rm.agreement(np.zeros(4), gold)["pearson"])  # a constant RM has no correlation


# ------------------------------------------------------------------------------------ the gold evaluation
def test_gold_eval_samples_held_out_prompts_in_a_fork_of_the_rng(tiny_reference):
    _, model, tokenizer, corpus = tiny_reference
    cfg = compose_config([*TINY_OVERRIDES, "gold.prompts=24", "ppo.batch_size=8", "ppo.minibatch_size=4"])
    ev = gold_mod.GoldEval.of(cfg, corpus.heldout, tokenizer)
    assert ev.prompts.shape == (24, cfg.data.prompt_tokens)
    # held-out prompts: each is the start of a held-out text (a quote that never trained the reference or made a
    # training prompt; two quotes may still begin with the same 8 tokens), the same set whatever the run's seed
    held_rows = {tuple(r) for r in build_prompts(corpus.heldout, tokenizer, cfg.data.prompt_tokens, None, 0).tolist()}
    assert {tuple(r) for r in ev.prompts.tolist()} <= held_rows
    other_seed = gold_mod.GoldEval.of(compose_config([*TINY_OVERRIDES, "gold.prompts=24", "seed=5"]), corpus.heldout,
                                      tokenizer)  # fmt: skip
    assert torch.equal(other_seed.prompts, ev.prompts) and other_seed.seed != ev.seed
    vader = SentimentReward()
    state = torch.get_rng_state()
    out = ev.measure(model, vader)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random stream is untouched
    assert out == ev.measure(model, vader)  # every evaluation draws with the run's seed
    # the numbers are the scorers' means over one response per prompt, drawn as a rollout draws them
    with gold_mod.seeded_rng(ev.seed, torch.device("cpu")):
        texts_p, responses = gold_mod.sample_responses(
            model, tokenizer, ev.prompts, temperature=1.0, response_length=cfg.ppo.response_length, batch_size=8
        )
    assert len(responses) == 24 and all(isinstance(r, str) for r in responses)
    assert out["gold_reward"] == pytest.approx(float(vader(texts_p, responses).mean()))
    assert out["gold2_reward"] == pytest.approx(float(AfinnReward()(texts_p, responses).mean()))
    assert out["proxy_reward"] == out["gold_reward"]  # the proxy here is the gold itself
    assert gold_mod.GoldEval.of(compose_config([*TINY_OVERRIDES, "gold.prompts=0"]), corpus.heldout, tokenizer) is None


def test_a_learned_reward_run_logs_gold_beside_proxy_and_trains_on_the_proxy(cache_dir, tmp_path):
    """reward=learned, 2 steps: eval/gold_reward, eval/gold2_reward, eval/proxy_reward (and π_ref's) in metrics.jsonl
    at the eval step and in summary.json; the reward the policy was trained on is the learned RM's score of each
    sample, not VADER's; and the RM built inside the job leaves the trajectory as if it had been cached."""
    fresh = tmp_path / "fresh_cache"
    cfg = job_cfg(fresh, "steps=2", "gold.prompts=16", *SMALL_RM)
    summary = train(cfg, tmp_path / "built")
    recs = read_metrics(tmp_path / "built")
    assert not any(k in recs[0] for k in GOLD_KEYS)  # eval_every=2: step 2 only
    for k in GOLD_KEYS:
        assert math.isfinite(recs[1][k]) and math.isfinite(recs[1][k + "_ref"]), k
        name = k.removeprefix("eval/")
        assert summary[name] == recs[1][k] and summary[name + "_ref"] == recs[1][k + "_ref"]  # tail: step 2
    on_disk = json.loads((tmp_path / "built" / "summary.json").read_text())
    assert {"gold_reward", "gold2_reward", "proxy_reward"} <= set(on_disk)
    # the proxy's own agreement with the gold, from its meta.json, beside the run's numbers
    meta = rm.reward_model_meta(next((fresh / "reward_model").glob("learned-*/")))
    for k in ("pearson", "spearman", "accuracy"):  # NaN where the tiny test RM's predictions are constant
        a, b = on_disk[f"proxy_test_{k}"], meta["test"][k]
        assert a == b or (math.isnan(a) and math.isnan(b)), k
    assert on_disk["proxy_n_labels"] == meta["n_labels"]
    # the policy's reward is the proxy: the job's reward function is the learned RM of the cache, and every sample's
    # logged reward is its score
    (path,) = (fresh / "reward_model").glob("learned-*/")
    job = Job.setup(cfg, tmp_path / "setup_only")
    assert isinstance(job.reward_fn, rm.LearnedReward) and job.reward_fn.path == path
    # ... and the gold's prompts are held-out ones (the start of a held-out text)
    corpus = load_corpus(cfg.data)
    held = {tuple(r) for r in build_prompts(corpus.heldout, job.tokenizer, cfg.data.prompt_tokens, None, 0).tolist()}
    assert len(job.gold.prompts) == 16 and {tuple(r) for r in job.gold.prompts.tolist()} <= held
    samples = [json.loads(line) for line in (tmp_path / "built" / "samples.jsonl").read_text().splitlines()]
    prompts, responses = [s["prompt"] for s in samples], [s["response"] for s in samples]
    logged = torch.tensor([s["reward"] for s in samples])
    assert torch.allclose(logged, rm.LearnedReward(path)(prompts, responses), atol=1e-5)
    # a second job finds the RM cached and runs the identical trajectory
    train(cfg, tmp_path / "cached")
    assert without(recs, TIMING) == without(read_metrics(tmp_path / "cached"), TIMING)


def test_the_gold_evaluation_leaves_the_training_trajectory_alone(cache_dir, tmp_path):
    """The same job with the gold evaluation on and off (gold.prompts=0) samples the same tokens and logs the same
    numbers, the gold's aside; and a checkpoint made with it off resumes with it on."""
    on = train(job_cfg(cache_dir, "steps=3", "gold.prompts=16"), tmp_path / "on")
    off = train(job_cfg(cache_dir, "steps=3", "gold.prompts=0"), tmp_path / "off")
    a, b = read_metrics(tmp_path / "on"), read_metrics(tmp_path / "off")
    assert all(k in a[1] for k in GOLD_KEYS) and not any(k in r for r in b for k in GOLD_KEYS)
    assert without(a, (*TIMING, "eval/gold", "eval/proxy")) == without(b, TIMING)
    assert math.isnan(off["gold_reward"]) and math.isfinite(on["gold_reward"])
