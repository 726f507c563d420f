"""The one model-FLOP count of a training step: the trainer's `flops/*` and `mfu` metrics, benchmarks/bench_gpu_step.py
and `megatron-po sweep` all read it.

Model FLOPs (the MFU convention of Megatron-LM and PaLM): the matrix multiplications the model needs for the real
tokens, whatever the kernels do to get them. Not counted: padding positions, recompute replays, element-wise work
(norms, softmax, rotary, activations), embeddings lookups and the optimizer. Per forward pass of the decoder:

    dense      2 L P_mm T        P_mm = h q + 2 h k + q h + 3 h f: the q, k, v, output and SwiGLU weights of a layer
                                 (q = heads x head dim, k = query groups x head dim; biases and norms are not GEMMs)
    attention  4 L q sum_i s_i^2 QK^T and PV of every sequence i of s_i tokens, each counted whole (s^2, not the
                                 causal s^2 / 2: Megatron-LM's `num_floating_point_operations` does the same); a
                                 packed row counts its sequences, not the row
    head       2 V h R           the [V, h] output weight meets the R response positions only (the fused log-prob
                                 stage never makes the other positions' logits; V = the padded vocabulary)

and per image, for the tower and projector (`VisionFlops`). A step is 3 decoder passes for the policy (forward,
and backward's data and weight gradients), one more forward for a live reference (zero with the cache) and one for
an objective's global-batch statistics; the vision tower runs forward once per step when frozen (its one encoding
serves every pass) and 3 times when trained, plus the reference's own forward when the towers differ.

A frozen decoder (model.lora, model.freeze_llm: `StepPasses.frozen_base`) takes no weight gradients: megatron's
LinearWithFrozenWeight and the fused log-prob stage compute the input gradient only, so its GEMMs and head count
twice (forward, data gradient), the attention core still 3 times (the backward of QK^T and of PV is two input-
gradient products each). Where nothing before the decoder trains, the first layer's backward starts at its first
adapted linear (autograd computes no gradient for a tensor no trainable weight produced). LoRA adds each adapter's
two small GEMMs, 2 r (in + out) per token forward, 3 times in the policy pass (forward, both weight gradients and
the data gradients; A's input gradient only where the input takes one). The adapters-off reference is a forward of
the base.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass, field, fields

from megatron_po.models.shapes import LinearSite, ModelShape
from megatron_po.models.specs import LMShape


@dataclass(frozen=True)
class Work:
    """What one decoder pass over some rows processes, counted on the host when the rows are made (train/batch.py)."""

    tokens: int = 0
    """Real tokens (padding excluded)."""
    positions: int = 0
    """Positions processed, padding included (`tokens/processed`)."""
    attention: int = 0
    """sum_i s_i^2 over the sequences (a packed row's sequences counted apart)."""
    response: int = 0
    """Response (supervised) positions: where the output head is applied."""
    image_tokens: tuple[int, ...] = field(default=())
    """Decoder tokens of each image the pass encodes."""

    def __add__(self, other: "Work") -> "Work":
        scalars = [a + b for a, b in zip(astuple(self)[:4], astuple(other)[:4])]
        return Work(*scalars, self.image_tokens + other.image_tokens)

    def scalars(self) -> list[float]:
        """The summable fields plus the images' tokens and squared tokens (what a DP all-reduce carries)."""
        return [float(getattr(self, f.name)) for f in fields(self)[:4]] + [
            float(sum(self.image_tokens)), float(sum(n * n for n in self.image_tokens)), float(len(self.image_tokens))]


def layer_gemm_weights(lm: LMShape) -> int:
    """P_mm: one decoder layer's GEMM weights (q, k, v, output, SwiGLU gate + up + down)."""
    h, f = lm.hidden_size, lm.ffn_hidden_size
    q, k = lm.num_attention_heads * lm.kv_channels, lm.num_query_groups * lm.kv_channels
    return h * q + 2 * h * k + q * h + 3 * h * f


def decoder_forward(shape: ModelShape, tokens: float, attention: float, response: float) -> dict[str, float]:
    """Forward FLOPs of one decoder pass, by part."""
    lm = shape.lm
    q = lm.num_attention_heads * lm.kv_channels
    return {"dense": 2.0 * lm.num_layers * layer_gemm_weights(lm) * tokens,
            "attention": 4.0 * lm.num_layers * q * attention,
            "head": 2.0 * shape.padded_vocab * lm.hidden_size * response}


# ---- linears and LoRA adapters ---------------------------------------------------------------------------------------

def decoder_linears(lm: LMShape) -> tuple[LinearSite, ...]:
    """A decoder layer's linears in forward order (megatron's names): fused q/k/v, output, SwiGLU gate + up, down.
    The core attention sits between the first two."""
    h, f = lm.hidden_size, lm.ffn_hidden_size
    q, k = lm.num_attention_heads * lm.kv_channels, lm.num_query_groups * lm.kv_channels
    return (LinearSite("linear_qkv", "column", h, q + 2 * k), LinearSite("linear_proj", "row", q, h),
            LinearSite("linear_fc1", "column", h, 2 * f), LinearSite("linear_fc2", "row", f, h))


@dataclass(frozen=True)
class Adapters:
    """model.lora's adapters as the FLOP count and the memory plan see them."""

    rank: int
    decoder: tuple[LinearSite, ...]
    """The adapted linears of every decoder layer."""
    projector: tuple[LinearSite, ...] = ()
    """The projector's adapted linears ('projector' in model.lora.target_modules)."""

    def layer_params(self, tp: int) -> float:
        """One decoder layer's adapter parameters on a TP rank."""
        return sum(s.adapter_params(self.rank, tp) for s in self.decoder)

    def projector_params(self, tp: int) -> float:
        return sum(s.adapter_params(self.rank, tp) for s in self.projector)

    def layer_forward(self) -> float:
        """Forward FLOPs of one decoder layer's adapters per token."""
        return sum(sum(s.adapter_flops(self.rank)) for s in self.decoder)

    def projector_forward(self) -> float:
        """Forward FLOPs of the projector's adapters per decoder image token."""
        return sum(sum(s.adapter_flops(self.rank)) for s in self.projector)


def lora_adapters(lora, shape: ModelShape) -> Adapters | None:
    """The adapters of `lora` (config.LoraConfig) on this family's model; None without LoRA."""
    if not lora.enabled:
        return None
    decoder = tuple(s for s in decoder_linears(shape.lm) if s.name in lora.targets)
    projector = shape.vision.projector_linears if "projector" in lora.targets else ()
    return Adapters(lora.rank, decoder, projector)


def chain_pass(sites: tuple[LinearSite, ...], adapted: set[str], rank: int, tokens: float, grad_in: bool,
               core_after: str = "", core: float = 0.0) -> tuple[float, bool]:
    """Forward + backward FLOPs of frozen linears in forward order, some adapted, over `tokens` tokens, and whether
    the output takes a gradient.

    A frozen GEMM: forward, plus its input gradient when its input takes one (`grad_in`). An adapter: forward,
    A's and B's weight gradients, B's input gradient (A x depends on A), and A's input gradient when `grad_in`;
    after it everything takes a gradient. `core` (FLOPs of a part without weights, the attention core) runs after
    the linear named `core_after`: forward, and its two input-gradient products per forward product when `grad_in`.
    """
    total = 0.0
    for site in sites:
        fwd = site.gemm_flops() * tokens
        total += fwd * (2.0 if grad_in else 1.0)
        if site.name in adapted:
            a, b = (x * tokens for x in site.adapter_flops(rank))
            total += 3.0 * (a + b) - (0.0 if grad_in else a)
            grad_in = True
        if site.name == core_after:
            total += core * (3.0 if grad_in else 1.0)
    return total, grad_in


@dataclass(frozen=True)
class StepPasses:
    """Which passes a training step runs (train/costs.step_passes reads them off the trainer's state)."""

    live_reference: bool
    """A reference model runs forward (reference.source=model for an objective that reads one)."""
    statistics_pass: bool = False
    """The objective's global-batch statistics take a no-grad policy forward (Objective.global_batch_stats)."""
    shared_encoding: bool = True
    """The policy's tower and projector are frozen: each micro-batch is encoded once per step, for every pass."""
    vit_trained: bool = False
    projector_trained: bool = False
    reference_own_tower: bool = False
    """The live reference encodes with its own tower (when the policy's is not a frozen copy of it)."""
    frozen_base: bool = False
    """The decoder's weights take no gradient (model.lora, model.freeze_llm): its backward computes input gradients
    only. A live reference then may be the policy with its adapters off (`live_reference` stays true)."""
    adapters: Adapters | None = None
    """model.lora's adapters on the frozen base."""
    decoder_input_grad: bool = True
    """The first decoder layer's input takes a gradient: something before it trains (the embedding, the tower or
    the projector). Without, nothing before the first layer's first adapter gets one."""


def step_flops(shape: ModelShape, passes: StepPasses, policy: list[float],
               reference: list[float] | None = None) -> dict[str, float]:
    """Model FLOPs of one optimizer step by pass, and their total.

    Args:
        policy: `Work.scalars()` of the step's policy rows (summed over the global batch).
        reference: the same for the reference's rows (default: the policy's; P2-DPO's may differ).
    """
    reference = policy if reference is None else reference
    tokens, _, attention, response, img, img_sq, _ = policy
    fwd = sum(decoder_forward(shape, tokens, attention, response).values())
    adapters = passes.adapters
    adapter_fwd = adapters.layer_forward() * shape.lm.num_layers * tokens if adapters else 0.0
    out = {"policy": policy_pass(shape, passes, tokens, attention, response),
           "statistics": fwd + adapter_fwd if passes.statistics_pass else 0.0, "reference": 0.0}
    if passes.live_reference:  # a frozen copy, or the policy with its adapters off: the base's forward either way
        r_tokens, _, r_attention, r_response = reference[:4]
        out["reference"] = sum(decoder_forward(shape, r_tokens, r_attention, r_response).values())
    out["vision"] = vision_passes(shape, passes, img, img_sq)
    out["total"] = sum(out.values())
    return out


def policy_pass(shape: ModelShape, passes: StepPasses, tokens: float, attention: float, response: float) -> float:
    """The policy's forward + backward FLOPs over the decoder and head (the `policy` entry of `step_flops`)."""
    parts = decoder_forward(shape, tokens, attention, response)
    if not passes.frozen_base:
        return 3.0 * sum(parts.values())
    lm, adapters = shape.lm, passes.adapters
    rank, adapted = (adapters.rank, {s.name for s in adapters.decoder}) if adapters else (0, set())
    sites, core = decoder_linears(lm), parts["attention"] / lm.num_layers

    def layer(grad_in: bool) -> tuple[float, bool]:
        return chain_pass(sites, adapted, rank, tokens, grad_in, core_after="linear_qkv", core=core)

    first, grad_in = layer(passes.decoder_input_grad)
    rest, grad_in = layer(grad_in) if lm.num_layers > 1 else (0.0, grad_in)
    return first + (lm.num_layers - 1) * rest + parts["head"] * (2.0 if grad_in else 1.0)


def vision_passes(shape: ModelShape, passes: StepPasses, img: float, img_sq: float) -> float:
    """The tower's and projector's FLOPs of a step (the `vision` entry of `step_flops`)."""
    vision = shape.vision.flops
    tower, projector = vision.tower(img, img_sq), vision.projector(img)
    own_reference = tower + projector if passes.live_reference and passes.reference_own_tower else 0.0
    if passes.shared_encoding:  # one encoding, without grad, serves every pass
        return tower + projector + own_reference
    # the policy pass trains what is not frozen; a statistics pass encodes again, without grad
    again = 1.0 if passes.statistics_pass else 0.0
    adapters = passes.adapters
    if passes.projector_trained:
        policy_projector = 3.0 * projector
    elif adapters and adapters.projector:  # a frozen projector under adapters, fed the tower's output
        adapted = {s.name for s in adapters.projector}
        policy_projector = chain_pass(adapters.projector, adapted, adapters.rank, img, passes.vit_trained)[0]
    else:
        policy_projector = projector
    projector_forward = projector + (adapters.projector_forward() * img if adapters else 0.0)
    return (tower * ((3.0 if passes.vit_trained else 1.0) + again) + policy_projector + projector_forward * again
            + own_reference)


# ---- the device's peak ---------------------------------------------------------------------------------------------

PEAK_BF16_TFLOPS = (
    # (substring of torch.cuda.get_device_name(), dense bf16 TFLOP/s per GPU from the vendor's data sheet)
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.4),  # SXM5 (the name reads "NVIDIA H100 80GB HBM3")
    ("GH200", 989.4),
    ("H200", 989.4),
    ("A100", 312.0),
    ("B200", 2250.0),
)
"""Dense (not 2:4 sparse) bf16 tensor-core peaks; the first matching entry wins, so the specific names come first."""


def device_peak_tflops(device_name: str) -> float | None:
    """The table's dense bf16 peak of a CUDA device by name; None when it is not in the table (or a CPU)."""
    for key, peak in PEAK_BF16_TFLOPS:
        if key in device_name:
            return peak
    return None
