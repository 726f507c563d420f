"""Tokens/s and MFU of an ACPO step of an 8B-shaped VLM on ~12K-token packed rows, through the trainer's own code.

    torchrun --nproc_per_node 1 benchmarks/bench_gpu_step.py [--layers 4 | --full] [--reference model,cache]
        [--recompute none,selective,full | --configs model:none,cache:selective] [--tp 1 --pp 1 --sp]
        [--micro-batches 4] [--steps 5] [--warmup 2] [--no-packing] [--peak-tflops 989] [--json FILE] [key=value ...]
    python benchmarks/bench_gpu_step.py --dry-flops [--layers 28]    # the FLOP accounting alone, on any machine

Without CUDA it prints one line saying it skipped and exits 0, before megatron is imported.

Model: tiny_vlm with the Qwen2.5-7B decoder (hidden 3584, ffn 18944, 28 heads, 4 query groups, vocabulary 152,064,
untied output layer) cut to `--layers` (4 fit one 80 GB H100 with a live reference; `--full` = 28 needs several
GPUs, e.g. --tp 8), the default small ViT (224 px: 256 image slots), bf16, TE spec, packing (one THD row per
micro-batch with cu_seqlens; `--no-packing` for padded rows). Models, DDP, optimizer and step come from
megatron_po.train.loop as in
bench_step.py; objective acpo with its defaults (per-pair alpha: no statistics pass); `--reference cache`
precomputes the cache, untimed, and builds no reference model. key=value config overrides come last.

Data: pairs of one image, `--prompt` prompt tokens and two responses of log-normal length (median 150, sigma 1.2,
in [10, `--max-response`]), as JSONL with a generated tokenizer of the full vocabulary. A DP rank's share of a step
is `--micro-batches` micro-batches, each filled first-fit from the next 32 pairs up to one row of `--max-seq`
tokens (unpacked: rows x longest), ranks trimmed to equal pair counts (the trainer needs them), and made by the
trainer's own `make_micro_batch` (train/data.py), as step_micro_batches does. Every step has new pairs.

Columns: ms/step (median after `--warmup`, the slowest rank; IQR), real tokens per step, padding efficiency (real /
processed positions), real tokens/s per GPU and in total, model TFLOP/s per GPU, MFU = that / `--peak-tflops`
(989: H100 SXM dense bf16), peak GPU memory (max_memory_allocated, largest rank, from before the first step: weights,
optimizer state and every step's transients), the memory plan's peak per rank for the same configuration
(megatron_po/memory_plan.py, `megatron-po train --dry-run`: one row of `--max-seq` tokens per packed micro-batch)
and measured / planned; rates over all timed steps. `--json FILE` writes the rows as JSON too.

Model FLOPs: megatron_po/flops.py, the count the trainer's `mfu` metric and `megatron-po sweep` use (real tokens
only: padding, recompute replays and the optimizer are not counted), per step:
    policy forward + backward = 3 decoder forwards, + 1 forward for a live reference (0 with the cache), + the frozen
    vision tower and projector once (one encoding serves both passes); a decoder forward is
    2 L P_mm T  +  4 L q sum_i s_i^2  +  2 V h R
  P_mm = the GEMM weights of a layer (q, k, v, output, SwiGLU; biases and norms are not GEMMs), T = real tokens, s_i =
  each packed sequence's length (attention counted whole per sequence, as Megatron-LM's
  num_floating_point_operations does), R = response positions (only those meet the [V, h] output weight in the
  fused log-prob stage; V padded to 128s), q = heads x head dim.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import math
import os
import random
import re
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import astuple, dataclass
from pathlib import Path

QWEN2_5_7B = ["model.hidden_size=3584", "model.ffn_hidden_size=18944", "model.num_attention_heads=28",
              "model.num_query_groups=4", "model.vocab_size=152064"]


@dataclass
class Shape:
    layers: int
    hidden: int
    ffn: int
    heads: int
    groups: int
    vocab: int
    model: object = None
    """The family's ModelShape (megatron_po/models/shapes.py), which the FLOP count reads."""

    def layer_params(self, tp: int = 1) -> int:
        """Parameters of one decoder layer on one TP rank: the memory plan's count (the norms replicated, the rest
        split), which its tests check against the built modules."""
        from megatron_po.memory_plan import layer_params
        from megatron_po.models.specs import LMShape

        shape = LMShape(self.layers, self.hidden, self.ffn, self.heads, self.groups, 1e-6, 1e6, self.vocab)
        return int(layer_params(shape, tp))

    @property
    def n_lm(self) -> int:
        return self.layers * self.layer_params()


