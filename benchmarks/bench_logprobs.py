"""Memory and time of the log-prob stage (forward + backward), the fused response-only path beside its anchors.

    python benchmarks/bench_logprobs.py [--tokens 4096] [--hidden 1024] [--vocab 151936] [--chunk 512]
    torchrun --nproc_per_node 2 benchmarks/bench_logprobs.py ...      # TP=2: the vocabulary split over 2 ranks

Every variant scores `--tokens` positions (a response's) against a `--vocab` output layer from hidden states
[t, h] and the weight [V/tp, h] (both fp32, both with grad), then backpropagates a random dL/dlogp:

  naive      logits = hidden @ W^T in full, log_softmax, gather (single process only: the anchor)
  logits     the trainer's former path: the full [t, V/tp] logits, then `vocab_parallel_token_logps`
  fused      `fused_linear_token_logps`: [chunk, V/tp] at a time, recomputed in backward (the trainer's default)

Columns: peak memory growth over the inputs during forward + backward (the kernel's high-water mark of the
process, reset per variant; the weight's own gradient, V/tp x h fp32, is part of it), its ratio to the naive
anchor, and the wall time. With torchrun each rank reports its own growth (the ratio to the 1-process anchor
shows the 1/TP scaling).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

from megatron_po.logprobs import fused_linear_token_logps, vocab_parallel_token_logps
from peak_rss import PeakRSS  # benchmarks/peak_rss.py


def naive(hidden, weight, labels, group):
    logits = hidden @ weight.t()
    return torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def logits_path(hidden, weight, labels, group):
    return vocab_parallel_token_logps((hidden @ weight.t()).unsqueeze(0), labels.unsqueeze(0), group)[0]


def fused(hidden, weight, labels, group, chunk):
    return fused_linear_token_logps(hidden, weight, labels, group, chunk_tokens=chunk)


def measure(fn, hidden, weight, labels, upstream, group) -> tuple[float, float]:
    """(peak growth in bytes over the live inputs, seconds) of forward + backward."""
    hidden.grad = weight.grad = None
    mem = PeakRSS()
    mem.start()
    base = mem.proc.memory_info().rss
    t0 = time.perf_counter()
    (fn(hidden, weight, labels, group) * upstream).sum().backward()
    dt = time.perf_counter() - t0
    peak = mem.stop()
    hidden.grad = weight.grad = None
    return peak - base, dt


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--chunk", type=int, default=256, help="tokens per chunk of the fused path")
    p.add_argument("--variants", default="naive,logits,fused")
    args = p.parse_args()
    group, rank, tp = None, 0, 1
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
        group, rank, tp = dist.group.WORLD, dist.get_rank(), dist.get_world_size()
    if args.vocab % tp:
        p.error(f"--vocab {args.vocab} is not divisible by the world size {tp}")
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.tokens, args.hidden, generator=g).requires_grad_()
    full = torch.randn(args.vocab, args.hidden, generator=g) * args.hidden ** -0.5
    v_local = args.vocab // tp
    weight = full[rank * v_local:(rank + 1) * v_local].clone().requires_grad_()
    del full
    labels = torch.randint(0, args.vocab, (args.tokens,), generator=g)
    upstream = torch.randn(args.tokens, generator=g)
    fns = {"naive": naive, "logits": logits_path, "fused": lambda *a: fused(*a, args.chunk)}
    variants = [v for v in args.variants.split(",") if v and not (v == "naive" and tp > 1)]
    rows = {}
    for name in variants:
        rows[name] = measure(fns[name], hidden, weight, labels, upstream, group)
    if group is not None:
        gathered = [None] * tp
        dist.all_gather_object(gathered, rows)
    else:
        gathered = [rows]
    if rank == 0:
        anchor = gathered[0].get("naive", (None,))[0]
        print(f"\nlog-prob stage fwd+bwd: T={args.tokens} H={args.hidden} V={args.vocab} TP={tp} fp32 "
              f"chunk={args.chunk} threads/rank={torch.get_num_threads()}")
        print("| variant | rank | peak growth MiB | / naive | seconds |")
        print("|---|---|---|---|---|")
        for r, res in enumerate(gathered):
            for name, (growth, dt) in res.items():
                ratio = f"{growth / anchor:.3f}" if anchor else "-"
                print(f"| {name} | {r} | {growth / 2**20:,.0f} | {ratio} | {dt:.1f} |")
        print(f"(the weight's gradient alone: {v_local * args.hidden * 4 / 2**20:,.0f} MiB per rank)")
    if group is not None:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
