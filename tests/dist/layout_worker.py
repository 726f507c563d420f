"""Layout invariance on the same weights and global batch (run under `torchrun --nproc_per_node 2`).

For each layout (TP=1 x DP=2, TP=2, TP=2+SP, and micro-batch splits) and each objective, one step of the real
trainer (megatron DDP + schedule + our forward_step) is compared with a plain single-process torch computation
of the whole global batch: full-vocabulary `log_softmax`, the objective's pure loss, autograd. P2-DPO's plain
side builds each of its six sequences per sample by hand, one unpadded forward each, so the trainer's row layout
(term-major rows, several images per row, the reference's own calibration rows) is checked too. Writes a JSON
report to argv[1]/layouts.json with the worst relative differences; the pytest side asserts on it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
import zlib
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

from megatron_po.config import Config, ParallelConfig, config_from_dict
from megatron_po.data.p2_records import read_p2_records
from megatron_po.data.tokenizer import Tokenizer
from megatron_po.families import family_spec
from megatron_po.memory_plan import stage_params
from megatron_po.models.lora import apply_lora, init_a, is_adapter_param
from megatron_po.models.shapes import ModelShape
from megatron_po.models.tiny_vlm.model import build_vlm
from megatron_po.models.specs import padded_vocab_size
from megatron_po.objectives import OBJECTIVES, build_objective, build_objective_config
from megatron_po.objectives.common import ObjectiveContext, PairLogps
from megatron_po.objectives.p2_dpo import P2Logps
from megatron_po.parallel.groups import destroy_parallel, init_parallel, init_process_group, teardown
from megatron_po.parallel.reduce import all_gather_cat, broadcast_from_last_stage
from megatron_po.train.data import build_dataset, build_p2_dataset, build_sampler, prepare_data, step_micro_batches
from megatron_po.train.loop import build_train_state, finish_step, forward_backward, prepare_step
from megatron_po.train.models import live_reference
from megatron_po.train.precompute import precompute_reference
from megatron_po.train.ref_cache import open_cache
from megatron_po.train.reference import CachedReference
from megatron_po.train.rows import causal_mask

GLOBAL_BATCH = 4
POLICY_SEED, REF_SEED = 11, 12
# every layout for the core objectives and those with batch statistics (where rank-local statistics would break);
# the per-pair rest on TP=1 x DP=2 with 2 micro-batches, TP=2 + SP and the pipeline layouts
CORE = {"dpo", "acpo", "acpo_batch", "acpo_hybrid", "beta_dpo", "cw_sftc"}
SHORT_LAYOUTS = {"tp1_dp2_2mb", "tp2_sp", "pp2", "tp2_sp_pp2", "tp2_sp_packed", "pp2_packed"}
# labels without a defined step-0 value: only compared with a drifted reference
NO_STEP0 = {"combo", "cw_sftc", "p2_dpo_rejected"}
NUM_LAYERS = 3  # uneven over two pipeline stages: pp_layers_first / pp_layers_last decide the split
LAYOUTS = {  # name: (world size, tp, sp, pp, pp_layers_first, pp_layers_last, micro_batch_size, packing);
    # dp = world / (tp * pp)
    "tp1_dp2": (2, 1, False, 1, 0, 0, 2, False),
    "tp1_dp2_2mb": (2, 1, False, 1, 0, 0, 1, False),
    "tp2": (2, 2, False, 1, 0, 0, 4, False),
    "tp2_sp": (2, 2, True, 1, 0, 0, 4, False),
    "tp2_sp_2mb": (2, 2, True, 1, 0, 0, 2, False),
    # pipeline: the first stage holds the vision tower and one decoder layer, the last two layers and the loss
    "pp2": (2, 1, False, 2, 1, 0, 2, False),
    "pp2_4mb": (2, 1, False, 2, 1, 0, 1, False),
    # packed rows: pairs spread over DP by tokens, several sequences per row (SP pads packed rows to 2)
    "tp1_dp2_packed": (2, 1, False, 1, 0, 0, 2, True),
    "tp2_sp_packed": (2, 2, True, 1, 0, 0, 4, True),
    "pp2_packed": (2, 1, False, 2, 1, 0, 2, True),
    "tp2_sp_pp2": (4, 2, True, 2, 0, 1, 2, False),
    "dp2_pp2": (4, 1, False, 2, 1, 0, 1, False),
}
OBJECTIVE_CASES = [  # (label, objective name, params, ref modes beyond "same")
    ("dpo", "dpo", {"beta": 0.1}, ("drifted", "other")),
    ("acpo", "acpo", {}, ("drifted",)),
    # batch statistics over the optimizer step's global batch (batch_stat_scope=global_batch, the default)
    ("acpo_batch", "acpo", {"alpha_scope": "batch"}, ("drifted",)),
    # per-pair α with the batch's length statistics (global lengths under batch_stat_scope=global_batch)
    ("acpo_hybrid", "acpo", {"alpha_scope": "hybrid"}, ("drifted",)),
    ("ipo", "ipo", {}, ("drifted",)),
    ("simpo", "simpo", {}, ()),
    ("dpo_shift", "dpo_shift", {"schedule": "increase_linear"}, ("drifted",)),
    ("combo", "combo", {"weights": {"dpo": 1.0, "sft": 0.5}}, ("drifted",)),  # no step-0 claim: "same" skipped
    # filtering keeps 2 of 4 pairs, chosen once per step by a seed shared by all ranks: exact global masked mean
    ("beta_dpo", "beta_dpo", {"rho": 0.5}, ("drifted",)),
    # stage 1 with the batch-mean gate open (C large): the gate is a global-batch statistic
    ("cw_sftc", "cw_sftc", {"c": 1000.0}, ("drifted",)),
    ("cw_dpo", "cw_dpo", {}, ("drifted",)),
    # sentence-level rewards from segment sums of the chosen responses
    ("aspo", "aspo", {}, ("drifted",)),
    # six forwards per sample; "chosen": the reference scores the policy's rows (step 0 has a closed form);
    # "rejected" (the default): the reference's calibration rows hold y_l^f (a second row view)
    ("p2_dpo", "p2_dpo", {"calib_reference": "chosen"}, ("drifted",)),
    ("p2_dpo_rejected", "p2_dpo", {}, ("drifted",)),
    # a trainable vision tower and projector (LLaVA stage-2 style): its gradients on the first pipeline stage, and
    # the reference encoding its own images (towers that train are never shared)
    ("dpo_tower", "dpo", {}, ("drifted",)),
    # the output layer's full logits and a vocab-parallel log-softmax (model.logprobs=logits), the path before the
    # fused response-only stage became the default
    ("dpo_logits", "dpo", {}, ("drifted",)),
    # activation recompute: whole layers (megatron's full/uniform) and the attention + MLP of each (selective)
    ("dpo_recompute_full", "dpo", {}, ("drifted",)),
    ("acpo_recompute_selective", "acpo", {"alpha_scope": "batch"}, ("drifted",)),
    # LoRA (model.lora): the base frozen, adapters on the decoder's four linears, the reference the policy with its
    # adapters off (no second model); "same": B = 0 as built (step 0 = ln 2), "drifted": B set to layout-free noise
    ("dpo_lora", "dpo", {"beta": 0.1}, ("drifted",)),
    # ... with whole layers recomputed (the decoder's input must require grad, or no adapter gets a gradient)
    ("dpo_lora_recompute_full", "dpo", {"beta": 0.1}, ("drifted",)),
    # ... and on the projector too: the policy's tower then trains (its adapters), the reference encodes its own;
    # with the attention and MLP of each layer recomputed
    ("acpo_lora_projector", "acpo", {"alpha_scope": "batch"}, ("drifted",)),
]
DECODER_LINEARS = "linear_qkv,linear_proj,linear_fc1,linear_fc2"
LORA = {"dpo_lora": DECODER_LINEARS, "dpo_lora_recompute_full": DECODER_LINEARS,
        "acpo_lora_projector": DECODER_LINEARS + ",projector"}
MODEL_OVERRIDES = {"dpo_tower": {"freeze_vit": False, "freeze_aligner": False},
                   "dpo_logits": {"logprobs": "logits"},
                   "dpo_recompute_full": {"recompute": "full", "recompute_num_layers": 1},
                   "acpo_recompute_selective": {"recompute": "selective", "recompute_modules": "core_attn,mlp"},
                   **{label: {"lora": {"rank": 4, "alpha": 8.0, "target_modules": targets}}
                      for label, targets in LORA.items()}}
MODEL_OVERRIDES["dpo_lora_recompute_full"].update(MODEL_OVERRIDES["dpo_recompute_full"])
MODEL_OVERRIDES["acpo_lora_projector"].update(MODEL_OVERRIDES["acpo_recompute_selective"])
P2_LOGIT_KEYS = ("p2/calib_gain_policy", "p2/focus_logit", "p2/calib_logit", "p2/robust_logit")


def make_cfg(out: Path, layout: str, objective: str, params: dict, label: str = "") -> Config:
    _, tp, sp, pp, first, last, mbs, packing = LAYOUTS[layout]
    return config_from_dict({
        "output_dir": str(out),
        "parallel": {"tp": tp, "sp": sp, "pp": pp, "pp_layers_first": first, "pp_layers_last": last},
        # the plain side takes the full logits and its own log_softmax; the trainer's layouts the fused stage
        "model": {"num_layers": NUM_LAYERS, **({"logprobs": "logits"} if layout == PLAIN else {}),
                  **MODEL_OVERRIDES.get(label, {})},
        "data": {"num_train": 32, "num_eval": 4, "packing": packing, **(PAIR_DATA if objective != "p2_dpo" else {})},
        "objective": {"name": objective, "params": params},
        # eps >= 1e-3 keeps Adam from amplifying 1e-7 noise on near-zero grads (MEGATRON_ON_CPU.md)
        "optim": {"lr": 1e-2, "adam_eps": 1e-3, "clip_grad": 0.0, "warmup_fraction": 0.0},
        "train": {"global_batch_size": GLOBAL_BATCH, "micro_batch_size": mbs, "seed": 5},
    })


PAIR_DATA: dict = {}
"""The pairs' data settings once `with_two_images` has written them (every objective but P2-DPO trains on them)."""