@dataclass
class Mix:
    """Summed over micro-batches: real tokens, response positions, squared sequence lengths, sequences, positions."""

    tokens: int = 0
    response: int = 0
    sq: int = 0
    sequences: int = 0
    processed: int = 0
    images: int = 0

    def __add__(self, o: "Mix") -> "Mix":
        return Mix(*(a + b for a, b in zip(astuple(self), astuple(o))))


def step_flops(shape, mix: Mix, live_reference: bool) -> dict[str, float]:
    """Model FLOPs of the mix by pass (megatron_po.flops.step_flops; `shape`: the family's ModelShape): the policy's
    forward + backward, the live reference's forward, the frozen tower's one encoding of each pair's image."""
    from megatron_po.flops import StepPasses
    from megatron_po.flops import step_flops as count

    per_image = shape.vision.image_tokens_per_pair  # one image per pair
    work = [mix.tokens, mix.processed, mix.sq, mix.response, mix.images * per_image, mix.images * per_image**2,
            mix.images]
    return count(shape, StepPasses(live_reference=live_reference), work)


def describe_flops(s: Shape, mix: Mix, live_reference: bool, steps: int) -> str:
    f = step_flops(s.model, mix, live_reference)
    per = {k: v / mix.tokens / s.n_lm for k, v in f.items()}
    return (f"{'live reference' if live_reference else 'reference cache'}: per real token policy {per['policy']:.3f}"
            f" N_lm + reference {per['reference']:.3f} N_lm + vision {per['vision']:.3f} N_lm = {per['total']:.3f} "
            f"N_lm = {f['total'] / mix.tokens / 1e9:.2f} GFLOP; {f['total'] / steps / 1e12:.1f} TFLOP/step")


def print_formula(s: Shape) -> None:
    print(__doc__[__doc__.index("Model FLOPs"):].rstrip())
    print(f"  Here N_lm = {s.layers} x {s.layer_params():,} = {s.n_lm:,} (h={s.hidden} n_h={s.heads} n_kv={s.groups} "
          f"d={s.hidden // s.heads} ffn={s.ffn}: the layers' parameters, biases and norms included), V = {s.vocab:,}.")


# ---- the token mix -----------------------------------------------------------------------------------------------

