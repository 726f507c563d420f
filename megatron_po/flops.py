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
"""

from __future__ import annotations

from dataclasses import astuple, dataclass, field, fields

from megatron_po.models.shapes import ModelShape
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
    out = {"policy": 3.0 * fwd, "statistics": fwd if passes.statistics_pass else 0.0, "reference": 0.0}
    if passes.live_reference:
        r_tokens, _, r_attention, r_response = reference[:4]
        out["reference"] = sum(decoder_forward(shape, r_tokens, r_attention, r_response).values())
    vision = shape.vision.flops
    tower, projector = vision.tower(img, img_sq), vision.projector(img)
    if passes.shared_encoding:
        encodings = tower + projector
    else:  # the policy pass trains what is not frozen; a statistics pass encodes again, without grad
        again = 1.0 if passes.statistics_pass else 0.0
        encodings = (tower * ((3.0 if passes.vit_trained else 1.0) + again)
                     + projector * ((3.0 if passes.projector_trained else 1.0) + again))
    if passes.live_reference and passes.reference_own_tower:
        encodings += tower + projector
    out["vision"] = encodings
    out["total"] = sum(out.values())
    return out


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
