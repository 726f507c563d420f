"""Padding efficiency of packed micro-batches beside pad-to-longest, on a long-tailed length mix.

    python benchmarks/bench_packing.py [--pairs 4096] [--max-len 12288] [--micro-batch 1,2,4,8] [--dp 8]

Pairs of a VLM preference set: a prompt of `--prompt` tokens (image tokens included, e.g. 256 per 448-px tile)
shared by both rows, and two responses whose lengths are log-normal, clipped to [10, 4000] (median `--median`).
Global batches of `--global-batch` pairs are spread over `--dp` ranks and cut into micro-batches exactly as the
trainer does (train/data.step_micro_batches): a contiguous share per rank, rows padded to the micro-batch's longest
(pad-to-longest), or spread by tokens (data/packing.balance_over_dp) and packed (data/packing.best_packing, rows of
up to `--max-len`). Efficiency = real tokens / processed positions (rows x width), over all micro-batches: the
trainer's `data/padding_efficiency`. Only lengths are needed: no model runs.
"""

from __future__ import annotations

import argparse
import math
import random
import sys

from megatron_po.data.packing import balance_over_dp, best_packing


def micro_batches(costs: list[list[int]], dp: int, mbs: int, packing: bool) -> list[list[list[int]]]:
    """Per micro-batch, the sequence lengths of its pairs (2 per pair)."""
    if packing:
        shares = balance_over_dp([sum(c) for c in costs], dp)
    else:
        per = len(costs) // dp
        shares = [list(range(r * per, (r + 1) * per)) for r in range(dp)]
    return [[costs[i] for i in share[j:j + mbs]] for share in shares for j in range(0, len(share), mbs)]


def processed(pairs: list[list[int]], max_len: int, packing: bool) -> int:
    lengths = [n for pair in pairs for n in pair]
    if not packing:
        return len(lengths) * max(lengths)
    bins = best_packing(lengths, max_len)
    return len(bins) * max(sum(lengths[i] for i in b) for b in bins)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=4096)
    p.add_argument("--global-batch", type=int, default=64)
    p.add_argument("--dp", type=int, default=8)
    p.add_argument("--micro-batch", default="1,2,4,8", help="pairs per micro-batch (comma list)")
    p.add_argument("--max-len", type=int, default=12288)
    p.add_argument("--prompt", type=int, default=300, help="prompt + image tokens per row")
    p.add_argument("--median", type=float, default=150.0, help="median response length")
    p.add_argument("--sigma", type=float, default=1.2, help="log-normal sigma of response lengths")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = random.Random(args.seed)

    def response() -> int:
        return int(min(4000, max(10, round(math.exp(rng.gauss(math.log(args.median), args.sigma))))))

    pairs = [[args.prompt + response(), args.prompt + response()] for _ in range(args.pairs)]
    pairs = [pair for pair in pairs if max(pair) <= args.max_len]  # the dataset drops pairs too long, as here
    batches = [pairs[i:i + args.global_batch] for i in range(0, len(pairs) - args.global_batch + 1, args.global_batch)]
    real = sum(sum(pair) for batch in batches for pair in batch)
    responses = sorted(n - args.prompt for pair in pairs for n in pair)
    print(f"{len(pairs)} pairs, prompt {args.prompt} tokens, responses log-normal: median {responses[len(responses) // 2]}, "
          f"p90 {responses[int(0.9 * len(responses))]}, max {responses[-1]}; global batch {args.global_batch} over "
          f"dp={args.dp}, rows up to {args.max_len}")
    print("| pairs / micro-batch | pad-to-longest | packed |")
    print("|---|---|---|")
    for mbs in (int(m) for m in args.micro_batch.split(",")):
        if args.global_batch % (args.dp * mbs):
            print(f"| {mbs} | (global batch not divisible by dp x micro-batch) | |")
            continue
        cells = []
        for packing in (False, True):
            total = sum(processed(mb, args.max_len, packing)
                        for batch in batches for mb in micro_batches(batch, args.dp, mbs, packing))
            cells.append(real / total)
        print(f"| {mbs} | {cells[0]:.3f} | {cells[1]:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
