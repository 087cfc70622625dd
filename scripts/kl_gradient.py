"""Which KL gradient buys more reward per nat? The fixed-β frontiers of several KL modes, side by side, for one
algorithm (PPO: results/kl_gradient, issue 19; GRPO with TRL's loss+k3 beside the default: results/grpo/kl_modes).

    python scripts/kl_gradient.py frontier --sweep multirun/kg_sequence/<time> \
        --sweep multirun/kg_loss/<time> --sweep multirun/kg_reward/<time> --out results/kl_gradient
    python scripts/kl_gradient.py frontier --sweep results/grpo/runs --sweep results/grpo/frontier_runs \
        --sweep results/grpo/k3_frontier_runs --out results/grpo/kl_modes
    python scripts/kl_gradient.py variance [--policy multirun/kg_sequence/<time>/fixed_b0.5_s0/policy]

A --sweep is a sweep dir or a folder of run dirs, of one KL mode; its fixed-β runs are used (a grid's fixed arm
included). Several may share a mode if no (β, seed) repeats; all must be one algorithm (algo.name).

Writes <out>/:
- frontier.csv: one row per (mode, β): mode, the gradient it has (full/partial), ppo.kl_mode/kl_penalty, β,
  n/n_seeds, tail reward, tail KL, Δ perplexity, kl_step2, approx_kl_mean, each mean [95 % Student-t] over seeds.
- at_targets.csv: per (mode, target): reward on the frontier at that KL, interpolated per seed (linear in log KL
  between the seed's two bracketing β) and then a Student-t interval over the seeds; and the *paired* difference
  to the other modes on the same seeds (the frontiers share seeds 0..n−1).
- controllability.csv: per mode, docs/sweeps.md's checks (monotone; smallest β ≥ 2 × the largest target; largest β
  ≤ the smallest target / 2; each target spanned 2× both ways).
- scores.csv: one row per run (tail metrics), frontier.png (the frontiers and reward at equal KL), command.txt.

`variance` measures how noisy each full-gradient mode's KL gradient is (the task score set to 0, β = 1, no whitening,
no value baseline, λ = 1: the KL part alone), writing <out>/variance.csv:
- exactly, on enumerated tabular policies (kl_research.tabular): E‖g − E g‖² of the one-response estimate g;
- on the embedded default's real rollouts: R independent rollouts of batch 64 from a trained policy (--policy, a
  run's policy/ dir; default: the reference itself moved by nothing, i.e. KL 0, which is uninformative), the
  gradient of PPO's minibatch loss over the whole batch w.r.t. every parameter, and E‖g − ḡ‖² / ‖ḡ‖² over the rollouts.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from kl_research import analysis as A  # noqa: E402
from kl_research.kl import gradient_kind  # noqa: E402

LABELS = {
    ("sequence", "exact"): "sequence+exact",
    ("loss", "exact"): "loss+exact",
    ("loss", "k2"): "loss+k2",
    ("reward", "k1"): "reward+k1",
    ("loss", "k3"): "loss+k3",
}
COLORS = {"sequence+exact": "C3", "loss+exact": "C0", "reward+k1": "C2", "loss+k2": "C4", "loss+k3": "C1"}


def load_mode(sweep_dir: str | Path) -> pd.DataFrame:
    """Per-run tail metrics of the fixed-β runs of a sweep, with its KL mode (one mode per sweep, refused
    otherwise). Runs of other controllers in the same dir (a grid's adaptive, pid, ...) are left out."""
    sweep = A.load_sweep(sweep_dir)
    scores = A.attach_config(A.score_runs(sweep.curves, targets=A.GRID_TARGETS), sweep.configs)
    runs = scores[scores["controller"] == "fixed"].drop_duplicates("run").copy()
    if runs.empty:
        raise ValueError(f"{sweep_dir}: no fixed-β runs (controller=fixed) to draw a frontier from")
    A.require_one_variant(runs, f"the frontier of {sweep_dir}")
    pair = (runs["ppo.kl_mode"].iloc[0], runs["ppo.kl_penalty"].iloc[0])
    runs["mode"] = LABELS.get(pair, "+".join(pair))
    runs["gradient"] = gradient_kind(*pair)
    return runs


def seed_curve(g: pd.DataFrame, kl: float) -> float:
    """One seed's tail reward at tail KL `kl`, linear in log KL between its two bracketing β (NaN outside)."""
    g = g[g["kl"] > 0].sort_values("kl")
    x, y = np.log(g["kl"].to_numpy(float)), g["reward"].to_numpy(float)
    if len(g) < 2 or not (x[0] <= math.log(kl) <= x[-1]):
        return math.nan
    return float(np.interp(math.log(kl), x, y))


def at_targets(runs: pd.DataFrame, targets=A.GRID_TARGETS) -> pd.DataFrame:
    per_seed = {
        (mode, t): {int(s): seed_curve(g, t) for s, g in m.groupby("seed")}
        for mode, m in runs.groupby("mode")
        for t in targets
    }
    modes = sorted(runs["mode"].unique())
    rows = []
    for (mode, t), by_seed in sorted(per_seed.items()):
        mean, lo, hi, _, n = A.t_interval(list(by_seed.values()))
        row = {"mode": mode, "target_kl": t, "reward_mean": mean, "reward_lo": lo, "reward_hi": hi, "n": n}
        for other in modes:
            if other == mode:
                continue
            o = per_seed[(other, t)]
            diffs = [by_seed[s] - o[s] for s in sorted(set(by_seed) & set(o))]
            d_mean, d_lo, d_hi, _, d_n = A.t_interval(diffs)
            row |= {f"minus_{other}_mean": d_mean, f"minus_{other}_lo": d_lo, f"minus_{other}_hi": d_hi}
            row[f"minus_{other}_n"] = d_n
        rows.append(row)
    return pd.DataFrame(rows)


def one_algorithm(runs: pd.DataFrame) -> str:
    """The one algorithm (algo.name) of all the sweeps' runs; frontiers of PPO and GRPO are never drawn as one."""
    # runs from before the algo group record no algo.name: they were PPO (KEY_DEFAULTS)
    recorded = runs.get("algo.name", pd.Series(A.KEY_DEFAULTS["algo.name"], index=runs.index))
    algos = sorted(recorded.astype(str).unique())
    if len(algos) != 1:
        raise ValueError(f"the sweeps mix algorithms (algo.name: {', '.join(algos)}); compare KL modes within one")
    return algos[0]


def plot(
    front: pd.DataFrame, at: pd.DataFrame, targets=A.GRID_TARGETS, algo: str = "ppo", runs: pd.DataFrame | None = None
) -> plt.Figure:
    """Left: each mode's frontier, mean and 95 % t-interval per β, with every seed's run as a faint dot (with 3
    seeds a t-interval of KL can reach below 0: its whisker then runs to the axis' edge). Right: reward at equal KL."""
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11.5, 4.4))
    for mode, f in front.groupby("mode"):
        f = f.sort_values("kl_mean")
        c = COLORS.get(mode)
        if runs is not None:
            r = runs[(runs["mode"] == mode) & (runs["kl"] > 0)]
            ax.scatter(r["kl"], r["reward"], s=9, color=c, alpha=0.35, lw=0, zorder=1)
        xerr = [f["kl_mean"] - f["kl_lo"], f["kl_hi"] - f["kl_mean"]]
        yerr = [f["reward_mean"] - f["reward_lo"], f["reward_hi"] - f["reward_mean"]]
        grad = f["gradient"].iloc[0]
        ax.errorbar(
            f["kl_mean"],
            f["reward_mean"],
            xerr=xerr,
            yerr=yerr,
            fmt="o-",
            ms=4,
            color=c,
            capsize=2,
            label=f"{mode} ({grad} gradient)",
        )
        for _, r in f.iterrows():
            ax.annotate(
                f"{r['init_kl_coef']:g}",
                (r["kl_mean"], r["reward_mean"]),
                fontsize=6,
                color=c,
                xytext=(3, -8),
                textcoords="offset points",
            )
    for t in targets:
        ax.axvline(t, color="0.85", lw=0.8, zorder=0)
    ax.set_xscale("log")
    ax.set_xlabel("tail KL(π‖π_ref), nats/token (last 25 % of rollouts)")
    ax.set_ylabel("tail reward")
    n = int(front["n_seeds"].min())
    ax.set_title(f"{algo.upper()}: fixed-β frontiers (β annotated; mean, 95 % t-interval; dots: {n} seeds)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    modes = sorted(at["mode"].unique())
    width = 0.8 / len(modes)
    for i, mode in enumerate(modes):
        a = at[at["mode"] == mode].sort_values("target_kl")
        x = np.arange(len(a)) + (i - (len(modes) - 1) / 2) * width
        err = [a["reward_mean"] - a["reward_lo"], a["reward_hi"] - a["reward_mean"]]
        bx.errorbar(x, a["reward_mean"], yerr=err, fmt="o", color=COLORS.get(mode), capsize=3, label=mode)
    bx.set_xticks(range(len(targets)), [f"{t:g}" for t in targets])
    bx.set_xlabel("KL (nats/token) at which the frontier is read")
    bx.set_ylabel("tail reward at equal KL")
    bx.set_title("reward at equal KL (per-seed interpolation, 95 % t-interval)", fontsize=9)
    bx.legend(fontsize=7)
    fig.tight_layout()
    return fig


def frontier_main(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = pd.concat([load_mode(d) for d in args.sweep], ignore_index=True)
    algo = one_algorithm(runs)
    twice = runs[runs.duplicated(["mode", "init_kl_coef", "seed"], keep=False)]
    if len(twice):  # two --sweep dirs of one mode (a frontier and a grid's fixed arm) share a (β, seed)
        pairs = sorted({(m, float(b), int(s)) for m, b, s in twice[["mode", "init_kl_coef", "seed"]].to_numpy()})
        raise ValueError(f"(mode, β, seed) found in more than one --sweep dir, it would count twice: {pairs}")
    fronts, checks = [], []
    for mode, m in runs.groupby("mode"):
        f = A.frontier(m)
        f.insert(0, "gradient", m["gradient"].iloc[0])
        f.insert(0, "mode", mode)
        fronts.append(f)
        c = A.controllability(f.drop(columns=["mode", "gradient"]))
        checks.append(c.checks.assign(mode=mode))
    front = pd.concat(fronts, ignore_index=True)
    front.to_csv(out / "frontier.csv", index=False)
    at = at_targets(runs)
    at.to_csv(out / "at_targets.csv", index=False)
    ctrl = pd.concat(checks, ignore_index=True)
    ctrl[["mode", *[c for c in ctrl.columns if c != "mode"]]].to_csv(out / "controllability.csv", index=False)
    cols = [
        "algo.name",
        "mode",
        "gradient",
        "ppo.kl_mode",
        "ppo.kl_penalty",
        "init_kl_coef",
        "seed",
        "run",
        "steps",
        "reward",
        "kl",
        "ppl_change",
        "kl_step2",
        "approx_kl_mean",
    ]
    runs[[c for c in cols if c in runs]].sort_values(["mode", "init_kl_coef", "seed"]).to_csv(
        out / "scores.csv", index=False
    )
    fig = plot(front, at, algo=algo, runs=runs)
    fig.savefig(out / "frontier.png", dpi=130)
    (out / "command.txt").write_text("python " + " ".join(shlex.quote(a) for a in sys.argv) + "\n")
    pd.set_option("display.width", 200)
    print(front[["mode", "init_kl_coef", "n", "kl_mean", "kl_lo", "kl_hi", "reward_mean", "reward_lo", "reward_hi"]])
    print(at.round(4).to_string())
    print(ctrl[["mode", "check", "passed", "value"]].to_string())


def tabular_variance() -> pd.DataFrame:
    from kl_research.tabular import case

    rows = []
    for kind, seed, kw in [
        ("structured", 2, {"scale": 1.0}),
        ("structured", 3, {"scale": 0.8}),
        ("structured", 6, {"T": 4, "V": 3}),
        ("random", 0, {}),
        ("random", 1, {"scale": 0.3}),
    ]:
        tab = case(kind, seed, **kw)
        _, _, kl = tab.sequence_kl_grad()
        for mode, penalty in [("reward", "k1"), ("sequence", "exact")]:
            var, sq = tab.gradient_variance(mode, penalty)
            rows.append(
                {
                    "source": f"tabular {kind} seed {seed} V={tab.V} T={tab.T}",
                    "kl_per_token": kl,
                    "mode": f"{mode}+{penalty}",
                    "baseline": "none",
                    "rollouts": "exact",
                    "variance": var,
                    "mean_sq": sq,
                    "relative_variance": var / sq,
                }
            )
    return pd.DataFrame(rows)


def lm_variance(policy_dir: str | None, rollouts: int, seed: int) -> pd.DataFrame:
    import contextlib

    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    from kl_research import ppo
    from kl_research.algos import PPO
    from kl_research.data import build_prompts, load_corpus
    from kl_research.kl import masked_mean
    from kl_research.policy import PolicyWithValue
    from kl_research.reference import compose_config, load_reference
    from kl_research.rollout import rollout
    from kl_research.runtime import seed_everything
    from kl_research.tabular import trainer_pcfg

    torch.set_num_threads(1)
    cfg = compose_config([])
    ref, tok = load_reference(cfg)
    ref.eval().requires_grad_(False)
    policy = PolicyWithValue.from_reference(ref, detach_value_head=True)
    if policy_dir:
        policy.lm.load_state_dict(AutoModelForCausalLM.from_pretrained(policy_dir).state_dict())
    policy.eval()
    corpus = load_corpus(cfg.data)
    prompts_all = build_prompts(corpus.train, tok, cfg.data.prompt_tokens, cfg.data.num_prompts, cfg.seed)
    seed_everything(seed)
    gen = torch.Generator().manual_seed(seed)
    # reward+k1 with "loo": the same leave-one-out per-position baseline subtracted from its returns here (the trainer
    # gives reward mode a learned value instead), so that both modes are measured with and without one
    arms = [
        ("reward", "k1", "none"),
        ("reward", "k1", "loo"),
        ("sequence", "exact", "none"),
        ("sequence", "exact", "loo"),
    ]
    grads: dict[tuple, list] = {a: [] for a in arms}
    kls = []
    params = list(policy.lm.parameters())
    P = prompts_all.shape[1]
    for _ in tqdm(range(rollouts), desc="rollouts"):
        prompts = prompts_all[torch.randint(len(prompts_all), (cfg.ppo.batch_size,), generator=gen)]
        batch = rollout(
            policy,
            ref,
            prompts,
            response_length=cfg.ppo.response_length,
            temperature=1.0,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            amp=contextlib.nullcontext(),
            keep_ref_logprobs=True,
        )
        batch = {k: v.clone() for k, v in batch.items()}  # out of inference mode (as policy_update's minibatch slices)
        batch["values"] = torch.zeros_like(batch["logp"])  # no value baseline: the KL part alone
        kls.append(float(masked_mean(batch["exact_kl"], batch["mask"])))
        logits, values = policy.score(batch["seqs"], P)
        logprobs = torch.log_softmax(logits.float(), -1)
        for mode, penalty, base in arms:
            pcfg = trainer_pcfg(mode, penalty, kl_baseline=base)
            adv, ret = PPO(pcfg).advantages(batch, torch.zeros(len(prompts)), 1.0)
            if mode == "reward" and base == "loo":
                adv = adv - ppo.leave_one_out_baseline(adv, batch["mask"])
            loss, _ = PPO(pcfg).loss(logprobs, values, batch, adv, ret, 1.0)
            g = torch.autograd.grad(loss, params, retain_graph=True)
            grads[(mode, penalty, base)].append(torch.cat([x.reshape(-1) for x in g]).double())
    where = Path(policy_dir).parent.name if policy_dir else "reference"
    rows = []
    for (mode, penalty, base), gs in grads.items():
        G = torch.stack(gs)
        mean = G.mean(0)
        var = float((G - mean).square().sum(1).mean() * len(gs) / (len(gs) - 1))
        sq = float(mean.square().sum()) - var / len(gs)  # unbiased ‖E g‖²
        rows.append(
            {
                "source": f"tiny LM, batch {cfg.ppo.batch_size}, policy {where}",
                "kl_per_token": float(np.mean(kls)),
                "mode": f"{mode}+{penalty}",
                "baseline": base,
                "rollouts": len(gs),
                "variance": var,
                "mean_sq": sq,
                "relative_variance": var / sq,
            }
        )
    return pd.DataFrame(rows)


def variance_main(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    df = tabular_variance()
    if args.rollouts:
        df = pd.concat([df, lm_variance(args.policy, args.rollouts, args.seed)], ignore_index=True)
    df.to_csv(out / "variance.csv", index=False)
    (out / "variance_command.txt").write_text("python " + " ".join(shlex.quote(a) for a in sys.argv) + "\n")
    print(df.to_string())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("frontier", help="compare fixed-β frontiers of several KL modes")
    f.add_argument("--sweep", action="append", required=True, help="a fixed-β sweep dir (one KL mode); repeat")
    f.add_argument("--out", default="results/kl_gradient")
    v = sub.add_parser("variance", help="the variance of each full mode's KL gradient (tabular exact; tiny LM)")
    v.add_argument("--policy", default=None, help="a run's policy/ dir to measure at (default: the reference)")
    v.add_argument("--rollouts", type=int, default=16, help="rollouts on the tiny LM (0: tabular only)")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--out", default="results/kl_gradient")
    args = p.parse_args(argv)
    if args.cmd == "frontier":
        frontier_main(args)
    else:
        variance_main(args)


if __name__ == "__main__":
    main()
