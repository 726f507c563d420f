"""The shapes of a family's model as the memory plan counts them, made by the family's spec from the config (and
the files under model.hf_path) alone: the decoder's `LMShape` (models/specs.py), the vision tower's
`VisionFootprint`, and both together as a `ModelShape`. They live with the models so that the families build them
and memory_plan.py only reads them (imports point down)."""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_po.models.specs import LMShape


class MissingShapes(ValueError):
    """The HF family's config.json is not here (a cluster path): the config is valid, the plan cannot be made."""


@dataclass(frozen=True)
class VisionFlops:
    """A family's vision tower and projector as the FLOP count sees them: forward FLOPs of an image of n decoder
    tokens are ``dense * n + window * n + full * n^2 + projector * n`` (the tower's patches are a fixed multiple of
    the decoder tokens), with ``window`` the windowed / per-tile attention and ``full`` the whole-image attention."""

    dense_per_token: float = 0.0
    """2 x the tower's GEMM weights applied per patch, times patches per decoder token (patch embedding included)."""
    window_per_token: float = 0.0
    """4 x hidden x span x patches per token, summed over the layers that attend within a window or tile."""
    full_per_token2: float = 0.0
    """4 x hidden x patches-per-token^2, summed over the layers that attend over the whole image."""
    projector_per_token: float = 0.0
    """2 x the projector's GEMM weights (applied once per decoder token)."""

    def tower(self, image_tokens: float, image_tokens_sq: float) -> float:
        """The tower's forward FLOPs over images with these summed decoder tokens and summed squared tokens."""
        return (self.dense_per_token + self.window_per_token) * image_tokens + self.full_per_token2 * image_tokens_sq

    def projector(self, image_tokens: float) -> float:
        return self.projector_per_token * image_tokens


@dataclass(frozen=True)
class LinearSite:
    """One linear at its whole (unsplit) widths, and how TP splits it (models/lora.py's convention for its adapter:
    column-parallel: A replicated, B split like the output; row-parallel: A split like the input, B replicated)."""

    name: str
    kind: str
    """'column', 'row' or 'replicated' (a plain torch linear on every TP rank)."""
    in_features: int
    out_features: int

    def gemm_flops(self) -> float:
        """Forward FLOPs of the linear per token."""
        return 2.0 * self.in_features * self.out_features

    def adapter_flops(self, rank: int) -> tuple[float, float]:
        """Forward FLOPs per token of a rank-r adapter's A [r, in] and B [out, r] GEMMs."""
        return 2.0 * rank * self.in_features, 2.0 * rank * self.out_features

    def adapter_params(self, rank: int, tp: int) -> float:
        """A's and B's parameters on one TP rank: the split half divided by tp."""
        a, b = rank * self.in_features, rank * self.out_features
        if self.kind == "column":
            return a + b / tp
        if self.kind == "row":
            return a / tp + b
        return float(a + b)


@dataclass(frozen=True)
class VisionFootprint:
    """A family's vision tower and projector as the memory plan counts them (parameters exact, activations from
    the worst-case image of a pair)."""

    tower_sharded: int
    """Tower parameters split over TP (megatron layers), counted whole."""
    tower_replicated: int
    """Tower parameters every TP rank holds whole (plain torch towers, embeddings, norms, biases after a row split)."""
    projector_sharded: int
    projector_replicated: int
    hidden: int
    ffn: int
    heads: int
    layers: int
    patches_per_pair: int
    """Tower input tokens of one pair's images at the largest size the processor makes (tiles x patches)."""
    attention_span: int
    """Patches each patch attends to (a tile, or a window)."""
    image_tokens_per_pair: int
    """Decoder tokens the pair's images become."""
    flops: VisionFlops = field(default_factory=VisionFlops)
    """The tower's and projector's forward FLOPs per image (megatron_po/flops.py)."""
    projector_linears: tuple[LinearSite, ...] = ()
    """The projector's linears in forward order, per decoder image token (what 'projector' in
    model.lora.target_modules adapts: the FLOP count and the memory plan of its adapters)."""


@dataclass(frozen=True)
class ModelShape:
    lm: LMShape
    padded_vocab: int
    """The embedding's rows: the vocabulary padded for TP (models.specs.padded_vocab_size)."""
    vision: VisionFootprint
