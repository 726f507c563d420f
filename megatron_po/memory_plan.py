"""What one training job holds in memory on each rank, from the config alone (no weights, no devices).

`megatron-po train --dry-run --world-size N --config F [--json] [--device-memory-gb 80]` prints it per pipeline
stage (TP and DP ranks of a stage hold the same). Megatron-LM's `report_theoretical_memory` is the model for the
approach: parameter counts are exact (a test compares them with the built modules of every family and layout),
activations are counted per token from the tensors each layer saves for backward. What is counted:

  weights       the policy's parameters on this rank (its pipeline stage, its TP shard; replicated towers whole;
                LoRA adapters included), plus the reference's (reference.source=model; a frozen tower is shared;
                none with reference.source=adapters_off, where the policy's base is the reference), in
                model.params_dtype
  gradients     megatron's DDP buffer, fp32 (grad_reduce_in_fp32), for every trainable parameter (under LoRA the
                adapters only: the base is frozen)
  optimizer     Adam's two moments in fp32, plus an fp32 master copy under bf16, for the trainable parameters;
                divided by DP with parallel.use_distributed_optimizer
  activations   saved tensors per decoder layer and token (coefficients below), at `rows x model.max_seq_length`
                tokens per micro-batch (rows = the sequences of a micro-batch: the worst case with or without
                packing), times the layers of the stage, times the micro-batches in flight under 1F1B (pp - stage,
                at most the micro-batches of a step), with recompute applied; plus the backward working set
                (without full recompute: two whole layers, calibrated by benchmarks/bench_memory_plan.py; with
                it: the replayed layer and its attention scores' gradient) and, on the local spec, the attention
                mask ([rows, S, S] when packed)
  log-probs     the last stage's log-prob stage (`logprob_stage_bytes`): fused = one [chunk, V/tp] fp32 logits
                buffer and, for bf16 weights, its bf16 copy for the backward GEMMs (the chunk: model.
                logprob_chunk_tokens, or `logprobs.auto_chunk_tokens` for the device, a ~1 GiB fp32 buffer on a
                GPU), the response hidden states and their gradient. The output weight's gradient accumulates
                straight into DDP's fp32 main_grad (counted under gradients): no fp32 or bf16 [V/tp, h] copy of it,
                only the uninitialised [V/tp, h] tensor autograd is handed afterwards (megatron's protocol), once
                the chunks are gone; logits = [rows * S, V/tp] logits with an fp32 log-softmax and its gradient
  vision        the tower's activations on the first stage (one layer's working set when frozen, every layer
                when trained) and the image embeddings a step keeps (one encoding per micro-batch)

Not counted: the CUDA context, NCCL buffers and allocator fragmentation (keep the headroom `fits` asks for),
and on CPU the interpreter and libraries (the validation benchmark measures RSS above its start).

Activation coefficients (elements per token per layer, see `_layer_elements`, and `_frozen_layer_elements` for a
frozen decoder: LoRA, model.freeze_llm) were read off the local spec with saved-tensor hooks and are checked the
same way by a test; the TE spec's are derived from its kernels (flash attention keeps no [s, s] scores) and need a
GPU to check. The backward working set on top of the saved tensors is calibrated by benchmarks/bench_memory_plan.py.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from megatron_po.config import Config
from megatron_po.flops import lora_adapters
from megatron_po.logprobs import auto_chunk_tokens
from megatron_po.models.family import FamilySpec
from megatron_po.models.shapes import ModelShape
from megatron_po.models.specs import LMShape, use_te_spec

GiB = 1024**3


# ---- parameters ----------------------------------------------------------------------------------------------------

def layer_params(lm: LMShape, tp: int) -> float:
    """One decoder layer's parameters on a TP rank: q/k/v (with bias), o, gate+up, down sharded; norms not."""
    h, f, kv = lm.hidden_size, lm.ffn_hidden_size, lm.num_query_groups * lm.kv_channels
    return (h * (h + 2 * kv) + (h + 2 * kv) + h * h + 3 * h * f) / tp + 2 * h


