"""Memory and time of the log-prob stage (forward + backward), the fused response-only path beside its anchors.

    python benchmarks/bench_logprobs.py [--tokens 4096] [--hidden 1024] [--vocab 151936] [--chunk 0]
                                        [--device cpu|cuda] [--dtype fp32|bf16] [--variants ...]
    torchrun --nproc_per_node 2 benchmarks/bench_logprobs.py ...      # TP=2: the vocabulary split over 2 ranks

Every variant scores `--tokens` positions (a response's) against a `--vocab` output layer from hidden states
[t, h] and the weight [V/tp, h] (both `--dtype`, both with grad), then backpropagates a random dL/dlogp:

  naive       logits = hidden @ W^T in full, log_softmax, gather (single process only: the anchor)
  logits      the full [t, V/tp] logits, then `vocab_parallel_token_logps` (model.logprobs=logits)
  fused_prev  the fused path before issue 19, kept here as the anchor of the new one: chunks of 256, two TP
              all-reduces per chunk, the weight gradient's GEMM in fp32, the fp32 gradient returned cast to the
              weight's dtype
  fused       `fused_linear_token_logps` now: `--chunk` tokens per chunk (0: `auto_chunk_tokens` for the device),
              one all-gather per call, GEMMs in the weight's dtype with fp32 results, the fp32 gradient returned
  fused_ddp   the same with the weight carrying an fp32 `main_grad` (megatron DDP's gradient buffer, allocated
              with the inputs): the gradient accumulates into it, autograd gets a placeholder (the trainer's case)

Columns: peak memory growth over the inputs during forward + backward (CPU: the process's high-water mark, reset
per variant; CUDA: torch.cuda.max_memory_allocated), its ratio to the naive anchor, the TP collectives per call
and the wall time (CUDA: synchronised, after one warm-up call). With torchrun each rank reports its own growth.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

from megatron_po.logprobs import auto_chunk_tokens, fused_linear_token_logps, vocab_parallel_token_logps
from peak_rss import PeakRSS  # benchmarks/peak_rss.py


class _PreviousFusedLogProb(torch.autograd.Function):
    """megatron_po.logprobs._FusedLinearLogProb as it was before issue 19 (the anchor; padded vocabularies
    omitted)."""

    @staticmethod
    def forward(ctx, hidden, weight, target, group, chunk):
        v_local = weight.shape[0]
        start = (dist.get_rank(group) if group is not None else 0) * v_local
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(out)
        for i in range(0, hidden.shape[0], chunk):
            logits = torch.matmul(hidden[i:i + chunk], weight.t()).float()
            local = target[i:i + chunk] - start
            in_range = (local >= 0) & (local < v_local)
            logits_max = logits.max(dim=-1).values
            if group is not None:
                dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
            logits.sub_(logits_max.unsqueeze(-1))
            picked = logits.gather(-1, local.clamp(0, v_local - 1).unsqueeze(-1)).squeeze(-1) * in_range
            both = torch.stack([logits.exp_().sum(dim=-1), picked])
            if group is not None:
                dist.all_reduce(both, group=group)
            log_sum = both[0].log()
            out[i:i + chunk] = both[1] - log_sum
            lse[i:i + chunk] = logits_max + log_sum
            del logits
        ctx.save_for_backward(hidden, weight, target, lse)
        ctx.group, ctx.chunk, ctx.start = group, chunk, start
        return out

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, target, lse = ctx.saved_tensors
        v_local = weight.shape[0]
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        grad = grad.float()
        for i in range(0, hidden.shape[0], ctx.chunk):
            h, g = hidden[i:i + ctx.chunk], grad[i:i + ctx.chunk]
            grad_logits = torch.matmul(h, weight.t()).float()
            grad_logits.sub_(lse[i:i + ctx.chunk].unsqueeze(-1)).exp_().mul_(-g.unsqueeze(-1))
            local = target[i:i + ctx.chunk] - ctx.start
            in_range = (local >= 0) & (local < v_local)
            grad_logits.scatter_add_(-1, local.clamp(0, v_local - 1).unsqueeze(-1), (g * in_range).unsqueeze(-1))
            grad_hidden[i:i + ctx.chunk] = torch.matmul(grad_logits.to(weight.dtype), weight)
            grad_weight.addmm_(grad_logits.t(), h.float())
            del grad_logits
        if ctx.group is not None:
            dist.all_reduce(grad_hidden, group=ctx.group)
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None


def naive(hidden, weight, labels, group, chunk):
    logits = (hidden @ weight.t()).float()
    return torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def logits_path(hidden, weight, labels, group, chunk):
    return vocab_parallel_token_logps((hidden @ weight.t()).unsqueeze(0), labels.unsqueeze(0), group)[0]


def fused_prev(hidden, weight, labels, group, chunk):
    return _PreviousFusedLogProb.apply(hidden, weight, labels, group, 256)


def fused(hidden, weight, labels, group, chunk):
    return fused_linear_token_logps(hidden, weight, labels, group, chunk_tokens=chunk)


VARIANTS = {"naive": naive, "logits": logits_path, "fused_prev": fused_prev, "fused": fused, "fused_ddp": fused}


class CountCollectives:
    """Counts torch.distributed all_reduce / all_gather calls while active."""

    NAMES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor")

    def __enter__(self):
        self.count, self.saved = 0, {n: getattr(dist, n) for n in self.NAMES}

        def counted(fn):
            def call(*a, **k):
                self.count += 1
                return fn(*a, **k)
            return call

        for n, fn in self.saved.items():
            setattr(dist, n, counted(fn))
        return self

    def __exit__(self, *exc):
        for n, fn in self.saved.items():
            setattr(dist, n, fn)


def measure(name, hidden, weight, labels, upstream, group, chunk) -> tuple[float, int, float]:
    """(peak growth in bytes over the live inputs, collectives, seconds) of forward + backward."""
    fn, cuda = VARIANTS[name], hidden.is_cuda
    if name == "fused_ddp":  # megatron DDP's fp32 gradient buffer: allocated with the model, not by the stage
        weight.main_grad = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        weight.grad_added_to_main_grad = False

    def step():
        hidden.grad = weight.grad = None
        (fn(hidden, weight, labels, group, chunk) * upstream).sum().backward()
        hidden.grad = weight.grad = None
        if name == "fused_ddp":
            weight.grad_added_to_main_grad = False

    if cuda:
        step()  # warm-up: kernels, cuBLAS handles, the fp32-output GEMM probe
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        mem = PeakRSS()
        mem.start()
        base = mem.proc.memory_info().rss
    with CountCollectives() as calls:
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if cuda else mem.stop()
    if name == "fused_ddp":
        del weight.main_grad, weight.grad_added_to_main_grad
    return peak - base, calls.count, dt


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--chunk", type=int, default=0, help="tokens per chunk of the fused path (0: auto)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--variants", default="naive,logits,fused_prev,fused,fused_ddp")
    args = p.parse_args()
    group, rank, tp = None, 0, 1
    device = torch.device(args.device)
    if "RANK" in os.environ:
        if args.device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            device = torch.device("cuda", torch.cuda.current_device())
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
        group, rank, tp = dist.group.WORLD, dist.get_rank(), dist.get_world_size()
    if args.vocab % tp:
        p.error(f"--vocab {args.vocab} is not divisible by the world size {tp}")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.tokens, args.hidden, generator=g).to(device, dtype).requires_grad_()
    v_local = args.vocab // tp
    full = torch.randn(args.vocab, args.hidden, generator=g) * args.hidden ** -0.5
    weight = full[rank * v_local:(rank + 1) * v_local].to(device, dtype).requires_grad_()
    del full
    labels = torch.randint(0, args.vocab, (args.tokens,), generator=g).to(device)
    upstream = torch.randn(args.tokens, generator=g).to(device)
    chunk = args.chunk or auto_chunk_tokens(v_local, device.type)
    variants = [v for v in args.variants.split(",") if v and not (v == "naive" and tp > 1)]
    rows = {name: measure(name, hidden, weight, labels, upstream, group, chunk) for name in variants}
    gathered = [rows]
    if group is not None:
        gathered = [None] * tp
        dist.all_gather_object(gathered, rows)
    if rank == 0:
        anchor = gathered[0].get("naive", (None,))[0]
        threads = torch.get_num_threads() if device.type == "cpu" else torch.cuda.get_device_name()
        print(f"\nlog-prob stage fwd+bwd: T={args.tokens} H={args.hidden} V={args.vocab} TP={tp} {args.dtype} "
              f"{device.type} chunk={chunk} (fused_prev: 256) {threads}")
        print("| variant | rank | peak growth MiB | / naive | collectives | seconds |")
        print("|---|---|---|---|---|---|")
        for r, res in enumerate(gathered):
            for name, (growth, calls, dt) in res.items():
                ratio = f"{growth / anchor:.3f}" if anchor else "-"
                print(f"| {name} | {r} | {growth / 2**20:,.0f} | {ratio} | {calls} | {dt:.2f} |")
        size = 4 if dtype == torch.float32 else 2
        print(f"(per rank: the weight's fp32 gradient {v_local * args.hidden * 4 / 2**20:,.0f} MiB, the weight "
              f"{v_local * args.hidden * size / 2**20:,.0f} MiB, one fp32 chunk of logits "
              f"{min(chunk, args.tokens) * v_local * 4 / 2**20:,.0f} MiB)")
    if group is not None:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
