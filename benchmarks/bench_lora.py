"""Full fine-tuning against LoRA: what a step costs on the CPU at one tiny shape, and what the memory plan gives
the 72B / 78B jobs on GPUs.

    python benchmarks/bench_lora.py [--rank 16] [--hidden 256] [--layers 4] [--seq 256] [--vocab 16384]
        [--steps 6] [--warmup 2] [--nproc 1] [key=value ...]

Part 1, measured. Each arm (full fine-tuning, the anchor, then LoRA of rank `--rank` on the four decoder linears)
runs ACPO in a torchrun launch of its own, so one arm's heap does not shape the other's peak. It builds the policy,
the reference (full: a second, frozen model; LoRA: none, the policy with its adapters off), DDP, optimizer and
schedule through `megatron_po.train.loop`, runs `--warmup` untimed and `--steps` timed optimizer steps on the
embedded demo data, every row padded to `--seq`.

  ms/step     median wall time of a timed step (the slowest rank's), and the interquartile range
  GFLOP/step  the trainer's model FLOPs of a step (flops.step_flops: the `flops/step_tflop` metric): LoRA's
              policy backward has no weight gradients for the base
  peak MiB    the kernel's high-water mark of resident memory (benchmarks/peak_rss.py) above the arm's start
              (interpreter, torch, megatron and the data are there already): weights, reference, gradients,
              optimizer state and activations, of the rank that measured the most
  planned     the memory plan of the same job (local spec, CPU), measured / planned, and measured - planned:
              what the plan does not count (the heap's slack, the build's transient copies: 70-100 MiB at the
              default shape in both arms; torch's memory profiler puts LoRA's forward + backward peak of live
              tensors at or below full fine-tuning's, so the gap is not a LoRA term)

The step time covers every padded position (the kernels run them); the model FLOPs count real tokens only.

Part 2, planned. The per-GPU plan (the fullest pipeline stage) of the shipped 72B / 78B configs: full fine-tuning
on 64 GPUs against LoRA on 8 (launch/configs/shapes/*_lora.yaml), for the Transformer-Engine spec the GPU jobs run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", category=UserWarning)
warnings.filterwarnings("ignore", category=FutureWarning)

import torch.distributed as dist  # noqa: E402

from bench_step import launch_child, run_data, run_state, step_batches  # noqa: E402  (benchmarks/bench_step.py)
from peak_rss import PeakRSS  # noqa: E402  (benchmarks/peak_rss.py)

from megatron_po.config import load_config  # noqa: E402
from megatron_po.families import family_spec  # noqa: E402
from megatron_po.flops import step_flops  # noqa: E402
from megatron_po.memory_plan import GiB, RankPlan, build_plan  # noqa: E402
from megatron_po.parallel.groups import init_parallel, init_process_group, teardown  # noqa: E402
from megatron_po.train.batch import BatchWork  # noqa: E402
from megatron_po.train.costs import step_passes  # noqa: E402
from megatron_po.train.loop import train_step  # noqa: E402

MiB = 2**20
REPO = Path(__file__).resolve().parents[1]
SHAPES = REPO / "launch" / "configs" / "shapes"
# (label, config, world size): the anchor (full fine-tuning) next to LoRA for each model
GPU_PLANS = [("Qwen2.5-VL-72B full", "qwen2_5_vl_72b", 64), ("Qwen2.5-VL-72B LoRA", "qwen2_5_vl_72b_lora", 8),
             ("InternVL3-78B full", "internvl3_78b", 64), ("InternVL3-78B LoRA", "internvl3_78b_lora", 8)]


def arms(rank: int) -> dict[str, list[str]]:
    """The two arms' overrides, anchor first."""
    return {"full": [], "lora": [f"model.lora.rank={rank}"]}


# ---- part 1: one arm, under torchrun ---------------------------------------------------------------------------------

def base_overrides(args) -> list[str]:
    return [f"output_dir={args.output_dir}", f"model.hidden_size={args.hidden}",
            f"model.ffn_hidden_size={int(round(args.hidden * 2.75 / 8)) * 8}", f"model.num_layers={args.layers}",
            f"model.num_attention_heads={args.heads}", "model.num_query_groups=2", f"model.max_seq_length={args.seq}",
            f"model.vocab_size={args.vocab}", "model.spec=local", "objective.name=acpo",
            f"train.micro_batch_size={args.micro_batch}", f"train.train_steps={args.warmup + args.steps}",
            "train.progress_bar=false", "checkpoint.save=false", "checkpoint.resume=false"]