@dataclass
class StageParams:
    """Parameters of one rank of a pipeline stage, as the built modules hold them (the layout test compares)."""

    lm: float
    """The language model's, LoRA adapters of its decoder layers included (they are submodules of the layers)."""
    vision: float
    projector: float
    """The projector's, its LoRA adapters included."""
    trainable: float
    """What DDP and the optimizer hold: under LoRA the adapters only."""
    adapters: float = 0.0
    """The LoRA adapters among `lm` and `projector`."""


def stage_params(cfg: Config, shape: ModelShape, stage: int, layers: int) -> StageParams:
    par, lm, vis, tp = cfg.parallel, shape.lm, shape.vision, cfg.parallel.tp
    first, last = stage == 0, stage == par.pp - 1
    adapters = lora_adapters(cfg.model.lora, shape)
    n = layers * layer_params(lm, tp)
    embedding = shape.padded_vocab * lm.hidden_size / tp
    if first:
        n += embedding
    if last:
        n += lm.hidden_size  # final norm
        # tied: one weight without PP, a copy on the last stage with it (megatron's embedding group)
        n += embedding if (not lm.tie_embeddings or par.pp > 1) else 0
    tower = (vis.tower_sharded / tp + vis.tower_replicated) if first else 0.0
    projector = (vis.projector_sharded / tp + vis.projector_replicated) if first else 0.0
    if adapters is not None:  # every base weight frozen; the adapters of this stage's layers (and projector) train
        in_lm = layers * adapters.layer_params(tp)
        in_projector = adapters.projector_params(tp) if first else 0.0
        return StageParams(n + in_lm, tower, projector + in_projector, in_lm + in_projector, in_lm + in_projector)
    m = cfg.model
    trainable = (0 if m.freeze_llm else n) + (0 if m.freeze_vit else tower) + (0 if m.freeze_aligner else projector)
    return StageParams(n, tower, projector, trainable)


# ---- activations ---------------------------------------------------------------------------------------------------

def _layer_elements(cfg: Config, lm: LMShape, te: bool, recompute: bool) -> tuple[float, float]:
    """(elements in the activation dtype, fp32 elements) one decoder layer saves per token of a rank, with
    `model.recompute_modules` recomputed (`recompute`) or not.

    Local spec (measured with saved-tensor hooks, fp32): the fp32 norms keep input, x * rstd and output (3h + 1
    each, /tp under SP); rotary cos/sin of q and k (4d); q, k and v expanded to every head by GQA, the context
    (4h / tp); the softmax [a, s, s] (a s / tp); SwiGLU keeps fc1's output and two f-wide products (5f / tp).
    Selective core_attn keeps q, k and the qkv buffer instead of the expanded heads and softmax, and the context
    ((3h + 3k) / tp);
    selective mlp drops the 5f. TE spec: fused norm+linear keeps input and normed input (4h / sp), flash
    attention the qkv buffer, rotated q, k, output and a log-sum-exp per head, SwiGLU 3f, no [s, s] scores.
    """
    par, m = cfg.parallel, cfg.model
    tp, sp = par.tp, (par.tp if par.sp else 1)
    h, f, a, d = lm.hidden_size, lm.ffn_hidden_size, lm.num_attention_heads, lm.kv_channels
    k = lm.num_query_groups * d
    s = m.max_seq_length // par.cp
    modules = set(m.recompute_modules.split(",")) if recompute else set()
    if m.decoder_frozen:
        return _frozen_layer_elements(cfg, lm, te, modules)
    mlp = 0.0 if "mlp" in modules else 5 * f / tp
    if te:
        attn = (h + 2 * k + h + k + h) / tp
        return 4 * h / sp + attn + (0.0 if "mlp" in modules else 3 * f / tp), 2 / sp + 4 * d + a / tp
    if "core_attn" in modules:
        attn = (3 * h + 3 * k) / tp
    else:
        v_kept = (h + 2 * k) if lm.num_query_groups == a else h  # no GQA expansion: v is a view of the qkv buffer
        attn = (3 * h + v_kept + a * s) / tp
    return (6 * h + 2) / sp + 4 * d + attn + mlp, 0.0