def with_two_images(train_path: Path, tok_path: Path) -> None:
    """The synthetic pairs with every odd one showing two images (its own, then the next pair's): several images
    per prompt join every layout, packed and pipelined included."""
    multi = train_path.with_name("train_two_images.jsonl")
    if dist.get_rank() == 0:
        lines = [json.loads(line) for line in train_path.read_text().splitlines()]
        for i in range(1, len(lines), 2):
            lines[i]["image"] = [lines[i]["image"], lines[(i + 1) % len(lines)]["image"]]
        multi.write_text("".join(json.dumps(r) + "\n" for r in lines))
    dist.barrier()
    PAIR_DATA.update(source="jsonl", train_path=str(multi), tokenizer_path=str(tok_path))


PLAIN = "plain"  # the single-process reference layout: TP=1, PP=1, the whole global batch in one micro-batch
LAYOUTS[PLAIN] = (1, 1, False, 1, 0, 0, GLOBAL_BATCH, False)


def layer_offset(model) -> int:
    """Global index of this pipeline stage's first decoder layer (megatron numbers layers from 1, globally)."""
    return model.language_model.decoder.layers[0].layer_number - 1


def global_name(name: str, offset: int) -> str:
    """A parameter's name in the unsplit model: the stage's local layer index shifted by its offset."""
    m = re.match(r"(language_model\.decoder\.layers\.)(\d+)(\..*)", name)
    return f"{m.group(1)}{int(m.group(2)) + offset}{m.group(3)}" if m else name


