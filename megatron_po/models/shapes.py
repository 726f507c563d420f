"""The shapes of a family's model as the memory plan counts them, made by the family's spec from the config (and
the files under model.hf_path) alone: the decoder's `LMShape` (models/specs.py), the vision tower's
`VisionFootprint`, and both together as a `ModelShape`. They live with the models so that the families build them
and memory_plan.py only reads them (imports point down)."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_po.models.specs import LMShape


class MissingShapes(ValueError):
    """The HF family's config.json is not here (a cluster path): the config is valid, the plan cannot be made."""


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


@dataclass(frozen=True)
class ModelShape:
    lm: LMShape
    padded_vocab: int
    """The embedding's rows: the vocabulary padded for TP (models.specs.padded_vocab_size)."""
    vision: VisionFootprint
