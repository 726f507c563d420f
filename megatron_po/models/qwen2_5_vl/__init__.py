"""Qwen2.5-VL on megatron-core: window-attention ViT -> patch merger -> Qwen2.5 decoder with M-RoPE.

The decoder is megatron's GPTModel (TP/SP-sharded, `position_embedding_type="mrope"` with the config's
`rope_scaling.mrope_section`). The vision tower and the merger are plain torch modules replicated on every TP
rank (models/qwen2_5_vl/vision.py says why). Image features replace the `<|image_pad|>` tokens of the decoder
input; M-RoPE positions come from `position_ids` (HF's get_rope_index for image rows).

Hugging Face checkpoints come in two tensor layouts, both read by `hf_rules`:
    hub / `save_pretrained` (4.57.1 and 5.x)        visual.*          model.layers.*, model.embed_tokens.*    lm_head.*
    in-memory modules (state_dict, >= 4.52)         model.visual.*    model.language_model.*                  lm_head.*
The layout is detected from the tensor names when the converter passes them (`hf_rules(config, names)`); the
HF side written back (megatron -> HF) uses the hub layout, which every transformers version loads.
"""

from __future__ import annotations

import sys
from typing import Iterable, Optional

import torch
from megatron.core.enums import ModelType
from torch import Tensor

from megatron_po.config import ModelConfig, ParallelConfig
from megatron_po.convert.rules import Rule, copy_rule, qwen2_lm_rules
from megatron_po.data import image_ops
from megatron_po.models.base import VLMBase, to_device
from megatron_po.models.family import hf_family_spec
from megatron_po.models.lm import build_language_model, lm_shape_from_hf, rope_fields
from megatron_po.models.qwen2_5_vl import processor
from megatron_po.models.qwen2_5_vl.processor import (  # noqa: F401  (re-exported: the family contract)
    RESPONSE_SUFFIX,
    collate_images,
    format_prompt,
    image_span,
    rope_position_ids,
)
from megatron_po.models.qwen2_5_vl.vision import PatchMerger, VisionShape, VisionTower
from megatron_po.models.shapes import LinearSite, VisionFlops, VisionFootprint
from megatron_po.models.specs import LMShape, build_lm_config, padded_vocab_size
from megatron_po.parallel.groups import ParallelGroups

HF_IGNORED: tuple[str, ...] = ()
"""Qwen2.5-VL checkpoints hold no non-weight tensors (rotary frequencies are not persistent buffers)."""

# Qwen2_5_VLTextConfig's defaults (transformers 4.57.1), for keys a config.json may leave out
TEXT_DEFAULTS = {
    "vocab_size": 152064, "hidden_size": 8192, "intermediate_size": 29568, "num_hidden_layers": 80,
    "num_attention_heads": 64, "num_key_value_heads": 8, "hidden_act": "silu", "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False, "rope_theta": 1_000_000.0, "use_sliding_window": False, "rope_scaling": None,
}
TOKEN_DEFAULTS = {"image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
                  "vision_end_token_id": 151653}


# ---------------------------------------------------------------------------------------------- config


def text_config(hf_config: dict) -> dict:
    """The decoder's config: `text_config` when present (what HF reads then), else the flat hub layout."""
    text = hf_config.get("text_config")
    text = dict(text) if text is not None else dict(hf_config)
    # 5.x keeps RoPE in rope_parameters: read into 4.x fields before any default could stand in for them
    return {**TEXT_DEFAULTS, **rope_fields(text)}


def vision_shape(hf_config: dict) -> VisionShape:
    return VisionShape.from_hf(hf_config.get("vision_config") or {})


def mrope_section(hf_config: dict) -> list[int]:
    text = text_config(hf_config)
    rope = text.get("rope_scaling") or {}
    section = rope.get("mrope_section")
    if not section or len(section) != 3:
        raise ValueError("Qwen2.5-VL config: rope_scaling.mrope_section (transformers 5.x: "
                         "rope_parameters.mrope_section), 3 ints, is required")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "mrope"):
        raise ValueError(f"Qwen2.5-VL config: rope scaling {kind!r} is not supported (only plain M-RoPE)")
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    if 2 * sum(section) != head_dim:
        raise ValueError(f"mrope_section {section} must sum to head_dim / 2 = {head_dim // 2}")
    return list(section)


def lm_shape(hf_config: dict, init_method_std: float = 0.02) -> LMShape:
    text = text_config(hf_config)
    if text.get("use_sliding_window"):
        raise ValueError("Qwen2.5-VL config: use_sliding_window=true is not supported")
    if text.get("hidden_act", "silu") != "silu":
        raise ValueError(f"Qwen2.5-VL config: text hidden_act {text['hidden_act']!r} unsupported (silu only)")
    return lm_shape_from_hf(text, init_method_std)


def image_token_id(hf_config: dict) -> int:
    return int(hf_config.get("image_token_id", TOKEN_DEFAULTS["image_token_id"]))