def sliced_like(p: torch.Tensor, full: torch.Tensor, groups) -> torch.Tensor:
    """This rank's shard of the full-size `full`, split like parameter `p` over TP (strided shards, e.g. SwiGLU's
    fc1 [gate_r; up_r] on rank r, take interleaved chunks, as megatron's CPU init does)."""
    tp, rank = dist.get_world_size(groups.tp), dist.get_rank(groups.tp)
    if not (getattr(p, "tensor_model_parallel", False) and tp > 1):
        return full
    chunks = full.chunk(tp * p.partition_stride, dim=p.partition_dim)
    return torch.cat(chunks[rank::tp], dim=p.partition_dim)


def full_shape(p: torch.Tensor, groups) -> list[int]:
    shape, tp = list(p.shape), dist.get_world_size(groups.tp)
    if getattr(p, "tensor_model_parallel", False) and tp > 1:
        shape[p.partition_dim] *= tp
    return shape


def lora_b_noise(name: str, shape: list[int]) -> torch.Tensor:
    """A drifted adapter's full-size B (name: the adapter's parameter in the unsplit model)."""
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return torch.randn(shape, generator=gen) * 0.05


def build_lora_policy(cfg: Config, vocab: int, groups, ref_mode: str):
    """The LoRA policy: the base (POLICY_SEED) with megatron_po's adapters; 'drifted' sets every B to layout-free
    noise (B = 0 as built leaves the policy equal to its base)."""
    policy = build_vlm(cfg.model, cfg.parallel, vocab, groups, seed=POLICY_SEED)
    apply_lora(policy, cfg.model.lora, groups.tp, seed=POLICY_SEED)
    if ref_mode == "drifted":
        offset = layer_offset(policy)
        with torch.no_grad():
            for name, p in policy.named_parameters():
                if name.endswith("lora_b"):
                    p.copy_(sliced_like(p, lora_b_noise(global_name(name, offset), full_shape(p, groups)), groups))
    return policy


def plain_lora_policy(cfg: Config, vocab: int, groups, ref_mode: str):
    """The LoRA policy written out in plain torch, independently of models/lora.py (only A's initial values are
    taken from it): the base at TP=1 with a forward hook per target linear adding (α/r)·x Aᵀ Bᵀ. Returns the
    model and its adapter parameters, named as megatron_po names them."""
    lora = cfg.model.lora
    # without recompute: the plain side is autograd as it is (recompute's replay is what the trainer side tests)
    plain = dataclasses.replace(cfg.model, recompute="none")
    model = build_vlm(plain, cfg.parallel, vocab, groups, seed=POLICY_SEED)
    model.requires_grad_(False)
    linears = {f"language_model.decoder.layers.{i}.{part}.{attr}": getattr(getattr(layer, part), attr)
               for i, layer in enumerate(model.language_model.decoder.layers)
               for part, attrs in (("self_attention", ("linear_qkv", "linear_proj")),
                                   ("mlp", ("linear_fc1", "linear_fc2")))
               for attr in attrs if attr in lora.targets}
    if "projector" in lora.targets:
        linears.update({f"projector.encoder.{attr}": getattr(model.projector.encoder, attr)
                        for attr in ("linear_fc1", "linear_fc2")})
    params = {}
    for name, linear in linears.items():
        out_features, in_features = linear.weight.shape
        a = torch.nn.Parameter(init_a(lora.rank, in_features, name, POLICY_SEED))
        b = torch.nn.Parameter(lora_b_noise(f"{name}_lora.lora_b", [out_features, lora.rank]) if ref_mode == "drifted"
                               else torch.zeros(out_features, lora.rank))
        params[f"{name}_lora.lora_a"], params[f"{name}_lora.lora_b"] = a, b

        def add(module, args, output, a=a, b=b):
            return (output[0] + (args[0] @ a.T @ b.T) * (lora.alpha / lora.rank), *output[1:])

        linear.register_forward_hook(add)
    return model, params