def positions(mb: list, prefix: int, packing: bool, pad: int = 1) -> int:
    """Positions of a micro-batch's rows: one packed row, or its rows padded to the longest."""
    rows = [prefix + 1 + n for pair in mb for n in pair[-2:]]  # prompt + response + <|end|>
    return -(-sum(rows) // pad) * pad if packing else len(rows) * -(-max(rows) // pad) * pad


def plan_steps(args, num_steps: int, dp: int, prefix: int) -> list[list[list[tuple[int, int, int]]]]:
    """Per step, its rank-major dp x micro-batches lists of (dataset index, chosen tokens, rejected tokens)."""
    rng = random.Random(0)

    def response() -> int:
        return int(min(args.max_response, max(10, round(math.exp(rng.gauss(math.log(150), 1.2))))))

    pending, steps = [], []
    for _ in range(num_steps):
        ranks = [[[] for _ in range(args.micro_batches)] for _ in range(dp)]
        for mb in (mb for mbs in ranks for mb in mbs):
            while True:
                pending += [(response(), response()) for _ in range(32 - len(pending))]
                fits = (j for j, pair in enumerate(pending)
                        if positions(mb + [pair], prefix, not args.no_packing) <= args.max_seq)
                if (j := next(fits, None)) is None:
                    break
                mb.append(pending.pop(j))
        # per-pair metrics are gathered over DP: equal counts; the smallest extra pairs go to the next step
        n = min(sum(map(len, mbs)) for mbs in ranks)
        for mbs in ranks:
            while sum(map(len, mbs)) > n:
                mb = max(mbs, key=len)
                pending.insert(0, mb.pop(min(range(len(mb)), key=lambda j: sum(mb[j]))))
        steps.append([mb for mbs in ranks for mb in mbs])
    index = itertools.count()
    return [[[(next(index), c, r) for c, r in mb] for mb in step] for step in steps]


def write_data(out: Path, plan, prompt_words: int, vocab: int) -> None:
    """The plan's pairs as JSONL (dataset order = plan order), their image and a tokenizer of `vocab` pieces."""
    from megatron_po.data.synthetic_lengths import write_pairs

    write_pairs(out, [(c, r) for step in plan for mb in step for _, c, r in mb], prompt_words, 64, vocab, 0)


# ---- the run -----------------------------------------------------------------------------------------------------

def run(args, base: list[str], shape: Shape, configs: list[tuple[str, str]]) -> None:
    # megatron's deprecations, repeated by every rank, would bury the table; some come at import
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    import gc
    import logging

    import torch
    import torch.distributed as dist

    from megatron_po.config import load_config
    from megatron_po.data.tokenizer import Tokenizer
    from megatron_po.families import family_spec
    from megatron_po.objectives import build_objective
    from megatron_po.parallel.groups import init_parallel, teardown
    from megatron_po.train.data import build_train_dataset, make_micro_batch
    from megatron_po.train.loop import build_reference, build_train_state, train_step
    from megatron_po.train.models import build_models
    from megatron_po.train.precompute import precompute_reference

    logging.getLogger("megatron_po").setLevel(logging.ERROR)
    cfg = load_config(None, base)
    family = family_spec(cfg.model.family)
    out, world = Path(args.output_dir), int(os.environ.get("WORLD_SIZE", 1))
    dp = cfg.validate_world(world)
    groups = init_parallel(cfg.parallel, seed=cfg.train.seed)
    rank, gpu = dist.get_rank(), groups.device.type == "cuda"
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    prefix = 3 + cfg.model.vision.num_patches + args.prompt
    plan = plan_steps(args, args.warmup + args.steps, dp, prefix)
    rows, cached = [], False
    try:
        if rank == 0:
            write_data(out, plan, args.prompt, cfg.model.vocab_size)
        dist.barrier()
        objective = build_objective("acpo", {})
        tokenizer = Tokenizer(out / "tokenizer.model")
        ds = build_train_dataset(cfg, family, out / "train.jsonl", tokenizer, objective)
        planned = [2 * (prefix + 1) + c + r for step in plan for mb in step for _, c, r in mb]
        if len(ds) != len(planned) or any(ds.cost(i) != n for i, n in enumerate(planned)):
            raise RuntimeError("the tokenized pairs do not have the planned lengths")

        def step_batches(step: int) -> tuple[list, Mix]:
            """This rank's micro-batches (the trainer's make_micro_batch on the planned groups), the global mix."""
            first = plan[step][0][0][0]  # sample_index: positions in the step's global batch
            batches, mix = [], Mix()
            for group in plan[step][groups.dp_rank * args.micro_batches:(groups.dp_rank + 1) * args.micro_batches]:
                mb = make_micro_batch(ds, [i for i, _, _ in group], groups, packing=cfg)
                mb.sample_index = torch.tensor([i - first for i, _, _ in group], device=groups.device)
                w = mb.work.policy  # counted on the host when the micro-batch was made (flops.Work)
                mix += Mix(w.tokens, w.response, w.attention, mb.rows.num_logical, w.positions, len(w.image_tokens))
                batches.append(mb)
            t = torch.tensor(astuple(mix), dtype=torch.float64, device=groups.device)
            dist.all_reduce(t, group=groups.dp)
            return batches, Mix(*(int(v) for v in t.tolist()))

        for source, recompute in configs:
            c = load_config(None, base + [f"reference.source={source}", f"reference.cache_path={out}/cache",
                                          f"model.recompute={recompute}"])
            if source == "cache" and not cached:  # untimed; one cache serves every recompute setting
                precompute_reference(c, objective, family, groups)
                cached = True
            policy, ref_model = build_models(c, family, groups, tokenizer.vocab_size, objective)
            layers = policy.language_model.decoder.layers
            got, want = sum(p.numel() for p in layers.parameters()), len(layers) * shape.layer_params(groups.tp_size)
            if got != want:
                raise RuntimeError(f"the decoder layers hold {got:,} parameters on this rank; N_lm counts {want:,}")
            reference = build_reference(c, groups, objective, family, policy, ref_model, {"train": ds})
            state = build_train_state(c, groups, objective, policy, reference)
            planned = planned_peak(args, c, family, world, dp, objective, plan, prefix, groups.device.type)
            if gpu:
                torch.cuda.reset_peak_memory_stats()
            times, mix = [], Mix()
            for it in range(args.warmup + args.steps):
                batches, step_mix = step_batches(it)
                dist.barrier()
                sync()
                t0 = time.perf_counter()
                train_step(state, batches, it)
                sync()
                if it >= args.warmup:
                    times.append(time.perf_counter() - t0)
                    mix += step_mix
            t = torch.tensor(times + [torch.cuda.max_memory_allocated() if gpu else 0], dtype=torch.float64,
                             device=groups.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)  # per step the slowest rank; the largest memory
            rows.append({"layout": f"tp{c.parallel.tp}{'sp' if c.parallel.sp else ''} pp{c.parallel.pp} dp{dp}",
                         "reference": source, "recompute": recompute, "times": t[:-1].tolist(), "mix": mix,
                         "peak": t[-1].item(), "planned": planned})
            if rank == 0:
                print(f"  {source:<5} {recompute:<9} {1e3 * statistics.median(times):9.1f} ms/step", file=sys.stderr)
            del state, reference, policy, ref_model, layers
            gc.collect()  # the model's config holds the DDP wrapper and the optimizer in reference cycles
            if gpu:
                torch.cuda.empty_cache()
    finally:
        teardown()
    if rank == 0:
        summary = summarize(args, shape, world, rows, torch.cuda.get_device_name() if gpu else "cpu (smoke test)")
        print_table(args, shape, summary, rows)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")


def planned_peak(args, cfg, family, world: int, dp: int, objective, plan, prefix: int, device_type: str) -> float:
    """The memory plan's peak bytes per rank for this configuration and the planned steps' micro-batches (packed:
    one row of --max-seq tokens each; unpacked: the most rows of one micro-batch, padded to the longest)."""
    import dataclasses

    from megatron_po.memory_plan import build_plan
    from megatron_po.models.specs import use_te_spec

    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, global_batch_size=dp * args.micro_batches))
    if args.no_packing:
        mbs = [mb for step in plan for mb in step]
        rows = 2 * max(map(len, mbs))
        row_tokens = max(prefix + 1 + max(c, r) for mb in mbs for _, c, r in mb)
    else:
        rows, row_tokens = 1, args.max_seq
    return build_plan(cfg, family, world, rows=rows, row_tokens=row_tokens, needs_reference=objective.needs_reference,
                      te=use_te_spec(cfg.model), device_type=device_type).peak