def _frozen_layer_elements(cfg: Config, lm: LMShape, te: bool, modules: set[str]) -> tuple[float, float]:
    """`_layer_elements` of a decoder whose weights are frozen (model.lora, model.freeze_llm), with `modules`
    recomputed.

    A frozen linear keeps no input (megatron's LinearWithFrozenWeight keeps its weight only; Transformer-Engine's
    linears keep theirs only for a weight gradient), nor a frozen norm its x * rstd. An adapter keeps its linear's
    input for A's gradient, and A x ([.., r]; a column layer's gathered over the sequence) for B's; with dropout the
    dropped input instead of the input, and the mask: of the input's dtype where torch composes dropout (the CPU,
    measured; the local spec is counted so), one byte in CUDA's fused kernel (the TE spec's, a quarter fp32
    element). So, per token:

    local spec (measured with saved-tensor hooks): each norm its input and rstd ((h + 1) / sp); the norm outputs
    that feed an adapted qkv / fc1 (h / sp each; fc1's always under mlp recompute, whose checkpoint keeps its
    input); rotary 4d; the attention as for training minus the context, which an adapted proj keeps (h / tp);
    SwiGLU 4f / tp, plus its output where fc2 is adapted (f / tp); the adapters' A x.
    TE spec (derived from its kernels): each fused norm+linear its input (2h / sp in all) and rstd; an adapter on
    one (qkv, fc1) repeats the norm on its side (models/lora._te_normalize): an fp32 copy of the input and rstd
    and the normed input ((h + 1) / sp fp32, h / sp); the attention as for training (flash attention keeps the
    context proj's adapter reads); SwiGLU 2f / tp, plus its output where fc2 is adapted; the adapters' A x.
    """
    par, m = cfg.parallel, cfg.model
    tp, sp = par.tp, (par.tp if par.sp else 1)
    h, f, a, d = lm.hidden_size, lm.ffn_hidden_size, lm.num_attention_heads, lm.kv_channels
    k = lm.num_query_groups * d
    s = m.max_seq_length // par.cp
    mlp_replayed = "mlp" in modules
    adapted = set(m.lora.targets) if m.lora.enabled else set()
    if mlp_replayed:  # fc1's and fc2's adapters run inside the MLP's checkpoint: they keep nothing
        adapted -= {"linear_fc1", "linear_fc2"}
    on = {name: 1.0 if name in adapted else 0.0 for name in ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")}
    r = m.lora.rank
    a_x = r * (on["linear_qkv"] + on["linear_fc1"]) + r / sp * (on["linear_proj"] + on["linear_fc2"])
    inputs = {"linear_qkv": h / sp, "linear_proj": h / tp, "linear_fc1": h / sp, "linear_fc2": f / tp}
    masks = sum(inputs[n] * on[n] for n in on) if m.lora.dropout else 0.0  # elements
    swiglu_out = f / tp * on["linear_fc2"]
    if te:
        # flash attention keeps the context anyway: a dropped copy for proj's adapter comes on top
        dropped_context = h / tp * on["linear_proj"] if m.lora.dropout else 0.0
        attn = (h + 2 * k + h + k + h) / tp + dropped_context
        normed = on["linear_qkv"] + on["linear_fc1"]
        mlp = 0.0 if mlp_replayed else 2 * f / tp + swiglu_out
        act = 2 * h / sp + normed * h / sp + attn + mlp + a_x
        return act, 2 / sp + 4 * d + a / tp + normed * (h + 1) / sp + masks / 4
    norm_outputs = (on["linear_qkv"] + (1.0 if mlp_replayed else on["linear_fc1"])) * h / sp
    if "core_attn" in modules:
        attn = (2 * h + 3 * k) / tp
    else:
        v_kept = (h + 2 * k) if lm.num_query_groups == a else h
        attn = (2 * h + v_kept + a * s) / tp
    attn += h / tp * on["linear_proj"]
    mlp = 0.0 if mlp_replayed else 4 * f / tp + swiglu_out
    return (2 * h + 2) / sp + norm_outputs + 4 * d + attn + mlp + a_x + masks, 0.0


def logprob_stage_bytes(tokens: int, vocab_local: int, hidden: int, act_bytes: int, chunk_tokens: int,
                        device_type: str, weight_trainable: bool, into_main_grad: bool = True) -> float:
    """Peak bytes of the fused log-prob stage (`logprobs.fused_linear_token_logps`) on one rank.

    Args:
        tokens: positions scored (the micro-batch's, a bound on its response tokens).
        vocab_local: V/tp.
        hidden: h.
        act_bytes: bytes per element of the weight and activations (bf16: 2).
        chunk_tokens: model.logprob_chunk_tokens (0: `auto_chunk_tokens` for `device_type`).
        device_type: where it runs ("cuda" for the plans of GPU jobs).
        weight_trainable: the output weight takes a gradient.
        into_main_grad: it accumulates into megatron DDP's fp32 main_grad (the trainer's case); else the stage
            holds its own fp32 [V/tp, h] gradient (and returns it cast to the weight's dtype).
    """
    chunk = min(chunk_tokens or auto_chunk_tokens(int(vocab_local), device_type), tokens)
    # the fp32 logits of a chunk; in backward their copy in the weight's dtype feeds the bf16 GEMMs
    held = buffers = chunk * vocab_local * (4 + (act_bytes if act_bytes != 4 else 0))
    weight = vocab_local * hidden * act_bytes
    if weight_trainable and into_main_grad:
        # after the last chunk autograd is handed an uninitialised [V/tp, h] tensor of the weight's dtype
        held = max(buffers, weight)
    elif weight_trainable:
        # an fp32 gradient throughout, and at the end its copy in the weight's dtype (bf16)
        held = vocab_local * hidden * 4 + max(buffers, weight if act_bytes != 4 else 0)
    # the response positions' hidden states and their gradient
    return held + 2 * tokens * hidden * act_bytes


ROWS = [  # (label, RankPlan field): the terms of a rank's total, in print order
        ("weights (policy)", "weights_policy"), ("weights (reference)", "weights_reference"),
        ("gradients (fp32)", "gradients"), ("optimizer", "optimizer"), ("activations", "activations"),
        ("log-prob stage", "logprob_stage"), ("vision tower", "vision"), ("attention mask", "attention_mask")]


@dataclass
class RankPlan:
    """Bytes one rank of a pipeline stage holds at its peak (a training step's backward)."""

    stage: int
    layers: int
    ranks: str
    weights_policy: float = 0.0
    weights_reference: float = 0.0
    gradients: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0
    logprob_stage: float = 0.0
    vision: float = 0.0
    attention_mask: float = 0.0
    details: dict = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(getattr(self, key) for _, key in ROWS)


@dataclass
class MemoryPlan:
    world_size: int
    tp: int
    pp: int
    cp: int
    dp: int
    micro_batches: int
    rows: int
    tokens_per_row: int
    device_memory_gb: float
    headroom: float
    stages: list[RankPlan]
    reference: str = "model"
    """Where the reference comes from as planned: model (a second model's weights), adapters_off (the policy's
    base: nothing more), cache, or none (the objective reads no reference)."""
    lora_rank: int = 0
    """model.lora.rank (0: full fine-tuning of what the freeze_* switches leave trainable)."""

    @property
    def peak(self) -> float:
        return max(r.total for r in self.stages)

    @property
    def fits(self) -> bool:
        return self.peak <= self.device_memory_gb * GiB * (1 - self.headroom)

    def to_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "stages"}
        out["stages"] = [dict(asdict(r), total=r.total) for r in self.stages]
        out.update(peak=self.peak, fits=self.fits)
        return out