def build_pair(cfg: Config, vocab: int, groups, ref_mode: str):
    """Policy and reference. ref_mode: 'same' (step 0), 'drifted' (same vision, perturbed LM: the shared-image
    path) or 'other' (another seed: separate image encodings). Under LoRA the reference is None: the policy with
    its adapters off."""
    if cfg.model.lora.enabled:
        return build_lora_policy(cfg, vocab, groups, ref_mode), None
    policy = build_vlm(cfg.model, cfg.parallel, vocab, groups, seed=POLICY_SEED)
    reference = build_vlm(cfg.model, cfg.parallel, vocab, groups, seed=REF_SEED if ref_mode == "other" else POLICY_SEED)
    if ref_mode == "drifted":
        # layout-independent noise: drawn at full size per parameter (seeded by its name in the unsplit model,
        # so pipeline stages draw the same) then sliced like the parameter (TP shards along dim 0)
        tp = dist.get_world_size(groups.tp)
        offset = layer_offset(reference)
        with torch.no_grad():
            for name, p in reference.language_model.named_parameters():
                gen = torch.Generator().manual_seed(zlib.crc32(global_name(f"language_model.{name}", offset).encode()))
                sharded = getattr(p, "tensor_model_parallel", False) and tp > 1
                noise = sliced_like(p, torch.randn(full_shape(p, groups), generator=gen) * 0.05, groups)
                # scaled by the mean |w| of the whole parameter: a shard's own mean would make the reference, and
                # every loss compared with it, depend on the TP layout
                abs_sum = p.detach().abs().sum()
                if sharded:
                    dist.all_reduce(abs_sum, group=groups.tp)
                p.add_(noise * (abs_sum / noise.numel() / (tp if sharded else 1)).clamp_min(1e-3))
    return policy, reference


def rel(a: torch.Tensor, b: torch.Tensor, scale=None) -> float:
    """max |a - b| relative to max |b| (or to `scale`)."""
    scale = b.double().abs().max() if scale is None else torch.as_tensor(scale).double()
    return float((a.double() - b.double()).abs().max() / scale.clamp_min(1e-12))


def plain_reference(cfg: Config, ds, vocab: int, params_cfg, objective: str, ref_mode: str, groups):
    """Single-process, full-vocabulary computation over the whole global batch (no megatron reductions). Under
    LoRA: the plain-torch adapters on one base, the bare base as the reference."""
    trained = None
    if cfg.model.lora.enabled:
        policy, trained = plain_lora_policy(cfg, vocab, groups, ref_mode)
        reference = build_vlm(cfg.model, cfg.parallel, vocab, groups, seed=POLICY_SEED)
    else:
        policy, reference = build_pair(cfg, vocab, groups, ref_mode)
    idx = build_sampler(cfg, len(ds), 0, 1).global_batch(0)
    batch = ds.collator([ds[i] for i in idx])
    b = batch["num_pairs"]
    mask = causal_mask(batch["tokens"].shape[1], "cpu")
    counts = [len(ds.records[i].images) for i in idx]
    assert max(counts) == 2 and min(counts) == 1, counts  # the global batch mixes one- and two-image pairs

    def logps(model, grad: bool):
        with torch.set_grad_enabled(grad):
            img = model.encode_images(batch["images"])  # [n, p, h], pairs' images in pair order
            per_pair = [x.flatten(0, 1) for x in img.split(counts)]
            slots = torch.cat(per_pair + per_pair)  # chosen rows then rejected rows, each showing its pair's images
            logits = model(batch["tokens"], batch["position_ids"], mask, slots, batch["image_token_mask"])
            labels = batch["labels"]
            valid = labels != -100
            lp = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
            return (lp * valid).double().sum(-1), (lp * valid).double()

    (pol, pol_tok), (ref, ref_tok) = logps(policy, True), logps(reference, False)
    seg = {}
    if "chosen_segment_ids" in batch:  # sentence sums of the chosen rows, written out independently of the trainer
        ids, k = batch["chosen_segment_ids"], int(batch["num_segments"].max())
        one_hot = torch.nn.functional.one_hot(ids.clamp_min(0), k).double() * (ids >= 0).unsqueeze(-1)
        seg = dict(policy_chosen_segment_logps=torch.einsum("bs,bsk->bk", pol_tok[:b], one_hot),
                   ref_chosen_segment_logps=torch.einsum("bs,bsk->bk", ref_tok[:b], one_hot),
                   chosen_segment_lengths=one_hot.sum(1), chosen_segment_similarity=batch["segment_similarity"])
    pairs = PairLogps(pol[:b], pol[b:], ref[:b], ref[b:], batch["chosen_lengths"].double(),
                      batch["rejected_lengths"].double(), **seg)
    obj = OBJECTIVES[objective]
    # the whole global batch is this one call: its own statistics are the global ones
    stats = obj.global_stats(pairs, params_cfg) if obj.global_stats is not None else None
    ctx = ObjectiveContext(step=0, total_steps=cfg.train.train_steps, global_stats=stats,
                           pair_index=torch.arange(b) if stats is not None else None)
    per_pair, samples = obj.loss_fn(pairs, params_cfg, group=None, ctx=ctx)
    next_state = obj.next_state(params_cfg, None, stats) if obj.next_state is not None else None
    weight = samples.get("pair_weight")
    (per_pair.sum() / (weight.sum() if weight is not None else b)).backward()
    trained = trained or {n: p for n, p in policy.named_parameters() if p.requires_grad}
    grads = {n: p.grad.clone() for n, p in trained.items()}
    out = {"loss": per_pair.detach(), "logps": pol.detach(), "grads": grads, "objective_state": next_state}
    if "acpo/alpha_hat" in samples:
        out["alpha_hat"] = samples["acpo/alpha_hat"].detach()
    return out