def summarize(args, s: Shape, world: int, rows: list[dict], device: str) -> dict:
    """What the table prints, per configuration, as plain numbers (the --json output)."""
    out = []
    for r in rows:
        t, mix = r["times"], r["mix"]
        q = statistics.quantiles(t, n=4, method="inclusive") if len(t) > 1 else t * 3
        tflops = step_flops(s.model, mix, r["reference"] == "model")["total"] / sum(t) / world / 1e12
        out.append({"layout": r["layout"], "layers": s.layers, "reference": r["reference"],
                    "recompute": r["recompute"], "steps": len(t), "ms_per_step": 1e3 * statistics.median(t),
                    "ms_q1": 1e3 * q[0], "ms_q3": 1e3 * q[2], "real_tokens_per_step": mix.tokens / len(t),
                    "padding_efficiency": mix.tokens / mix.processed,
                    "tokens_per_s_per_gpu": mix.tokens / sum(t) / world, "tokens_per_s": mix.tokens / sum(t),
                    "tflops_per_gpu": tflops, "mfu": tflops / args.peak_tflops,
                    "peak_bytes": r["peak"], "planned_bytes": r["planned"],
                    "measured_over_planned": r["peak"] / r["planned"] if r["planned"] and r["peak"] else None})
    return {"device": device, "world": world, "max_seq": args.max_seq, "micro_batches": args.micro_batches,
            "warmup": args.warmup, "peak_tflops": args.peak_tflops, "n_lm": s.n_lm, "rows": out}


