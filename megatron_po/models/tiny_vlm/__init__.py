"""The built-in tiny family (`model.family: tiny_vlm`): a ViT, an MLP projector and a Qwen2.5-shaped decoder whose
shapes are config fields (model.*, model.vision.*), with our SentencePiece tokenizer trained on the data. It
trains from random weights (the demo) or a previous stage's checkpoint; it is never converted from HF."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from megatron_po.models.family import FamilySpec
from megatron_po.models.shapes import LinearSite, ModelShape, VisionFlops, VisionFootprint
from megatron_po.models.specs import lm_shape_of, padded_vocab_size


def build_model(cfg, groups, vocab_size: int):
    from megatron_po.models.tiny_vlm.model import build_vlm

    if cfg.model.vocab_size and cfg.model.vocab_size < vocab_size:
        raise ValueError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {vocab_size}")
    vocab = cfg.model.vocab_size or vocab_size  # larger: rows no token uses (benchmarks at real vocab sizes)
    return build_vlm(cfg.model, cfg.parallel, padded_vocab_size(vocab, cfg.parallel.tp), groups, seed=cfg.train.seed)


def build_tokenizer(cfg, tok_path: Path):
    from megatron_po.data.tokenizer import Tokenizer

    return Tokenizer(tok_path)


def vision_footprint(cfg) -> VisionFootprint:
    """tiny_vlm's ViT (megatron layers, TP-sharded) and MLP projector (gated like the decoder's MLP)."""
    v, m = cfg.model.vision, cfg.model
    hv, fv = v.hidden_size, v.ffn_hidden_size
    # per layer: qkv and fc1 (weight + bias) and the proj/fc2 weights split over TP; their biases and norms not
    sharded = v.num_layers * (3 * hv * hv + 3 * hv + hv * hv + hv * fv + fv + fv * hv)
    replicated = v.num_layers * (2 * hv + 4 * hv) + 2 * hv + 3 * v.patch_size**2 * hv + hv + v.num_patches * hv
    projector = hv * 2 * m.ffn_hidden_size + m.ffn_hidden_size * m.hidden_size
    # one decoder token per patch; every layer attends over the image's patches (bidirectional)
    flops = VisionFlops(dense_per_token=2 * (3 * v.patch_size**2 * hv + v.num_layers * (4 * hv * hv + 2 * hv * fv)),
                        window_per_token=4 * hv * v.num_patches * v.num_layers, projector_per_token=2 * projector)
    return VisionFootprint(tower_sharded=sharded, tower_replicated=replicated, projector_sharded=projector,
                           projector_replicated=0, hidden=hv, ffn=fv, heads=v.num_attention_heads,
                           layers=v.num_layers, patches_per_pair=v.num_patches, attention_span=v.num_patches,
                           image_tokens_per_pair=v.num_patches, flops=flops,
                           # megatron's MultimodalProjector, gated like the decoder's MLP
                           projector_linears=(LinearSite("linear_fc1", "column", hv, 2 * m.ffn_hidden_size),
                                              LinearSite("linear_fc2", "row", m.ffn_hidden_size, m.hidden_size)))


def model_shape(cfg) -> ModelShape:
    vocab = cfg.model.vocab_size or cfg.data.tokenizer_vocab_size
    return ModelShape(lm_shape_of(cfg.model, vocab), padded_vocab_size(vocab, cfg.parallel.tp), vision_footprint(cfg))


def image_handler(model, tokenizer):
    """Every image resized to model.vision.image_size, worth model.vision.num_patches slots."""
    from megatron_po.data.fixed_images import FixedSizeImages

    return FixedSizeImages(model.vision.image_size, model.vision.num_patches)


def cache_settings(model) -> dict:
    """Shapes and image slots are config fields (an HF family's come from hashed files)."""
    out = {f"model.{k}": getattr(model, k) for k in ("num_layers", "hidden_size", "ffn_hidden_size",
                                                     "num_attention_heads", "num_query_groups", "rotary_base",
                                                     "norm_epsilon", "init_method_std", "vocab_size")}
    out.update({f"model.vision.{k}": v for k, v in asdict(model.vision).items()})
    return out


SPEC = FamilySpec(name="tiny_vlm", build_model=build_model, build_tokenizer=build_tokenizer,
                  image_handler=image_handler, model_shape=model_shape, cache_settings=cache_settings,
                  trains_tokenizer=True, generates=True)
