"""Layout invariance on the same weights and global batch (run under `torchrun --nproc_per_node 2`).

For each layout (TP=1 x DP=2, TP=2, TP=2+SP, and micro-batch splits) and each objective, one step of the real
trainer (megatron DDP + schedule + our forward_step) is compared with a plain single-process torch computation
of the whole global batch: full-vocabulary `log_softmax`, the objective's pure loss, autograd. Writes a JSON
report to argv[1]/layouts.json with the worst relative differences; the pytest side asserts on it.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_po.config import Config, ParallelConfig, config_from_dict
from megatron_po.data.tokenizer import Tokenizer
from megatron_po.models.vlm import build_vlm, padded_vocab_size
from megatron_po.objectives import OBJECTIVES, build_objective_config
from megatron_po.objectives.common import PairLogps
from megatron_po.parallel.groups import destroy_parallel, init_parallel, init_process_group, teardown
from megatron_po.parallel.reduce import all_gather_cat
from megatron_po.train.data import build_dataset, build_sampler, micro_batches, prepare_data
from megatron_po.train.loop import build_train_state, forward_backward
from megatron_po.train.step import causal_mask

GLOBAL_BATCH = 4
POLICY_SEED, REF_SEED = 11, 12
LAYOUTS = [  # (name, tp, sp, micro_batch_size) on 2 processes: dp = 2 / tp
    ("tp1_dp2", 1, False, 2),
    ("tp1_dp2_2mb", 1, False, 1),
    ("tp2", 2, False, 4),
    ("tp2_sp", 2, True, 4),
    ("tp2_sp_2mb", 2, True, 2),
]
OBJECTIVE_CASES = [  # (label, objective name, params, valid with >1 micro-batch per step)
    ("dpo", "dpo", {"beta": 0.1}, True),
    ("acpo", "acpo", {}, True),
    # the batch-alpha reading is a per-micro-step statistic (OBJECTIVES.md §0.2): only splits of the DP axis keep it
    ("acpo_batch", "acpo", {"alpha_scope": "batch"}, False),
]


def make_cfg(out: Path, tp: int, sp: bool, mbs: int, objective: str, params: dict) -> Config:
    return config_from_dict({
        "output_dir": str(out),
        "parallel": {"tp": tp, "sp": sp},
        "data": {"num_train": 32, "num_eval": 4},
        "objective": {"name": objective, "params": params},
        # eps >= 1e-3 keeps Adam from amplifying 1e-7 noise on near-zero grads (MEGATRON_ON_CPU.md)
        "optim": {"lr": 1e-2, "adam_eps": 1e-3, "clip_grad": 0.0, "warmup_fraction": 0.0},
        "train": {"global_batch_size": GLOBAL_BATCH, "micro_batch_size": mbs, "seed": 5},
    })


def build_pair(cfg: Config, vocab: int, groups, ref_mode: str):
    """Policy and reference. ref_mode: 'same' (step 0), 'drifted' (same vision, perturbed LM: the shared-image
    path) or 'other' (another seed: separate image encodings)."""
    policy = build_vlm(cfg.model, cfg.parallel, vocab, groups, seed=POLICY_SEED)
    reference = build_vlm(cfg.model, cfg.parallel, vocab, groups, seed=REF_SEED if ref_mode == "other" else POLICY_SEED)
    if ref_mode == "drifted":
        # layout-independent noise: drawn at full size then sliced like the parameter (TP shards along dim 0)
        gen = torch.Generator().manual_seed(99)
        tp, rank = dist.get_world_size(groups.tp), dist.get_rank(groups.tp)
        with torch.no_grad():
            for _, p in sorted(reference.language_model.named_parameters()):
                sharded = getattr(p, "tensor_model_parallel", False) and tp > 1
                full = list(p.shape)
                if sharded:
                    full[p.partition_dim] *= tp
                noise = torch.randn(full, generator=gen) * 0.05
                if sharded:  # strided shards take interleaved chunks, as megatron's CPU init does
                    chunks = noise.chunk(tp * p.partition_stride, dim=p.partition_dim)
                    noise = torch.cat(chunks[rank::tp], dim=p.partition_dim)
                p.add_(noise * p.detach().abs().mean().clamp_min(1e-3))
    return policy, reference


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12))


def plain_reference(cfg: Config, ds, vocab: int, params_cfg, objective: str, ref_mode: str):
    """Single-process, full-vocabulary computation over the whole global batch (no megatron reductions)."""
    groups = init_parallel(ParallelConfig(tp=1), seed=cfg.train.seed)
    policy, reference = build_pair(cfg, vocab, groups, ref_mode)
    idx = build_sampler(cfg, len(ds), 0, 1).global_batch(0)
    batch = ds.collator([ds[i] for i in idx])
    b = batch["num_pairs"]
    mask = causal_mask(batch["tokens"].shape[1], "cpu")
    image_index = torch.arange(b).repeat(2)

    def logps(model, grad: bool):
        with torch.set_grad_enabled(grad):
            img = model.encode_images(batch["images"])
            logits = model(batch["tokens"], batch["position_ids"], mask, img, batch["image_token_mask"], image_index)
            labels = batch["labels"]
            valid = labels != -100
            lp = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
            return (lp * valid).sum(-1)

    pol, ref = logps(policy, True), logps(reference, False)
    pairs = PairLogps(pol[:b], pol[b:], ref[:b], ref[b:], batch["chosen_lengths"].float(),
                      batch["rejected_lengths"].float())
    per_pair, samples = OBJECTIVES[objective].loss_fn(pairs, params_cfg, group=None)
    per_pair.mean().backward()
    grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad}
    out = {"loss": per_pair.detach(), "logps": pol.detach(), "grads": grads}
    if "acpo/alpha_hat" in samples:
        out["alpha_hat"] = samples["acpo/alpha_hat"].detach()
    destroy_parallel()
    return out


def full_grad(p: torch.Tensor, tp_group) -> torch.Tensor:
    """The TP=1-shaped gradient of a (possibly TP-sharded) parameter from DDP's main_grad."""
    g = p.main_grad.detach()
    tp = dist.get_world_size(tp_group)
    if getattr(p, "tensor_model_parallel", False) and tp > 1:
        parts = [torch.empty_like(g) for _ in range(tp)]
        dist.all_gather(parts, g.contiguous(), group=tp_group)
        # a strided shard (SwiGLU fc1: [gate_r; up_r] on rank r) holds `stride` interleaved chunks of the master
        stride, dim = p.partition_stride, p.partition_dim
        chunks = [part.chunk(stride, dim=dim) for part in parts]
        g = torch.cat([chunks[r][s] for s in range(stride) for r in range(tp)], dim=dim)
    return g