def rows_per_micro_batch(cfg: Config, objective_rows: int = 2) -> int:
    """Sequences of a micro-batch: chosen and rejected per pair (P2-DPO: its six branches)."""
    return objective_rows * cfg.train.micro_batch_size


def build_plan(cfg: Config, family: FamilySpec, world_size: int, device_memory_gb: float = 80.0,
               rows: int | None = None, needs_reference: bool = True, headroom: float = 0.1, te: bool | None = None,
               row_tokens: int | None = None, device_type: str = "cuda") -> MemoryPlan:
    """The memory plan of `cfg` on `world_size` ranks.

    Args:
        family: `model.family`'s spec: the decoder and vision shapes from the config and the files it names alone
            (no weights are read; `MissingShapes` when an HF family's config.json is not there).
        rows: rows per micro-batch (default: 2 x micro_batch_size, chosen + rejected; packed rows are fewer).
        row_tokens: tokens per row (default: model.max_seq_length, the longest a row can be padded to).
        needs_reference: the objective reads reference log-probs (a reference model unless the cache serves them,
            or under LoRA the policy with its adapters off: reference.source=adapters_off).
        headroom: the share of device memory left for what is not counted (CUDA context, NCCL, fragmentation).
        te: count the Transformer-Engine spec's activations (default: what model.spec selects here).
        device_type: the device the job runs on ("cpu" for the CPU validation runs): sizes the log-prob chunk.
    """
    par, m, tr = cfg.parallel, cfg.model, cfg.train
    dp = cfg.validate_world(world_size)
    shape = family.model_shape(cfg)
    lm, vis = shape.lm, shape.vision
    te = use_te_spec(m) if te is None else te
    rows = rows or rows_per_micro_batch(cfg)
    act_bytes = 2 if m.params_dtype == "bf16" else 4
    micro_batches = tr.global_batch_size // (dp * tr.micro_batch_size)
    row_tokens = row_tokens or m.max_seq_length
    tokens = rows * row_tokens // par.cp  # this rank's tokens of one micro-batch (before SP)
    reference_model = needs_reference and cfg.reference.source == "model"
    live_reference = needs_reference and cfg.reference.source in ("model", "adapters_off")
    projector_adapted = m.lora.enabled and "projector" in m.lora.targets
    # the policy's tower and projector take no gradient: one encoding serves the reference too (train/step.Tower)
    policy_vision_frozen = m.freeze_vit and m.freeze_aligner and not projector_adapted
    sp = par.tp if par.sp else 1
    act, fp32 = _layer_elements(cfg, lm, te, recompute=m.recompute == "selective")
    per_layer = tokens * (act * act_bytes + fp32 * 4)
    act, fp32 = _layer_elements(cfg, lm, te, recompute=False)
    whole_layer = tokens * (act * act_bytes + fp32 * 4)  # every intermediate, as when replayed
    stages = []
    for stage, layers in enumerate(par.stage_layers(lm.num_layers)):
        first, last = stage == 0, stage == par.pp - 1
        p = stage_params(cfg, shape, stage, layers)
        r = RankPlan(stage, layers, f"pp_rank {stage}" if par.pp > 1 else "every rank")
        r.weights_policy = (p.lm + p.vision + p.projector) * act_bytes
        if reference_model:  # a copy of the base: no adapters
            own_tower = 0.0 if policy_vision_frozen else p.vision + p.projector
            r.weights_reference = (p.lm + own_tower - p.adapters) * act_bytes
        r.gradients = p.trainable * 4
        optim = (12 if m.params_dtype == "bf16" else 8) * p.trainable
        r.optimizer = optim / dp if par.use_distributed_optimizer else optim
        in_flight = min(par.pp - stage, micro_batches)
        if m.recompute == "full":
            unit = m.recompute_num_layers
            if m.recompute_method == "uniform":
                stored = math.ceil(layers / unit) * tokens * lm.hidden_size / sp * act_bytes
                replayed = min(unit, layers) - 1  # the other layers of the unit replayed in backward
            else:
                kept = max(layers - unit, 0)
                stored = min(unit, layers) * tokens * lm.hidden_size / sp * act_bytes + kept * per_layer
                replayed = 0
            # backward working set: the replayed layer's intermediates and the gradient of its attention scores
            scores = 0.0 if te else tokens * lm.num_attention_heads * row_tokens / par.tp * act_bytes
            r.activations = in_flight * stored + (replayed + 1) * whole_layer + scores
        else:
            # backward working set: the layer's intermediates once more and their gradients (calibrated on CPU:
            # one layer's worth did not cover the measured peaks, two do within the benchmark's +-20%)
            r.activations = in_flight * layers * per_layer + 2 * whole_layer
        if last:
            r.activations += in_flight * tokens * (2 * lm.hidden_size + 1) / sp * 4  # final norm (fp32 inside)
        if not te:
            s = row_tokens
            # one [1, 1, S, S] causal mask per micro-batch unpacked; [rows, 1, S, S] built in ~3 bool passes packed
            r.attention_mask = (3 * rows * s * s if cfg.data.packing else s * s) * in_flight
        if last:
            vocab_local = shape.padded_vocab / par.tp
            if m.logprobs == "fused":
                r.logprob_stage = logprob_stage_bytes(tokens, vocab_local, lm.hidden_size, act_bytes,
                                                      m.logprob_chunk_tokens, device_type, not m.decoder_frozen)
            else:
                r.logprob_stage = tokens * vocab_local * (act_bytes + 3 * 4)
        if first:
            embeds = micro_batches * tr.micro_batch_size * vis.image_tokens_per_pair * lm.hidden_size * act_bytes
            patches = tr.micro_batch_size * vis.patches_per_pair
            per_vlayer = patches * (10 * vis.hidden + 3 * vis.ffn / par.tp + vis.heads * vis.attention_span) * 4
            trained = not m.freeze_vit
            # a reference that does not share the policy's encoding keeps its own
            r.vision = embeds * (2 if live_reference and not policy_vision_frozen else 1) + per_vlayer * (
                vis.layers * in_flight if trained else 1)
        r.details = {"params_lm": p.lm, "params_vision": p.vision, "params_projector": p.projector,
                     "params_trainable": p.trainable, "params_adapters": p.adapters,
                     "in_flight_micro_batches": in_flight, "activation_bytes_per_layer": per_layer,
                     "tokens_per_micro_batch": tokens}
        stages.append(r)
    reference = cfg.reference.source if needs_reference else "none"
    return MemoryPlan(world_size, par.tp, par.pp, par.cp, dp, micro_batches, rows, row_tokens,
                      device_memory_gb, headroom, stages, reference, m.lora.rank)