def preprocess_images(pils, preprocessor_config: dict, hf_config: dict | None = None,
                      backend: str = image_ops.DEFAULT_BACKEND) -> dict:
    """The family contract's signature over processor.preprocess_images (the processor alone
    decides the patches; `hf_config` is not needed). `backend`: the transformers 5 image processor to equal
    (data/image_ops.py)."""
    return processor.preprocess_images(pils, preprocessor_config, backend=backend)


def image_num_tokens(width: int, height: int, preprocessor_config: dict, hf_config: dict) -> int:
    """LLM tokens of an image of this size (smart_resize's grid / merge^2), without reading its pixels."""
    from megatron_po.models.qwen2_5_vl.processor import processor_settings, smart_resize

    st = processor_settings(preprocessor_config)
    factor = st["patch_size"] * st["merge_size"]
    h, w = smart_resize(height, width, factor, st["min_pixels"], st["max_pixels"])
    return (h // factor) * (w // factor)


def position_ids(hf_config: dict, input_ids: Tensor, images: dict, row_images: list[list[int]],
                 attention_mask: Optional[Tensor] = None) -> Tensor:
    """M-RoPE positions [3, b, s] of `input_ids` [b, s]; see processor.rope_position_ids."""
    return rope_position_ids(input_ids, images["image_grid_thw"], row_images, image_token_id(hf_config),
                             vision_shape(hf_config).spatial_merge_size, attention_mask)


# ---------------------------------------------------------------------------------------------- model


class Qwen25VLModel(VLMBase):
    """Vision tower + merger (replicated) + GPTModel with M-RoPE. `forward` returns logits [b, s, v_padded/tp]."""

    def __init__(self, hf_config: dict, model: ModelConfig, par: ParallelConfig, groups: ParallelGroups):
        shape = lm_shape(hf_config, model.init_method_std)
        section = mrope_section(hf_config)
        vis = vision_shape(hf_config)
        if vis.out_hidden_size != shape.hidden_size:
            raise ValueError(f"vision out_hidden_size {vis.out_hidden_size} != text hidden_size {shape.hidden_size}")
        lm_cfg = build_lm_config(model, par, shape)
        lm_cfg.mrope_section = section
        super().__init__(config=lm_cfg)
        self.hf_config = hf_config
        self.lm_shape = shape
        self.sequence_parallel = par.sp
        self.tp_group = groups.tp
        self.model_type = ModelType.encoder_or_decoder  # read by megatron's schedules
        self.image_token_id = image_token_id(hf_config)
        dtype = lm_cfg.params_dtype
        first = groups.is_first_stage  # the tower feeds the embedding: both live on the first pipeline stage
        self.vision = VisionTower(vis, dtype=dtype) if first else None
        self.projector = PatchMerger(vis, dtype=dtype) if first else None
        self.language_model = build_language_model(
            shape, model, par, groups, padded_vocab_size(shape.vocab_size, par.tp), model.max_seq_length,
            mrope_section=section,
        )
        self.freeze_as_configured(model)

    def encode_images(self, images: dict) -> Tensor:
        """`preprocess_images` output (collated) -> image token embeddings [T_img, h], images in order."""
        device = self.projector.linear_fc1.weight.device
        feats = self.vision(images["pixel_values"].to(device), images["image_grid_thw"])
        return self.projector(feats)

    def forward(self, tokens: Tensor, position_ids: Tensor, attention_mask: Tensor, image_embeds: Tensor,
                image_token_mask: Tensor, packed_seq_params=None) -> Tensor:
        """Runs the decoder with image embeddings spliced into the image-token slots.

        Args:
            tokens: [b, s].
            position_ids: [3, b, s] M-RoPE positions (a [b, s] tensor is used on all three axes, as HF does).
            attention_mask: [1, 1, s, s] bool, True = masked.
            image_embeds: [T, h], filling the True positions of image_token_mask in row-major order.
            image_token_mask: [b, s] bool.
        Returns:
            logits [b, s, v_padded/tp] (vocab-sharded over TP).
        """
        return self.decode(tokens, position_ids, attention_mask, image_embeds, image_token_mask, packed_seq_params)


def memory_footprint(hf_config: dict, preprocessor_config: dict, max_seq_length: int) -> tuple[LMShape, VisionFootprint]:
    """The family contract's shapes for the memory plan: tower and merger replicated per TP rank (counted on the
    meta device); a pair's worst image has the processor's max_pixels, at most half of a row's tokens."""
    from megatron_po.models.qwen2_5_vl.processor import processor_settings

    lm = lm_shape(hf_config)
    vis = vision_shape(hf_config)
    with torch.device("meta"):
        tower = sum(p.numel() for p in VisionTower(vis).parameters())
        merger = sum(p.numel() for p in PatchMerger(vis).parameters())
    st = processor_settings(preprocessor_config)
    tokens = min(st["max_pixels"] // (st["patch_size"] * st["merge_size"]) ** 2, max_seq_length // 2)
    window = (vis.window_size // vis.patch_size) ** 2
    hv, unit, full = vis.hidden_size, vis.merge_unit, len(vis.fullatt_block_indexes)
    # per patch: the patch embedding, q/k/v/o and the gated MLP; windowed layers attend within a window (edge windows
    # counted whole), the full-attention layers over the image's patches (merge_unit per decoder token)
    flops = VisionFlops(
        dense_per_token=2 * unit * (vis.patch_dim * hv + vis.depth * (4 * hv * hv + 3 * hv * vis.intermediate_size)),
        window_per_token=4 * hv * unit * window * (vis.depth - full), full_per_token2=4 * hv * unit**2 * full,
        projector_per_token=2 * (unit * hv * unit * hv + unit * hv * vis.out_hidden_size))
    return lm, VisionFootprint(
        tower_sharded=0, tower_replicated=tower, projector_sharded=0, projector_replicated=merger,
        hidden=vis.hidden_size, ffn=vis.intermediate_size, heads=vis.num_heads, layers=vis.depth,
        patches_per_pair=tokens * vis.merge_unit, attention_span=window, image_tokens_per_pair=tokens, flops=flops,
        # the patch merger: plain torch linears over merge_unit patches, on every TP rank
        projector_linears=(LinearSite("linear_fc1", "replicated", unit * hv, unit * hv),
                           LinearSite("linear_fc2", "replicated", unit * hv, vis.out_hidden_size)))


def build(hf_config: dict, model: ModelConfig, par: ParallelConfig, groups: ParallelGroups) -> Qwen25VLModel:
    """The model for `hf_config` (a config.json dict); weights come from a converted checkpoint."""
    return to_device(Qwen25VLModel(hf_config, model, par, groups), groups.device)


# ---------------------------------------------------------------------------------------------- HF rules

LAYOUTS = {
    # name: (vision prefix, decoder prefix)
    "hub": ("visual.", "model."),
    "modules": ("model.visual.", "model.language_model."),
}


def detect_layout(hf_names: Optional[Iterable[str]]) -> str:
    """'modules' when the names carry transformers' in-memory prefixes, else 'hub' (also for names=None)."""
    if hf_names is None:
        return "hub"
    names = set(hf_names)
    modules = any(n.startswith(LAYOUTS["modules"][0]) or n.startswith(LAYOUTS["modules"][1]) for n in names)
    hub = any(n.startswith(LAYOUTS["hub"][0]) or n.startswith("model.layers.") or n == "model.embed_tokens.weight"
              for n in names)
    if modules and hub:
        raise ValueError("HF checkpoint mixes the hub (visual.*, model.layers.*) and module (model.visual.*, "
                         "model.language_model.*) tensor layouts")
    return "modules" if modules else "hub"


def _patch_embed_rule(megatron: str, hf: str, vis: VisionShape) -> Rule:
    conv = (vis.hidden_size, vis.in_channels, vis.temporal_patch_size, vis.patch_size, vis.patch_size)
    return Rule(megatron, (hf,), lambda w: w.reshape(w.shape[0], -1), lambda w: (w.reshape(conv).contiguous(),))


def hf_rules(hf_config: dict, hf_names: Optional[Iterable[str]] = None) -> list[Rule]:
    """Every tensor of the TP=1 state_dict from HF tensors, for the layout of `hf_names` (hub layout if None)."""
    vis_p, lm_p = LAYOUTS[detect_layout(hf_names)]
    shape, vis = lm_shape(hf_config), vision_shape(hf_config)
    rules = qwen2_lm_rules(shape, hf_prefix=lm_p, lm_head="lm_head.weight",
                           padded_vocab=padded_vocab_size(shape.vocab_size, 1), prefix="language_model.")
    rules.append(_patch_embed_rule("vision.patch_embed.weight", f"{vis_p}patch_embed.proj.weight", vis))
    for i in range(vis.depth):
        m, h = f"vision.blocks.{i}.", f"{vis_p}blocks.{i}."
        names = ["norm1.weight", "norm2.weight"] + [f"{mod}.{t}" for mod in ("attn.qkv", "attn.proj", "mlp.gate_proj",
                                                                          "mlp.up_proj", "mlp.down_proj")
                                                   for t in ("weight", "bias")]
        rules += [copy_rule(m + n, h + n) for n in names]
    merger = {"ln_q.weight": "ln_q.weight", "linear_fc1.weight": "mlp.0.weight", "linear_fc1.bias": "mlp.0.bias",
              "linear_fc2.weight": "mlp.2.weight", "linear_fc2.bias": "mlp.2.bias"}
    rules += [copy_rule(f"projector.{m}", f"{vis_p}merger.{h}") for m, h in merger.items()]
    return rules


SPEC = hf_family_spec("qwen2_5_vl", sys.modules[__name__])