def run_layout(cfg: Config, ds, vocab: int, objective: str, ref_mode: str) -> dict:
    groups = init_parallel(cfg.parallel, seed=cfg.train.seed)
    policy, reference = build_pair(cfg, vocab, groups, ref_mode)
    reference.requires_grad_(False).eval()
    ref_before = {n: p.detach().clone() for n, p in reference.named_parameters()}
    vision_before = {n: p.detach().clone() for n, p in policy.vision.named_parameters()}
    lm_before = {n: p.detach().clone() for n, p in policy.language_model.named_parameters()}
    state = build_train_state(cfg, groups, policy, reference)
    sampler = build_sampler(cfg, len(ds), groups.dp_rank, groups.dp_size)
    batches = list(micro_batches(ds, sampler.micro_batches(0), groups.device))
    outputs = forward_backward(state, batches)

    def gathered(key):
        return all_gather_cat(torch.cat([o["samples"][key] for o in outputs]).double(), groups.dp)

    res = {
        "loss": gathered("loss"),
        "logps": torch.cat([gathered("logps/chosen"), gathered("logps/rejected")]),
        "grads": {n: full_grad(p, groups.tp) for n, p in policy.named_parameters() if p.requires_grad},
    }
    if "acpo/alpha_hat" in outputs[0]["samples"]:
        res["alpha_hat"] = gathered("acpo/alpha_hat")
    state.optimizer.step()
    res["ref_grads_none"] = all(p.grad is None for p in reference.parameters())
    res["ref_unchanged"] = all(torch.equal(p, ref_before[n]) for n, p in reference.named_parameters())
    res["vision_unchanged"] = all(torch.equal(p, vision_before[n]) for n, p in policy.vision.named_parameters())
    res["lm_changed"] = any(not torch.equal(p, lm_before[n]) for n, p in policy.language_model.named_parameters())
    destroy_parallel()
    return res


def main(out_dir: str) -> None:
    out = Path(out_dir)
    init_process_group(ParallelConfig())
    base = make_cfg(out, 1, False, 2, "dpo", {})
    train_path, tok_path = prepare_data(base)
    tokenizer = Tokenizer(tok_path)
    vocab = padded_vocab_size(tokenizer.vocab_size, 2)
    report = {}
    for label, objective, params, multi_mb_ok in OBJECTIVE_CASES:
        for ref_mode in ("same", "drifted", "other") if label == "dpo" else ("same", "drifted"):
            key = f"{label}/ref={ref_mode}"
            # every layout pads to a multiple of 2 so all of them share the reference's dataset object
            ref_cfg = make_cfg(out, 1, False, GLOBAL_BATCH, objective, params)
            ds = build_dataset(make_cfg(out, 2, True, 2, objective, params), train_path, tokenizer, 2)
            params_cfg = build_objective_config(objective, params)
            plain = plain_reference(ref_cfg, ds, vocab, params_cfg, objective, ref_mode)
            for name, tp, sp, mbs in LAYOUTS:
                if not multi_mb_ok and mbs * (2 // tp) != GLOBAL_BATCH:
                    continue
                cfg = make_cfg(out, tp, sp, mbs, objective, params)
                r = run_layout(cfg, ds, vocab, objective, ref_mode)
                entry = {
                    "mean_loss": float(r["loss"].mean()),
                    "loss_rel": rel(r["loss"], plain["loss"]),
                    "logps_rel": rel(r["logps"], plain["logps"]),
                    "grad_rel": max(rel(r["grads"][n], g) for n, g in plain["grads"].items()),
                    "worst": sorted(((rel(r["grads"][n], g), n) for n, g in plain["grads"].items()))[-3:],
                    "grad_names_match": sorted(r["grads"]) == sorted(plain["grads"]),
                    "ref_grads_none": r["ref_grads_none"],
                    "ref_unchanged": r["ref_unchanged"],
                    "vision_unchanged": r["vision_unchanged"],
                    "lm_changed": r["lm_changed"],
                }
                if "alpha_hat" in plain:
                    entry["alpha_rel"] = rel(r["alpha_hat"], plain["alpha_hat"])
                    entry["alpha_hat"] = r["alpha_hat"].tolist()
                report[f"{key}/{name}"] = entry
    if dist.get_rank() == 0:
        (out / "layouts.json").write_text(json.dumps(report, indent=1))
        for k, v in report.items():
            print(f"{k:45s} loss={v['mean_loss']:.7f} logps={v['logps_rel']:.1e} grad={v['grad_rel']:.1e}"
                  + (f" alpha={v['alpha_rel']:.1e}" if "alpha_rel" in v else "") + f" worst={v['worst'][-1][1]}", flush=True)
    teardown()


if __name__ == "__main__":
    main(sys.argv[1])
