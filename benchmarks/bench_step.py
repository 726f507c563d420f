"""Optimizer-step cost of each parallel layout and objective, measured through the trainer's own code path.

    torchrun --nproc_per_node 2 benchmarks/bench_step.py [--layouts tp1,tp2,tp2sp,tp1pp2] [--objectives sft,dpo,acpo]
        [--reference model,cache] [--hidden 128] [--layers 2] [--seq 128] [--steps 10] [--warmup 3] [key=value ...]

Every layout runs in the same process group (megatron's parallel state is destroyed and re-initialised between
layouts: process start-up would otherwise dominate on a laptop). For each (layout, objective, reference source)
the script builds the policy, the reference model when the objective reads one from `model` (with `cache`: runs
`precompute_reference` in that layout first, untimed, and builds no reference model), DDP, optimizer and schedule
with `megatron_po.train.loop`, and times `train_step` on the embedded demo data.

Columns:
  ms/step    median wall time of one optimizer step (forward + backward of every micro-batch, DP grad reduction,
             optimizer) after the warm-up steps; per step the slowest rank counts. The interquartile range follows.
             Data loading and collation are done before timing.
  tokens/s   sequence tokens of the global batch (2 rows per pair x padded length S, policy only) per second, so
             objectives with a reference show its forward as lower throughput.
  ref fwd    reference-model forwards (micro-batches) per optimizer step: the micro-batch count with the live
             reference, 0 with the cache or a reference-free objective.
  peak RSS   highest resident memory of any rank during that configuration, and of the lowest rank (pipeline
             stages hold different parts) (Linux: the kernel's high-water mark, reset per configuration after
             returning freed heap to the OS; elsewhere psutil sampled every 10 ms).
  peak GPU   torch.cuda.max_memory_allocated, on GPU runs only.

Trailing `key=value` arguments are megatron_po config overrides (e.g. model.vision.num_layers=4); the layout keys
(parallel.tp, parallel.sp, parallel.pp), the objective and reference.* are set by the script.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

# megatron's known CPU fallbacks and deprecations (MEGATRON_ON_CPU.md), repeated by every rank and every
# configuration, would bury the table; some are issued at import, hence before the imports below
warnings.filterwarnings("ignore", category=UserWarning)
warnings.filterwarnings("ignore", category=FutureWarning)

from megatron_po.config import ConfigError, load_config  # noqa: E402
from megatron_po.data.collate import IGNORE_INDEX  # noqa: E402
from megatron_po.data.tokenizer import Tokenizer  # noqa: E402
from megatron_po.families import family_spec  # noqa: E402
from megatron_po.objectives import OBJECTIVES, build_objective  # noqa: E402
from megatron_po.parallel.groups import destroy_parallel, init_parallel, init_process_group, teardown  # noqa: E402
from megatron_po.train.batch import MicroBatch  # noqa: E402
from megatron_po.train.data import build_sampler, build_train_dataset, prepare_data, step_micro_batches  # noqa: E402
from megatron_po.train.loop import build_run_state, train_step  # noqa: E402
from megatron_po.train.precompute import precompute_reference  # noqa: E402
from peak_rss import PeakRSS  # noqa: E402  (benchmarks/peak_rss.py)

LAYOUT_RE = re.compile(r"^tp(\d+)(sp)?(?:pp(\d+))?$")


def parse_layouts(text: str) -> list[tuple[str, int, bool, int]]:
    """'tp1,tp2,tp2sp,tp1pp2' -> [(name, tp, sp, pp)]; dp is whatever the world size leaves."""
    out = []
    for name in text.split(","):
        m = LAYOUT_RE.match(name.strip())
        if not m:
            raise ValueError(f"--layouts: {name!r} is not tpN, tpNsp, tpNppM or tpNspppM")
        out.append((name.strip(), int(m.group(1)), bool(m.group(2)), int(m.group(3) or 1)))
    return out


# ---- batches -----------------------------------------------------------------------------------------------------

def step_batches(cfg, ds, sampler, step: int, seq: int, pad_id: int, groups) -> list[MicroBatch]:
    """This rank's micro-batches of one step (the trainer's own), each row right-padded to `seq` positions when
    unpacked (0: as collated)."""
    batches = step_micro_batches(cfg, ds, sampler, step, groups)
    if not seq or cfg.data.packing:
        return batches
    out = []
    for mb, idx in zip(batches, sampler.micro_batches(step)):
        padded = MicroBatch.from_collated(pad_batch(ds.collator([ds[i] for i in idx]), seq, pad_id)).to(groups.device)
        padded.sample_index = mb.sample_index
        out.append(padded)
    return out


def pad_batch(batch: dict, seq: int, pad_id: int) -> dict:
    """Right-pads a collated micro-batch to exactly `seq` positions (causal: real tokens see no padding)."""
    s = batch["tokens"].shape[1]
    if s > seq:
        raise ValueError(f"--seq {seq} is shorter than a collated batch ({s} tokens): raise --seq")
    if s == seq:
        return batch
    extra = seq - s
    out = dict(batch)
    out["tokens"] = F.pad(batch["tokens"], (0, extra), value=pad_id)
    out["labels"] = F.pad(batch["labels"], (0, extra), value=IGNORE_INDEX)
    out["loss_mask"] = F.pad(batch["loss_mask"], (0, extra), value=0.0)
    out["image_token_mask"] = F.pad(batch["image_token_mask"], (0, extra), value=False)
    if "chosen_segment_ids" in batch:  # sentence index per label position (ASPO); -1 = no sentence
        out["chosen_segment_ids"] = F.pad(batch["chosen_segment_ids"], (0, extra), value=-1)
    rows = batch["tokens"].shape[0]
    out["position_ids"] = torch.arange(seq, device=batch["tokens"].device).unsqueeze(0).expand(rows, -1).contiguous()
    if "ref_rows" in batch:  # P2-DPO: the reference's calibration rows are a second view of the batch
        out["ref_rows"] = pad_batch(batch["ref_rows"], seq, pad_id)
    return out


# ---- one configuration -------------------------------------------------------------------------------------------

def launch_child(script: str, name: str, nproc: int, passed: list[str]) -> dict:
    """`script --child NAME *passed` under torchrun with `nproc` ranks (a configuration in a process of its own, so
    one's heap does not shape the next one's peak): the JSON of its rank 0's `RESULT {json}` line; exits with the
    launch's tail if it failed."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script,
           "--child", name, *passed]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"{name}: failed ({proc.returncode})\n{(proc.stdout + proc.stderr)[-3000:]}")
    return json.loads(lines[0][len("RESULT "):])