def timed_steps(cfg, objective, groups, tokenizer, ds, args, mem: PeakRSS) -> dict:
    """Builds the arm's train state and runs its steps; its times, model FLOPs, peak above its start and rows."""
    mem.start()
    start = mem.proc.memory_info().rss
    family, state, policy, reference, sampler = run_state(cfg, objective, groups, tokenizer, ds)
    passes = step_passes(cfg, objective, reference, state.step.policy_tower, family.model_shape(cfg))
    times, flops, rows, length = [], [], 0, 0
    for it in range(args.warmup + args.steps):
        batches = step_batches(cfg, ds, sampler, it, args.seq, tokenizer.pad_id, groups)
        rows = max(rows, *(b.rows.tokens.shape[0] for b in batches))
        length = max(length, *(b.rows.tokens.shape[1] for b in batches))
        dist.barrier()
        t0 = time.perf_counter()
        train_step(state, batches, it)
        if it >= args.warmup:
            times.append(time.perf_counter() - t0)
            works = [mb.work or BatchWork.of(mb) for mb in batches]
            policy_rows = [sum(v) for v in zip(*(w.policy.scalars() for w in works))]
            reference_rows = [sum(v) for v in zip(*(w.reference.scalars() for w in works))]
            flops.append(step_flops(family.model_shape(cfg), passes, policy_rows, reference_rows)["total"])
    peak = mem.stop() - start
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    return {"times": times, "flops": flops, "peak": peak, "rows": rows, "length": length, "trainable": trainable,
            "reference": cfg.reference.source}


def run_arm(name: str, args) -> None:
    """One arm, under torchrun: prints `RESULT {json}` on rank 0."""
    cfg = load_config(None, base_overrides(args) + ["train.global_batch_size=64"])  # replaced below
    init_process_group(cfg.parallel)
    rank, world = dist.get_rank(), dist.get_world_size()
    overrides = base_overrides(args) + arms(args.rank)[name] + args.overrides
    cfg = load_config(None, overrides + [f"train.global_batch_size={args.micro_batch * world * args.micro_batches}"])
    groups = init_parallel(cfg.parallel, seed=cfg.train.seed)
    try:
        objective, family, tokenizer, ds = run_data(cfg)
        r = timed_steps(cfg, objective, groups, tokenizer, ds, args, PeakRSS())
        found = [None] * world
        dist.all_gather_object(found, r)
    finally:
        teardown()
    if rank == 0:
        worst = max(found, key=lambda f: f["peak"])
        times = [max(ts) for ts in zip(*(f["times"] for f in found))]  # per step, the slowest rank
        plan = build_plan(cfg, family, world, rows=worst["rows"], row_tokens=worst["length"], te=False,
                          device_type="cpu", needs_reference=objective.needs_reference)
        print("RESULT " + json.dumps({"name": name, "times": times, "flops": worst["flops"], "peak": worst["peak"],
                                      "planned": plan.peak, "trainable": worst["trainable"],
                                      "reference": worst["reference"]}), flush=True)


def launch(name: str, args) -> dict:
    """`run_arm(name)` in a torchrun launch of its own."""
    return launch_child(__file__, name, args.nproc, [a for a in sys.argv[1:] if not a.startswith("--child")])


def print_measured(args, results: list[dict]) -> None:
    print(f"\nACPO on the CPU: world {args.nproc} x {os.environ.get('OMP_NUM_THREADS', '1')} thread(s), tiny_vlm "
          f"hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, rows padded to {args.seq} tokens, "
          f"{args.micro_batches} micro-batch(es) of {args.micro_batch} pair(s) per rank and step, fp32; median of "
          f"{args.steps} steps after {args.warmup} warm-up")
    head = (f"| {'arm':<14} | {'trainable':>10} | {'reference':<12} | {'ms/step':>8} | {'IQR ms':>15} | "
            f"{'GFLOP/step':>10} | {'peak MiB':>8} | {'planned':>7} | {'meas/plan':>9} | {'unplanned':>9} |")
    print(head)
    print("|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|")
    for r in results:
        q = statistics.quantiles(r["times"], n=4, method="inclusive") if len(r["times"]) > 1 else r["times"] * 3
        arm = "full (anchor)" if r["name"] == "full" else f"LoRA r={args.rank}"
        print(f"| {arm:<14} | {r['trainable']:>10,} | {r['reference']:<12} | "
              f"{1e3 * statistics.median(r['times']):8.0f} | {1e3 * q[0]:7.0f}-{1e3 * q[2]:<7.0f} | "
              f"{statistics.median(r['flops']) / 1e9:10.1f} | {r['peak'] / MiB:8.0f} | {r['planned'] / MiB:7.0f} | "
              f"{r['peak'] / r['planned']:9.2f} | {(r['peak'] - r['planned']) / MiB:9.0f} |")
    full, lora = results
    print(f"LoRA / full: step time {statistics.median(lora['times']) / statistics.median(full['times']):.2f}, "
          f"model FLOPs {statistics.median(lora['flops']) / statistics.median(full['flops']):.2f}, "
          f"peak memory {lora['peak'] / full['peak']:.2f} (planned {lora['planned'] / full['planned']:.2f})")