def plain_p2(cfg: Config, ds, vocab: int, params_cfg, ref_mode: str, groups):
    """P2-DPO over the whole global batch, one unpadded single-row forward per (sample, term, model)."""
    policy, reference = build_pair(cfg, vocab, groups, ref_mode)
    tok, p = ds.collator.tokenizer, cfg.model.vision.num_patches
    idx = build_sampler(cfg, len(ds), 0, 1).global_batch(0)
    nan = torch.tensor(math.nan)

    def logp(model, prompt: str, images: list, response: str) -> torch.Tensor:
        prefix = ([tok.bos_id, tok.user_id] + [tok.image_id] * (p * len(images)) + tok.encode(prompt)
                  + [tok.assistant_id])
        target = tok.encode(response) + [tok.end_id]
        tokens = torch.tensor([prefix + target])
        s = tokens.shape[1]
        with torch.set_grad_enabled(model is policy):
            img = model.encode_images(torch.stack(images))
            logits = model(tokens, torch.arange(s)[None], causal_mask(s, "cpu"), img.flatten(0, 1),
                           tokens == tok.image_id)
            lp = torch.log_softmax(logits[0, len(prefix) - 1 : -1].float(), -1)
            return lp.gather(-1, torch.tensor(target)[:, None]).double().sum()

    cols = {f: [] for f in ("policy_focus_chosen_logps", "policy_focus_rejected_logps", "ref_focus_chosen_logps",
                            "ref_focus_rejected_logps", "policy_calib_aug_logps", "policy_calib_deg_logps",
                            "ref_calib_aug_logps", "ref_calib_deg_logps", "policy_robust_chosen_logps",
                            "policy_robust_rejected_logps", "ref_robust_chosen_logps", "ref_robust_rejected_logps")}
    for i in idx:
        record, parts = ds[i]
        im = {k: part["pixel_values"][0] for k, part in parts.items()}  # each condition's [3, S, S] pixels
        f, r = record.focus, record.robust
        row = dict.fromkeys(cols, nan)  # absent branches: NaN, which the loss must ignore
        if f is not None:
            y_ref = f.rejected if params_cfg.calib_reference == "rejected" else f.chosen
            for who, model in (("policy", policy), ("ref", reference)):
                row[f"{who}_focus_chosen_logps"] = logp(model, record.prompt, [im["image"]], f.chosen)
                row[f"{who}_focus_rejected_logps"] = logp(model, record.prompt, [im["image"]], f.rejected)
                y = f.chosen if who == "policy" else y_ref
                row[f"{who}_calib_aug_logps"] = logp(model, record.prompt, [im["image"], im["crop"]], y)
                row[f"{who}_calib_deg_logps"] = logp(model, record.prompt, [im["deg"]], y)
        if r is not None:
            for who, model in (("policy", policy), ("ref", reference)):
                row[f"{who}_robust_chosen_logps"] = logp(model, r.prompt, [im["noise"]], r.chosen)
                row[f"{who}_robust_rejected_logps"] = logp(model, r.prompt, [im["noise"]], r.rejected)
        for k, v in row.items():
            cols[k].append(v)
    records = [ds.records[i] for i in idx]
    clip = {name: torch.tensor([math.nan if getattr(r, name) is None else getattr(r, name) for r in records])
            for name in ("clip_crop_score", "clip_image_score")}
    inputs = P2Logps(**{k: torch.stack(v) for k, v in cols.items()}, **clip,
                     has_focus=torch.tensor([r.focus is not None for r in records]),
                     has_robust=torch.tensor([r.robust is not None for r in records]))
    per_sample, samples = OBJECTIVES["p2_dpo"].loss_fn(inputs, params_cfg)
    (per_sample.sum() / samples["pair_weight"].sum()).backward()
    batch = {"has_focus": inputs.has_focus.tolist(), "has_robust": inputs.has_robust.tolist(),
             **{name: t.tolist() for name, t in clip.items()}}
    present = torch.stack(cols["policy_focus_chosen_logps"] + cols["policy_robust_chosen_logps"]).detach()
    return {"loss": per_sample.detach(), "logps": torch.cat([samples[k] for k in P2_LOGIT_KEYS]), "batch": batch,
            # margins are differences of log-prob sums: their fp32 error scales with the sums, not with themselves
            "logps_scale": present.nan_to_num().abs().max(),
            "grads": {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad}}


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


def count_encodes(*models):
    """Counts `encode_images` calls of the models from now on; returns a function that reads the count."""
    calls = [0]
    for m in models:
        def counted(images, _encode=m.encode_images):
            calls[0] += 1
            return _encode(images)
        m.encode_images = counted
    return lambda: calls[0]


def count_forwards(model):
    """Counts forward calls of the decoder layers and their core attention from now on."""
    calls = [0, 0]

    def hook(i):
        def count(*_):
            calls[i] += 1
        return count

    for layer in model.language_model.decoder.layers:
        layer.register_forward_hook(hook(0))
        layer.self_attention.core_attention.register_forward_hook(hook(1))
    return lambda: tuple(calls)