def print_table(args, s: Shape, summary: dict, rows: list[dict]) -> None:
    print(f"\nworld={summary['world']} {summary['device']} | Qwen2.5-7B-shaped decoder, {s.layers} layers | rows of "
          f"{args.max_seq}, {args.micro_batches} micro-batches per DP rank | median of {args.steps} steps after "
          f"{args.warmup} warm-up")
    mfu = f"MFU@{args.peak_tflops:g}"
    head = (f"| {'layout':<13} | layers | reference | recompute | {'ms/step':>8} | {'IQR ms':>15} | real tok/step | "
            f"pad eff | tok/s/GPU | tok/s total | TFLOP/s/GPU | {mfu} | peak GPU GiB | plan GiB | meas/plan |")
    print(head)
    print(re.sub(r"[^|]", "-", head))
    for r in summary["rows"]:
        ratio = r["measured_over_planned"]
        print(f"| {r['layout']:<13} | {s.layers:>6} | {r['reference']:<9} | {r['recompute']:<9} | "
              f"{r['ms_per_step']:8.1f} | {r['ms_q1']:7.1f}-{r['ms_q3']:<7.1f} | {r['real_tokens_per_step']:13,.0f} | "
              f"{r['padding_efficiency']:7.3f} | {r['tokens_per_s_per_gpu']:9,.0f} | {r['tokens_per_s']:11,.0f} | "
              f"{r['tflops_per_gpu']:11.1f} | {r['mfu']:>{len(mfu)}.1%} | {r['peak_bytes'] / 2**30:12.1f} | "
              f"{r['planned_bytes'] / 2**30:8.1f} | {'' if ratio is None else f'{ratio:.2f}':>9} |")
    print()
    print_formula(s)
    for r in {r["reference"]: r for r in rows}.values():  # the same steps under every recompute setting
        print(f"  {describe_flops(s, r['mix'], r['reference'] == 'model', len(r['times']))}")