def run_data(cfg) -> tuple:
    """(objective, family, tokenizer, training set) of a configuration's embedded task (written on first use)."""
    objective, family = build_objective(cfg.objective.name, {}), family_spec(cfg.model.family)
    train_path, tok_path = prepare_data(cfg, objective, family)
    tokenizer = Tokenizer(tok_path)
    return objective, family, tokenizer, build_train_dataset(cfg, family, train_path, tokenizer, objective)


def run_state(cfg, objective, groups, tokenizer, ds) -> tuple:
    """(family, train state, policy, reference source, sampler) of a configuration, built as the trainer builds
    them (the benchmarks that measure memory start their window before calling this)."""
    family = family_spec(cfg.model.family)
    state = build_run_state(cfg, objective, family, groups, tokenizer.vocab_size, {"train": ds})
    sampler = build_sampler(cfg, len(ds), groups.dp_rank, groups.dp_size)
    return family, state, state.policy.module, state.reference, sampler


def bench_one(cfg, objective, groups, tokenizer, ds, steps: int, warmup: int, seq: int) -> dict:
    family, state, policy, reference, sampler = run_state(cfg, objective, groups, tokenizer, ds)
    on_gpu = groups.device.type == "cuda"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()

    times = []
    tokens = 0
    for it in range(warmup + steps):
        batches = step_batches(cfg, ds, sampler, it, seq, tokenizer.pad_id, groups)
        if it == warmup:
            forwards = reference.forwards if reference is not None else 0
        dist.barrier()
        if on_gpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        train_step(state, batches)
        if on_gpu:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if it >= warmup:
            times.append(dt)
            tokens += sum(b.rows.tokens.numel() for b in batches)

    # per step, the slowest rank; tokens summed over DP ranks (TP ranks of one DP rank hold the same batch)
    t = torch.tensor(times, dtype=torch.float64, device=groups.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    tok = torch.tensor([tokens], dtype=torch.float64, device=groups.device)
    dist.all_reduce(tok, group=groups.dp)
    times = t.tolist()
    q = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else [times[0]] * 3
    out = {
        "ms_per_step": 1e3 * statistics.median(times),
        "ms_iqr": (1e3 * q[0], 1e3 * q[2]),
        "tokens_per_s": tok.item() / sum(times),
        "params_per_rank": sum(p.numel() for p in policy.parameters()),
        "ref_forwards_per_step": ((reference.forwards if reference is not None else 0) - forwards) / steps,
    }
    if on_gpu:
        out["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    del state, policy, reference  # the reference model goes with its source
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layouts", default="tp1,tp2,tp2sp,tp1pp2",
                   help="comma list of tpN / tpNsp, with an optional ppM (dp = world / (tp * pp))")
    p.add_argument("--objectives", default="sft,dpo,acpo", help=f"comma list of {sorted(OBJECTIVES)}")
    p.add_argument("--reference", default="model",
                   help="comma list of reference sources for objectives that read one: model (a reference forward "
                        "per micro-batch) and/or cache (precomputed in each layout first, untimed)")
    p.add_argument("--hidden", type=int, default=128, help="decoder hidden size (ffn = 2.75x, Qwen2.5's ratio)")
    p.add_argument("--layers", type=int, default=2, help="decoder layers")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--query-groups", type=int, default=2, help="key/value heads (GQA); a multiple of every tp")
    p.add_argument("--seq", type=int, default=128, help="pad every row to this length (0: the batch's own length)")
    p.add_argument("--global-batch", type=int, default=8, help="pairs per optimizer step")
    p.add_argument("--micro-batch", type=int, default=4, help="pairs per forward on one DP rank")
    p.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (allocator, autotuning, caches)")
    p.add_argument("--output-dir", default=os.path.join(tempfile.gettempdir(), "megatron_po_bench"),
                   help="where the embedded data and tokenizer are generated once (shared by the node's ranks)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here (rank 0)")
    p.add_argument("overrides", nargs="*", help="megatron_po config overrides, key=value")
    args = p.parse_args()
    logging.getLogger("megatron_po").setLevel(logging.ERROR)  # the per-dataset summary line, once per layout

    try:
        layouts = parse_layouts(args.layouts)
    except ValueError as e:
        p.error(str(e))
    objectives = [o.strip() for o in args.objectives.split(",") if o.strip()]
    sources = [s.strip() for s in args.reference.split(",") if s.strip()]
    if not sources or set(sources) - {"model", "cache"}:
        p.error(f"--reference: a comma list of model, cache; got {args.reference!r}")
    for o in objectives:
        if o not in OBJECTIVES:
            p.error(f"--objectives: unknown {o!r}; known {sorted(OBJECTIVES)}")

    base = [
        f"output_dir={args.output_dir}",
        f"model.hidden_size={args.hidden}",
        f"model.ffn_hidden_size={int(round(args.hidden * 2.75 / 8)) * 8}",
        f"model.num_layers={args.layers}",
        f"model.num_attention_heads={args.heads}",
        f"model.num_query_groups={args.query_groups}",
        # rows are padded to --seq; pairs longer than that would be dropped by the dataset
        f"model.max_seq_length={max(args.seq, 160)}",
        f"train.global_batch_size={args.global_batch}",
        f"train.micro_batch_size={args.micro_batch}",
        f"train.train_steps={args.warmup + args.steps}",
        "train.progress_bar=false",
        "checkpoint.save=false",
        "checkpoint.resume=false",
        *args.overrides,
    ]
    try:
        load_config(None, base)  # fail on a bad override before any process group exists
    except ConfigError as e:
        p.error(str(e))

    init_process_group(load_config(None, base).parallel)
    rank, world = dist.get_rank(), dist.get_world_size()
    mem = PeakRSS()
    rows = []
    try:
        for name, tp, sp, pp in layouts:
            if world % (tp * pp):
                raise SystemExit(f"layout {name}: world size {world} is not a multiple of tp*pp={tp * pp}")
            if sp and args.seq % tp:
                raise SystemExit(f"layout {name}: --seq {args.seq} must be a multiple of tp={tp} for sequence parallel")
            datasets = {}  # once per layout and record kind: sequence parallel pads rows to a multiple of tp
            for obj, source in [(o, s) for o in objectives for s in sources
                                if s == "model" or build_objective(o, {}).needs_reference]:
                cfg = load_config(None, base + [f"parallel.tp={tp}", f"parallel.sp={str(sp).lower()}",
                                                f"parallel.pp={pp}", f"objective.name={obj}",
                                                f"reference.source={source}",
                                                f"reference.cache_path={args.output_dir}/cache_{name}_{obj}"])
                dp = cfg.validate_world(world)
                groups = init_parallel(cfg.parallel, seed=cfg.train.seed)
                try:
                    objective, family = build_objective(obj, {}), family_spec(cfg.model.family)
                    if objective.inputs not in datasets:
                        train_path, tok_path = prepare_data(cfg, objective, family)
                        tokenizer = Tokenizer(tok_path)
                        datasets[objective.inputs] = build_train_dataset(cfg, family, train_path, tokenizer,
                                                                         objective)
                    ds = datasets[objective.inputs]
                    if source == "cache":
                        precompute_reference(cfg, objective, family, groups)
                    mem.start()
                    r = bench_one(cfg, objective, groups, tokenizer, ds, args.steps, args.warmup, args.seq)
                    peaks = [None] * world
                    dist.all_gather_object(peaks, mem.stop())
                    r.update(layout=f"{name} (dp={dp})", objective=obj, reference=source if objective.needs_reference
                             else "-", peak_rss_bytes=max(peaks), peak_rss_min_bytes=min(peaks), peak_rss_ranks=peaks)
                    rows.append(r)
                    if rank == 0:
                        print(f"  {r['layout']:<14} {obj:<5} {r['reference']:<5} {r['ms_per_step']:8.1f} ms/step",
                              file=sys.stderr, flush=True)
                finally:
                    del groups
                    destroy_parallel()
    finally:
        teardown()

    if rank == 0:
        print_table(args, world, rows)
        if args.json:
            args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=1))
    return 0