def run_layout(cfg: Config, ds, vocab: int, objective: str, ref_mode: str, groups, plain: dict,
               cache=None, live: dict | None = None) -> tuple[dict, dict]:
    """One trainer step in this layout, compared with `plain`: (the same report entry on every rank, this rank's
    raw loss and gradients). With `cache` the reference log-probs come from it (no reference forward), and the
    entry also compares loss and gradients with `live`, the raw result of the live reference in this layout."""
    policy, reference = build_pair(cfg, vocab, groups, ref_mode)
    if reference is not None:
        reference.requires_grad_(False).eval()
    # what must not move: the reference model, or under LoRA the policy's base (its reference)
    frozen = dict(reference.named_parameters()) if reference is not None else {
        n: p for n, p in policy.named_parameters() if not is_adapter_param(n)}
    ref_before = {n: p.detach().clone() for n, p in frozen.items()}
    vision = list(policy.vision.parameters()) if policy.vision is not None else []
    vision_before = [p.detach().clone() for p in vision]
    lm_before = {n: p.detach().clone() for n, p in policy.language_model.named_parameters()}
    obj = build_objective(cfg.objective.name, cfg.objective.params, cfg.objective.batch_stat_scope)
    source = live_reference(policy, reference, groups) if obj.needs_reference else None
    if cache is not None:
        source = CachedReference(cache, groups.device)
    state = build_train_state(cfg, groups, obj, policy, source)
    sampler = build_sampler(cfg, len(ds), groups.dp_rank, groups.dp_size)
    batches = step_micro_batches(cfg, ds, sampler, 0, groups)
    # physical rows per collated sequence and real / processed tokens: < 1 and > the unpacked one when packed
    rows_per_sequence = sum(b.rows.shape[0] for b in batches) / sum(b.rows.num_logical for b in batches)
    efficiency = sum(int(b.rows.lengths.sum()) for b in batches) / sum(b.rows.tokens.numel() for b in batches)
    encodes = count_encodes(*[m for m in (policy, reference) if m is not None])
    prepare_step(state, batches, iteration=0)
    forwards = count_forwards(policy)
    outputs = forward_backward(state, batches)
    encodes_per_micro_batch = encodes() / len(batches)
    # decoder layer and core-attention forwards of the policy's forward + backward, per layer and micro-batch:
    # 2 where activation recompute replays them in backward
    layer_forwards, attn_forwards = (n / (len(policy.language_model.decoder.layers) * len(batches))
                                     for n in forwards())

    entry = None
    if groups.is_last_stage:  # the loss and its samples live on the last pipeline stage
        # in global-batch order (packing spreads the pairs over the DP ranks by tokens)
        index = all_gather_cat(torch.cat([b.sample_index for b in batches]), groups.dp)

        def gathered(key):
            values = all_gather_cat(torch.cat([o["samples"][key] for o in outputs]).double(), groups.dp)
            return torch.empty_like(values).index_copy_(0, index, values)

        weight = gathered("pair_weight") if "pair_weight" in outputs[0]["samples"] else None
        # P2-DPO logs no pair log-probs: its β-margins and policy calibration gain stand for them
        logp_keys = P2_LOGIT_KEYS if objective == "p2_dpo" else ("logps/chosen", "logps/rejected")
        loss = gathered("loss")
        entry = {
            "mean_loss": float(loss.sum() / (weight.sum() if weight is not None else len(loss))),
            "loss_rel": rel(loss, plain["loss"]),
            "logps_rel": rel(torch.cat([gathered(k) for k in logp_keys]), plain["logps"], plain.get("logps_scale")),
        }
        if "alpha_hat" in plain:
            alpha = gathered("acpo/alpha_hat")
            entry.update(alpha_rel=rel(alpha, plain["alpha_hat"]), alpha_hat=alpha.tolist())
    entry = broadcast_from_last_stage(entry, groups.pp)
    # every stage compares its own parameters, named as in the unsplit model
    offset = layer_offset(policy)
    grads = {global_name(n, offset): full_grad(p, groups.tp) for n, p in policy.named_parameters() if p.requires_grad}
    errors = [(rel(g, plain["grads"][n]), n) for n, g in grads.items() if n in plain["grads"]]
    raw = {"loss": loss if groups.is_last_stage else None, "grads": grads}
    if live is not None:  # cache vs live reference, same layout and ranks
        live_loss = broadcast_from_last_stage(rel(loss, live["loss"]) if groups.is_last_stage else None, groups.pp)
        worst = torch.tensor(max(rel(g, live["grads"][n]) for n, g in grads.items()), dtype=torch.float64)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        entry.update(live_loss_rel=live_loss, live_grad_rel=float(worst))
    finish_step(state, outputs)  # the optimizer step, and the objective's state update on every stage
    mine = {
        "names": sorted(grads), "errors": errors,
        "ref_grads_none": all(p.grad is None and getattr(p, "main_grad", None) is None for p in frozen.values()),
        "ref_unchanged": all(torch.equal(p, ref_before[n]) for n, p in frozen.items()),
        "vision_unchanged": all(torch.equal(p, b) for p, b in zip(vision, vision_before)),
        "lm_changed": any(not torch.equal(p, lm_before[n]) for n, p in policy.language_model.named_parameters()),
        "objective_state": state.step.objective_state,
        "encodes_per_micro_batch": encodes_per_micro_batch,
        "forwards": (layer_forwards, attn_forwards),
        "rows_per_sequence": rows_per_sequence, "padding_efficiency": efficiency,
        "plan_params": planned_vs_built(cfg, vocab, policy, groups),
    }
    world = dist.get_world_size()
    ranks = [None] * world
    dist.all_gather_object(ranks, mine)
    errors = sorted(e for r in ranks for e in r["errors"])
    entry.update(
        grad_rel=errors[-1][0], worst=errors[-3:],
        grad_names_match=sorted({n for r in ranks for n in r["names"]}) == sorted(plain["grads"]),
        # each stage holds a disjoint share: a name on two stages would be a wrong split
        # each stage holds a disjoint share (a parameter sits on its stage's tp x dp ranks): no layer twice
        grad_names_disjoint=sum(len(r["names"]) for r in ranks) == len(plain["grads"]) * world // groups.pp_size,
        **{k: all(r[k] for r in ranks) for k in ("ref_grads_none", "ref_unchanged", "vision_unchanged")},
        lm_changed=any(r["lm_changed"] for r in ranks),
        # the state after the step (β-DPO's EMA) as rank 0 — the first pipeline stage — would save it
        objective_state=ranks[0]["objective_state"],
        # image encodings per micro-batch and step on the first stage (towers live there; other stages: 0)
        encodes_per_micro_batch=max(r["encodes_per_micro_batch"] for r in ranks),
        forwards_per_layer=sorted({r["forwards"] for r in ranks}),
        rows_per_sequence=max(r["rows_per_sequence"] for r in ranks),
        padding_efficiency=min(r["padding_efficiency"] for r in ranks),
        # the memory plan's parameter counts of each rank's stage and TP shard, where they differ from the modules
        plan_param_mismatches=[r["plan_params"] for r in ranks if r["plan_params"]],
    )
    return entry, raw