def _reference_note(plan: MemoryPlan) -> str:
    notes = {"model": "model (a second, frozen copy)", "adapters_off": "adapters_off (the policy's base: no second "
             "model)", "cache": "cache (no reference model)", "none": "none (the objective reads none)"}
    return notes.get(plan.reference, plan.reference)


def _lora_note(cfg: Config) -> str:
    lora = cfg.model.lora
    if not lora.enabled:
        return "lora=off (full fine-tuning)"
    return f"lora=rank {lora.rank}, alpha {lora.alpha:g} on {lora.target_modules} (base frozen, adapters train)"


def format_plan(plan: MemoryPlan, cfg: Config) -> str:
    par, m = cfg.parallel, cfg.model
    head = (f"memory plan: world {plan.world_size} = tp {plan.tp} x pp {plan.pp} x cp {plan.cp} x dp {plan.dp}; "
            f"{plan.micro_batches} micro-batches of {plan.rows} rows x {plan.tokens_per_row} tokens per step; "
            f"{m.params_dtype}, sp={par.sp}, recompute={m.recompute}, packing={cfg.data.packing}, "
            f"logprobs={m.logprobs}, reference={_reference_note(plan)}, {_lora_note(cfg)}, "
            f"distributed optimizer={par.use_distributed_optimizer}; overlap: grad reduce={par.overlap_grad_reduce}, "
            f"param gather={par.overlap_param_gather and par.use_distributed_optimizer} (megatron's buckets are views "
            f"of the gradient and parameter buffers: no extra memory); fusions={m.fusions}")
    cols = [f"stage {r.stage} ({r.layers} layers)" for r in plan.stages]
    width = max(14, *(len(c) for c in cols))
    lines = [head, f"{'GiB per rank':<22}" + "".join(f"{c:>{width + 2}}" for c in cols)]
    for label, key in ROWS:
        lines.append(f"{label:<22}" + "".join(f"{getattr(r, key) / GiB:>{width + 2}.2f}" for r in plan.stages))
    lines.append(f"{'total':<22}" + "".join(f"{r.total / GiB:>{width + 2}.2f}" for r in plan.stages))
    budget = plan.device_memory_gb * (1 - plan.headroom)
    verdict = "fits" if plan.fits else "does NOT fit"
    lines.append(f"peak {plan.peak / GiB:.2f} GiB per rank {verdict} in {plan.device_memory_gb:g} GiB "
                 f"({budget:.1f} GiB after {plan.headroom:.0%} headroom for the CUDA context, NCCL buffers and "
                 "fragmentation, which are not counted)")
    if cfg.checkpoint.async_save:
        # megatron copies each rank's shards to host memory before its background writer runs
        staged = max(r.weights_policy + r.optimizer for r in plan.stages)
        lines.append(f"host memory: checkpoint.async_save stages up to {staged / GiB:.2f} GiB per rank (its weights "
                     "and optimizer state) in host memory while a checkpoint is written")
    return "\n".join(lines)
