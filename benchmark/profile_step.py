"""Where one training step's time goes: torch.profiler over real `train.py` steps (Job.step), by operator.

    python -m benchmark.profile_step                       # the default job, 1 thread (a sweep job's setting)
    python -m benchmark.profile_step --threads 2 --steps 3 threads=2 compile_vocab=true   # any override after
    python -m benchmark.profile_step --shapes --rows 60     # one row per operator and input shapes

Warm-up steps first (allocator, first-call costs), then `--steps` profiled steps; prints the wall time per step, the
top operators by self CPU time, and the share of matrix multiplies and attention (the arithmetic) against everything
else. Run it with nothing else on the machine and record the CPU (`lscpu`)."""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

GEMM_OPS = (
    "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
    "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
    "mkldnn::_linear_pointwise",  # oneDNN's fp32 GEMM (the onednn_fp32 key: the head's, an fp32 trunk's)
)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=6)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--shapes", action="store_true", help="one row per operator and input shapes (which call is slow)")
    ap.add_argument("overrides", nargs="*", help="config overrides for the job, as for train.py")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from torch.profiler import ProfilerActivity, profile

    from kl_research.reference import compose_config
    from kl_research.train import Job

    torch.set_num_threads(args.threads)
    cfg = compose_config([f"threads={args.threads}", "gold.prompts=0", "wandb.mode=disabled",
                          f"steps={args.warmup + args.steps}", *args.overrides])  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        job = Job.setup(cfg, Path(tmp))
        for s in range(args.warmup):
            job.step(s)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=args.shapes) as prof:
            t0 = time.perf_counter()
            for s in range(args.warmup, args.warmup + args.steps):
                job.step(s)
            wall = (time.perf_counter() - t0) / args.steps
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    gemm = sum(e.self_cpu_time_total for e in events if e.key in GEMM_OPS)
    table = prof.key_averages(group_by_input_shape=True) if args.shapes else events
    print(table.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    print(f"{wall:.3f} s/step (profiled, {args.threads} thread(s)); matrix multiplies and attention "
          f"{gemm / total:.0%} of self CPU time, everything else {1 - gemm / total:.0%}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