def planned_vs_built(cfg: Config, vocab: int, policy, groups) -> dict:
    """{part: (planned, built)} for the parts of this rank's policy whose count the memory plan gets wrong."""
    shape = family_spec(cfg.model.family).model_shape(cfg)
    shape = ModelShape(shape.lm, vocab, shape.vision)
    planned = stage_params(cfg, shape, groups.pp_rank, len(policy.language_model.decoder.layers))
    numel = lambda m: 0 if m is None else sum(p.numel() for p in m.parameters())  # noqa: E731
    built = {"lm": numel(policy.language_model), "vision": numel(policy.vision),
             "projector": numel(policy.projector),
             "trainable": sum(p.numel() for p in policy.parameters() if p.requires_grad)}
    return {k: (getattr(planned, k), v) for k, v in built.items() if getattr(planned, k) != v}


# the reference cache: computed at TP=2 from a saved reference checkpoint, consumed in these layouts by the
# objectives with the most to lose (segment sums, P2's own reference rows, global-batch statistics), and by ACPO at
# step 0 (the cache's reference is the policy itself: its log-probs differ from the policy's by the other
# layout's rounding only, |r_l| ~ 1e-7 of either sign, which must not decide α̂: OBJECTIVES.md §7.3-C)
CACHE_CASES = {("dpo", "drifted"), ("aspo", "drifted"), ("acpo_batch", "drifted"), ("p2_dpo_rejected", "drifted"),
               ("acpo", "same"), ("dpo_lora", "drifted")}


def cache_mode(label: str, mode: str) -> str:
    """The saved reference checkpoint a cache case is computed from: under LoRA the base, i.e. 'same' (the policy's
    weights before its adapters), whatever the adapters hold."""
    return "same" if label in LORA else mode
CACHE_LAYOUTS = {"tp1_dp2", "pp2", "pp2_packed"}


def cache_cfg(cfg: Config, out: Path, label: str, mode: str) -> Config:
    """`cfg` reading the reference from the cache of `label`, whose reference is the saved `mode` checkpoint (the
    drifted reference, or the policy's own weights)."""
    return dataclasses.replace(
        cfg, checkpoint=dataclasses.replace(cfg.checkpoint, init_from=str(out / f"ref_ckpt_{cache_mode(label, mode)}")),
        reference=dataclasses.replace(cfg.reference, source="cache", cache_path=str(out / f"cache_{label}_{mode}")))


def precompute_caches(out: Path, vocab: int, tokenizer, ds, cases, layouts, seed) -> tuple[set, dict]:
    """Saves the reference of each mode as a checkpoint (TP=1) and runs `precompute_reference` at TP=2 for each
    cache case; returns the cases and each case's full training set (the cache's key covers the whole set)."""
    todo = {(label, mode) for label, _, _, mode in cases if (label, mode) in CACHE_CASES}
    if not todo or not CACHE_LAYOUTS & set(layouts):
        return set(), {}
    groups = init_parallel(ParallelConfig(tp=1), seed=seed)
    for mode in sorted({cache_mode(label, mode) for label, mode in todo}):
        _, reference = build_pair(make_cfg(out, PLAIN, "dpo", {}), vocab, groups, mode)
        if dist.get_rank() == 0:
            (out / f"ref_ckpt_{mode}").mkdir(exist_ok=True)
        dist.barrier()
        dist_checkpointing.save({"model": reference.sharded_state_dict(prefix="model.")}, str(out / f"ref_ckpt_{mode}"))
    destroy_parallel()
    groups = init_parallel(ParallelConfig(tp=2), seed=seed)
    full = {}
    for label, objective, params, _ in OBJECTIVE_CASES:
        for mode in ("drifted", "same"):
            if (label, mode) in todo:
                cfg = cache_cfg(make_cfg(out, "tp2", objective, params), out, label, mode)
                obj, family = build_objective(objective, params), family_spec(cfg.model.family)
                precompute_reference(cfg, obj, family, groups)
                full[label, mode] = (build_p2_dataset(cfg, family, prepare_data(cfg, obj, family)[0], tokenizer, obj)
                                     if objective == "p2_dpo" else ds)
    destroy_parallel()
    return todo, full


