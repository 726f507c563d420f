"""The memory plan (`megatron-po train --dry-run --world-size N`) against measured peak memory of real CPU steps.

    python benchmarks/bench_memory_plan.py [--nproc 2] [--configs all|NAME,...] [--steps 2] [--hidden 256]
        [--layers 4] [--seq 1024] [--vocab 16384] [key=value ...]

Each configuration runs in a torchrun launch of its own (a heap shaped by an earlier configuration would blur the
next one's peak). It (a layout, recompute, packing, log-prob path or reference source) builds the policy, the
reference or its cache, DDP, optimizer and schedule through `megatron_po.train.loop` and runs `--steps` optimizer
steps on the embedded demo data, every row padded to `--seq` (packed: the trainer's own packed rows). Memory is
the kernel's high-water mark of each rank (benchmarks/peak_rss.py) above its resident size when the
configuration starts (the interpreter, torch, megatron and the data are there already, and are not what the plan
counts); the plan is `build_plan` of the same config for the local spec, with the rows (count x length) the
steps really had (packed rows are fewer, and as long as the longest of their micro-batch).

Columns: planned and measured MiB of the rank that measured the most, measured / planned, and the plan's three
largest terms. The plan is meant to hold within +-20%; on GPU the CUDA context, NCCL buffers and the caching
allocator add what the plan's headroom is for (torch.cuda.max_memory_allocated is the comparable number there).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import warnings

import torch.distributed as dist

warnings.filterwarnings("ignore", category=UserWarning)
warnings.filterwarnings("ignore", category=FutureWarning)

from bench_step import launch_child, run_data, run_state, step_batches  # noqa: E402  (benchmarks/bench_step.py)
from peak_rss import PeakRSS  # noqa: E402

from megatron_po.config import load_config  # noqa: E402
from megatron_po.memory_plan import ROWS, build_plan  # noqa: E402
from megatron_po.parallel.groups import init_parallel, init_process_group, teardown  # noqa: E402
from megatron_po.train.loop import train_step  # noqa: E402
from megatron_po.train.precompute import precompute_reference  # noqa: E402

MiB = 2**20

# name -> (overrides, micro-batches per step): different TP / SP / PP / recompute / packing / log-prob / reference /
# LoRA
CONFIGS = {
    "tp1_dp2": ([], 1),
    "tp2_sp_selective": (["parallel.tp=2", "parallel.sp=true", "model.recompute=selective"], 1),
    "tp1_dp2_full_packed": (["model.recompute=full", "data.packing=true", "train.micro_batch_size=24"], 1),
    "pp2_logits": (["parallel.pp=2", "model.logprobs=logits"], 2),
    "tp2_cache": (["parallel.tp=2", "reference.source=cache"], 2),
    # LoRA: a frozen base, adapters only in DDP and the optimizer, the policy with its adapters off as reference
    "tp1_dp2_lora": (["model.lora.rank=16"], 1),
}


def measure(cfg, objective, groups, tokenizer, ds, steps: int, seq: int, mem: PeakRSS) -> tuple[int, int]:
    """(bytes above the start of this configuration at its peak, the most rows a micro-batch had, its longest row)."""
    mem.start()
    start = mem.proc.memory_info().rss
    _, state, policy, reference, sampler = run_state(cfg, objective, groups, tokenizer, ds)
    rows = length = 0
    for it in range(steps):
        batches = step_batches(cfg, ds, sampler, it, seq, tokenizer.pad_id, groups)
        rows = max(rows, *(b.rows.tokens.shape[0] for b in batches))
        length = max(length, *(b.rows.tokens.shape[1] for b in batches))
        train_step(state, batches)
    peak = mem.stop() - start
    del state, policy, reference  # the reference model goes with its source
    return peak, rows, length


def run_config(name: str, args) -> None:
    """One configuration, under torchrun: prints `RESULT {json}` on rank 0."""
    overrides, micro_batches = CONFIGS[name]
    base = [f"output_dir={args.output_dir}", f"model.hidden_size={args.hidden}",
            f"model.ffn_hidden_size={int(round(args.hidden * 2.75 / 8)) * 8}", f"model.num_layers={args.layers}",
            f"model.num_attention_heads={args.heads}", "model.num_query_groups=2", f"model.max_seq_length={args.seq}",
            f"model.vocab_size={args.vocab}", "model.spec=local", f"train.micro_batch_size={args.micro_batch}",
            "train.progress_bar=false", "checkpoint.save=false", "checkpoint.resume=false", "objective.name=dpo",
            f"reference.cache_path={args.output_dir}/cache_{name}", *overrides, *args.overrides]
    cfg = load_config(None, base + ["train.global_batch_size=96"])  # any multiple: replaced below
    init_process_group(cfg.parallel)
    rank, world = dist.get_rank(), dist.get_world_size()
    dp = world // (cfg.parallel.tp * cfg.parallel.pp)
    cfg = load_config(None, base + [f"train.global_batch_size={cfg.train.micro_batch_size * dp * micro_batches}",
                                    f"train.train_steps={args.steps}"])
    groups = init_parallel(cfg.parallel, seed=cfg.train.seed)
    try:
        objective, family, tokenizer, ds = run_data(cfg)
        if cfg.reference.source == "cache":
            precompute_reference(cfg, objective, family, groups)
        peak, rows, length = measure(cfg, objective, groups, tokenizer, ds, args.steps, args.seq, PeakRSS())
        found = [None] * world
        dist.all_gather_object(found, (peak, rows, length, groups.pp_rank))
    finally:
        teardown()
    if rank == 0:
        peak, _, _, stage = max(found)
        rows, length = max(f[1] for f in found), max(f[2] for f in found)
        plan = build_plan(cfg, family, world, rows=rows, row_tokens=length, te=False, device_type="cpu",
                          needs_reference=objective.needs_reference).stages[stage]
        terms = sorted(((getattr(plan, key), label) for label, key in ROWS), reverse=True)[:3]
        print("RESULT " + json.dumps({"name": name, "stage": stage, "planned": plan.total, "measured": peak,
                                      "rows": f"{rows}x{length}",
                                      "terms": ", ".join(f"{lb} {v / MiB:.0f}" for v, lb in terms)}), flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="all", help=f"comma list of {sorted(CONFIGS)} or all")
    p.add_argument("--nproc", type=int, default=2, help="ranks per launch")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024, help="rows padded to (and packed up to) this many tokens")
    p.add_argument("--vocab", type=int, default=16384, help="model.vocab_size (the tokenizer's is 512)")
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=2, help="optimizer steps (Adam's state exists from the first)")
    p.add_argument("--output-dir", default=os.path.join(tempfile.gettempdir(), "megatron_po_bench_plan"))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    logging.getLogger("megatron_po").setLevel(logging.ERROR)
    if args.child:
        run_config(args.child, args)
        return 0
    names = sorted(CONFIGS) if args.configs == "all" else args.configs.split(",")
    table = []
    for name in names:
        passed = [a for a in sys.argv[1:] if not a.startswith("--configs") and a not in (*names, args.configs)]
        r = launch_child(__file__, name, args.nproc, passed)
        table.append(r)
        print(f"{name}: planned {r['planned'] / MiB:.0f} MiB, measured {r['measured'] / MiB:.0f} MiB", flush=True)
    print(f"\nworld {args.nproc}, hidden {args.hidden}, {args.layers} layers, seq {args.seq}, vocab {args.vocab}, "
          f"{args.steps} steps, fp32, local spec; MiB of the rank that measured the most, above its start")
    print(f"{'config':<22}{'rows':>9}{'stage':>6}{'planned':>10}{'measured':>10}{'ratio':>8}  "
          "largest planned terms (MiB)")
    for r in table:
        print(f"{r['name']:<22}{r['rows']:>9}{r['stage']:>6}{r['planned'] / MiB:>10.0f}{r['measured'] / MiB:>10.0f}"
              f"{r['measured'] / r['planned']:>8.2f}  {r['terms']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