def dry_flops(args, s: Shape, prefix: int, sources: list[str]) -> None:
    plan = plan_steps(args, args.warmup + args.steps, 1, prefix)[args.warmup:]
    n, pad, packing, gpus = len(plan), args.tp if args.sp else 1, not args.no_packing, args.tp * args.pp
    mbs = [mb for step in plan for mb in step]
    lens = [prefix + 1 + x for mb in mbs for _, c, r in mb for x in (c, r)]
    mix = Mix(sum(lens), sum(c + r + 2 for mb in mbs for _, c, r in mb), sum(x * x for x in lens), len(lens),
              sum(positions(mb, prefix, packing, pad) for mb in mbs), sum(map(len, mbs)))
    print(f"bench_gpu_step --dry-flops: {n} steps of {args.micro_batches} micro-batches (dp=1), rows of {args.max_seq}"
          f" {'packed' if packing else 'unpacked'}; prompt {prefix} tokens ({args.prompt} text, "
          f"{prefix - args.prompt - 3} image, 3 markers)\n  per step {mix.tokens / n:,.0f} real tokens in "
          f"{mix.sequences / n:.1f} sequences (mean {mix.tokens / mix.sequences:,.0f}), {mix.response / n:,.0f} "
          f"response positions, sum s^2 / T = "
          f"{mix.sq / mix.tokens:,.0f}, padding efficiency {mix.tokens / mix.processed:.3f}\n")
    print_formula(s)
    for source in sources:
        f = step_flops(s.model, mix, source == "model")["total"] / n / (args.peak_tflops * 1e12 * gpus)
        print(f"  {describe_flops(s, mix, source == 'model', n)}; {1e3 * f:,.0f} ms at 100% MFU on {gpus} GPU(s)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4, help="decoder layers (4 fit one 80 GB GPU with a live reference)")
    p.add_argument("--full", action="store_true", help="all 28 layers of Qwen2.5-7B (several GPUs: e.g. --tp 8)")
    p.add_argument("--reference", default="model,cache", help="comma list: model (live forward), cache")
    p.add_argument("--recompute", default="none", help="comma list of none, selective, full (model.recompute)")
    p.add_argument("--configs", default="", help="comma list of reference:recompute pairs to run instead of every "
                   "--reference x --recompute combination, e.g. model:none,cache:none,model:selective")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--sp", action="store_true", help="sequence parallel (needs --tp > 1)")
    p.add_argument("--no-packing", action="store_true", help="unpacked micro-batches of <= --max-seq positions")
    p.add_argument("--max-seq", type=int, default=12288, help="row length (model.max_seq_length)")
    p.add_argument("--micro-batches", type=int, default=4, help="micro-batches (rows) per DP rank and step")
    p.add_argument("--prompt", type=int, default=300, help="prompt text tokens (the image's slots come on top)")
    p.add_argument("--max-response", type=int, default=4000, help="response lengths are clipped to [10, this]")
    p.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak per GPU (H100 SXM: 989)")
    p.add_argument("--dry-flops", action="store_true", help="print the FLOP accounting of the planned mix (dp=1)")
    p.add_argument("--json", default="", help="also write the table's rows (and the memory plan's) to this file")
    p.add_argument("--cpu-smoke", action="store_true", help="run on the CPU (gloo, local spec, fp32) to check the "
                   "script, with tiny shapes as overrides; the numbers mean nothing")
    p.add_argument("--output-dir", default=os.path.join(tempfile.gettempdir(), "megatron_po_bench_gpu"),
                   help="data, tokenizer and cache (shared by the node's ranks)")
    p.add_argument("overrides", nargs="*", help="megatron_po config overrides, key=value (applied last)")
    args = p.parse_args()
    if not (args.dry_flops or args.cpu_smoke):
        import torch

        if not torch.cuda.is_available():
            print("bench_gpu_step: skipped (no CUDA device)")
            return 0

    from megatron_po.config import ConfigError, load_config

    if args.configs:
        configs = [tuple(c.split(":", 1)) if ":" in c else (c, "none") for c in args.configs.split(",")]
    else:
        configs = [(s, r) for s in args.reference.split(",") for r in args.recompute.split(",")]
    sources, recomputes = list(dict.fromkeys(s for s, _ in configs)), list(dict.fromkeys(r for _, r in configs))
    if set(sources) - {"model", "cache"} or not all(recomputes):
        p.error(f"--reference / --configs: sources model, cache (and reference:recompute pairs); got {configs}")
    smoke, d = args.cpu_smoke, args.output_dir
    base = [f"output_dir={d}", *QWEN2_5_7B, f"model.num_layers={28 if args.full else args.layers}",
            f"model.max_seq_length={args.max_seq}", f"model.spec={'local' if smoke else 'te'}",
            f"model.params_dtype={'fp32' if smoke else 'bf16'}", "model.vision.image_size=224",
            "model.vision.patch_size=14", "objective.name=acpo", "data.source=jsonl",
            f"data.train_path={d}/train.jsonl", f"data.tokenizer_path={d}/tokenizer.model",
            f"data.packing={str(not args.no_packing).lower()}",
            f"parallel.tp={args.tp}", f"parallel.pp={args.pp}", f"parallel.sp={str(args.sp).lower()}",
            "train.micro_batch_size=1", f"train.global_batch_size={os.environ.get('WORLD_SIZE', 1)}",
            f"train.train_steps={args.warmup + args.steps}", "train.progress_bar=false", "checkpoint.save=false",
            "checkpoint.resume=false", *args.overrides]
    try:
        cfg = load_config(None, base)
        for r in recomputes:
            load_config(None, base + [f"model.recompute={r}"])
    except ConfigError as e:
        p.error(str(e))
    m = cfg.model
    from megatron_po.families import family_spec

    shape = Shape(m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads, m.num_query_groups,
                  -(-m.vocab_size // 128) * 128, family_spec(m.family).model_shape(cfg))
    prefix = 3 + m.vision.num_patches + args.prompt  # <bos> <|user|> image slots, prompt, <|assistant|>
    if positions([(args.max_response, args.max_response)], prefix, not args.no_packing) > args.max_seq:
        p.error(f"a pair of {args.max_response}-token responses does not fit a row of {args.max_seq}")
    if args.dry_flops:
        dry_flops(args, shape, prefix, sources)
    elif m.spec == "te" and importlib.util.find_spec("transformer_engine") is None:
        print("bench_gpu_step: skipped (transformer-engine is not installed; model.spec=local runs without it)")
    else:
        run(args, base, shape, configs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