def main(out_dir: str, layouts: list[str], only: set | None) -> None:
    out = Path(out_dir)
    init_process_group(ParallelConfig())
    world = dist.get_world_size()
    base = make_cfg(out, PLAIN, "dpo", {})
    family = family_spec(base.model.family)  # every case's (tiny_vlm)
    train_path, tok_path = prepare_data(base, build_objective("dpo", {}), family)
    with_two_images(train_path, tok_path)
    train_path = Path(PAIR_DATA["train_path"])
    tokenizer = Tokenizer(tok_path)
    vocab = padded_vocab_size(tokenizer.vocab_size, 2)
    cases = [(label, objective, params, mode) for label, objective, params, extra in OBJECTIVE_CASES
             if not only or label in only
             for mode in (() if label in NO_STEP0 else ("same",)) + tuple(extra)]
    # every layout pads to a multiple of 2 so all of them share one dataset object (per record kind)
    ds = build_dataset(make_cfg(out, "tp2_sp", "dpo", {}), family, train_path, tokenizer)
    datasets = {}
    for label, objective, params, _ in OBJECTIVE_CASES:
        if objective == "p2_dpo" and (not only or label in only):
            p2_cfg = make_cfg(out, "tp2_sp", objective, params)
            p2_obj = build_objective(objective, params)
            # the P2 samples of the same task, with the pairs' tokenizer
            p2_path, _ = prepare_data(p2_cfg, p2_obj, family)
            records = read_p2_records(p2_path)
            # the global batch is the whole set: two samples with both branches, one of each single branch
            kinds = [(r.focus is not None, r.robust is not None) for r in records]
            picked = [kinds.index((True, True)), len(kinds) - 1 - kinds[::-1].index((True, True)),
                      kinds.index((True, False)), kinds.index((False, True))]
            datasets[label] = build_p2_dataset(p2_cfg, family, p2_path, tokenizer, p2_obj,
                                               [records[i] for i in picked])
    seed = base.train.seed
    # one parallel-state initialisation per layout: each creates ~20 gloo groups that are never torn down
    groups = init_parallel(ParallelConfig(tp=1), seed=seed)
    mine = {}
    # the plain computations are single-process: each rank does its share and every rank gets all of them
    for label, objective, params, mode in cases[dist.get_rank()::world]:
        ref_cfg = make_cfg(out, PLAIN, objective, params, label)
        params_cfg = build_objective_config(objective, params)
        if objective == "p2_dpo":
            mine[label, mode] = plain_p2(ref_cfg, datasets[label], vocab, params_cfg, mode, groups)
        else:
            mine[label, mode] = plain_reference(ref_cfg, ds, vocab, params_cfg, objective, mode, groups)
    shares = [None] * world
    dist.all_gather_object(shares, mine)
    plains = {k: v for share in shares for k, v in share.items()}
    destroy_parallel()
    caches, full = precompute_caches(out, vocab, tokenizer, ds, cases, layouts, seed)

    report = {}
    for name in layouts:
        cfg0 = make_cfg(out, name, "dpo", {})
        assert LAYOUTS[name][0] == world, (name, world)
        groups = init_parallel(cfg0.parallel, seed=seed)
        for label, objective, params, mode in cases:
            if label not in CORE and name not in SHORT_LAYOUTS:
                continue
            plain = plains[label, mode]
            cfg = make_cfg(out, name, objective, params, label)
            entry, raw = run_layout(cfg, datasets.get(label, ds), vocab, objective, mode, groups, plain)
            if "batch" in plain:  # the global batch's branches and CLIP scores, for the step-0 closed form
                entry["p2_batch"] = plain["batch"]
            entry["plain_objective_state"] = plain.get("objective_state")
            report[f"{label}/ref={mode}/{name}"] = entry
            if (label, mode) in caches and name in CACHE_LAYOUTS:
                cache = open_cache(cache_cfg(cfg, out, label, mode), build_objective(objective, params), family,
                                   {"train": full[label, mode]})
                entry, _ = run_layout(cfg, datasets.get(label, ds), vocab, objective, mode, groups, plain, cache, raw)
                cached = "cache" if mode == "drifted" else f"cache_{mode}"
                report[f"{label}/ref={cached}/{name}"] = entry | {"plain_objective_state": plain.get("objective_state")}
        destroy_parallel()
    if dist.get_rank() == 0:
        (out / "layouts.json").write_text(json.dumps(report, indent=1))
        for k, v in report.items():
            print(f"{k:45s} loss={v['mean_loss']:.7f} logps={v['logps_rel']:.1e} grad={v['grad_rel']:.1e}"
                  + (f" alpha={v['alpha_rel']:.1e}" if "alpha_rel" in v else "") + f" worst={v['worst'][-1][1]}", flush=True)
    teardown()


if __name__ == "__main__":
    # layout_worker.py OUT_DIR LAYOUT[,LAYOUT...] [LABEL,...]: the layouts must all have this launch's world size
    main(sys.argv[1], sys.argv[2].split(","), set(sys.argv[3].split(",")) if len(sys.argv) > 3 else None)