# ---- part 2: the GPU jobs' plans -------------------------------------------------------------------------------------

def peak_stage(name: str, world: int) -> tuple[RankPlan, object]:
    """The fullest stage's plan of a shipped config, and its plan."""
    cfg = load_config(SHAPES / f"{name}.yaml")
    plan = build_plan(cfg, family_spec(cfg.model.family), world, 80.0, te=True)
    return max(plan.stages, key=lambda r: r.total), plan


def print_planned() -> None:
    cols = [(label, *peak_stage(name, world), world) for label, name, world in GPU_PLANS]
    rows = [("weights (policy)", lambda r: r.weights_policy), ("weights (reference)", lambda r: r.weights_reference),
            ("gradients (fp32)", lambda r: r.gradients), ("optimizer", lambda r: r.optimizer),
            ("activations", lambda r: r.activations),
            ("log-prob, vision, mask", lambda r: r.logprob_stage + r.vision + r.attention_mask),
            ("total", lambda r: r.total)]
    width = max(len(c[0]) for c in cols) + 2
    print("\nmemory plan, GiB per GPU of the fullest pipeline stage (H100 80 GB, Transformer-Engine spec, ACPO at "
          "12,288 tokens):")
    print(f"{'':<24}" + "".join(f"{c[0]:>{width}}" for c in cols))
    print(f"{'GPUs (tp x pp x dp)':<24}" + "".join(
        f"{f'{w} ({p.tp}x{p.pp}x{p.dp})':>{width}}" for _, _, p, w in cols))
    print(f"{'reference':<24}" + "".join(f"{p.reference:>{width}}" for _, _, p, _ in cols))
    for label, get in rows:
        print(f"{label:<24}" + "".join(f"{get(r) / GiB:>{width}.2f}" for _, r, _, _ in cols))
    # what the job holds over all its GPUs: each stage's total on each of its tp x dp ranks
    print(f"{'all GPUs (GiB)':<24}" + "".join(
        f"{sum(s.total for s in p.stages) * p.tp * p.dp / GiB:>{width},.0f}" for _, _, p, _ in cols))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rank", type=int, default=16, help="LoRA rank of the LoRA arm")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=256, help="rows padded to this many tokens")
    p.add_argument("--vocab", type=int, default=16384, help="model.vocab_size (the tokenizer's is 512)")
    p.add_argument("--micro-batch", type=int, default=1, help="pairs per micro-batch")
    p.add_argument("--micro-batches", type=int, default=2, help="micro-batches per rank and step")
    p.add_argument("--steps", type=int, default=6, help="timed optimizer steps per arm")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (Adam's state exists after the first)")
    p.add_argument("--nproc", type=int, default=1, help="ranks per arm (data parallel)")
    p.add_argument("--output-dir", default=os.path.join(tempfile.gettempdir(), "megatron_po_bench_lora"))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="megatron_po config overrides, key=value (both arms)")
    args = p.parse_args()
    logging.getLogger("megatron_po").setLevel(logging.ERROR)
    if args.child:
        run_arm(args.child, args)
        return 0
    results = []
    for name in arms(args.rank):
        results.append(launch(name, args))
        print(f"{name}: {1e3 * statistics.median(results[-1]['times']):.0f} ms/step, peak "
              f"{results[-1]['peak'] / MiB:.0f} MiB", file=sys.stderr, flush=True)
    print_measured(args, results)
    print_planned()
    return 0


if __name__ == "__main__":
    sys.exit(main())