def print_table(args, world: int, rows: list[dict]) -> None:
    device = "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} thread(s)/rank)"
    print(f"\nworld={world} device={device} torch={torch.__version__} | decoder hidden={args.hidden} "
          f"layers={args.layers} heads={args.heads}/{args.query_groups} | seq={args.seq or 'natural'} "
          f"global_batch={args.global_batch} pairs micro={args.micro_batch} | median of {args.steps} steps "
          f"after {args.warmup} warm-up")
    gpu = any("peak_gpu_bytes" in r for r in rows)
    head = (f"| {'layout':<14} | {'objective':<9} | {'reference':<9} | {'ms/step':>8} | {'IQR ms':>13} | "
            f"{'tokens/s':>9} | {'ref fwd/step':>12} | {'peak RSS MiB max/min rank':>25} |")
    head += " peak GPU MiB |" if gpu else ""
    print(head)
    print(re.sub(r"[^|]", "-", head))
    for r in rows:
        rss = f"{r['peak_rss_bytes'] / 2**20:.0f} / {r['peak_rss_min_bytes'] / 2**20:.0f}"
        line = (f"| {r['layout']:<14} | {r['objective']:<9} | {r['reference']:<9} | {r['ms_per_step']:8.1f} | "
                f"{r['ms_iqr'][0]:6.1f}-{r['ms_iqr'][1]:<6.1f} | {r['tokens_per_s']:9.0f} | "
                f"{r['ref_forwards_per_step']:12.1f} | {rss:>25} |")
        if gpu:
            line += f" {r.get('peak_gpu_bytes', 0) / 2**20:12.0f} |"
        print(line)


if __name__ == "__main__":
    sys.exit(main())
