"""InternVL3 on megatron-core: InternViT -> pixel shuffle -> MLP projector -> Qwen2.5 decoder (GPTModel).

The family package of `model.family: internvl3` (contract: models/family.py HFFamilyModule), built from the
config.json of a transformers-native checkpoint (`InternVLForConditionalGeneration`, model_type "internvl").

- Vision tower: `vision.InternViT`, a plain torch module replicated on every TP rank (frozen by
  default); why not megatron's TransformerBlock is said there (layer scale, whole-width qk-norm, bit-identical
  round trips).
- Pixel shuffle: HF's exact channel ordering (downsample_ratio 0.5: 2x2 neighbouring patches -> one token with
  4x the channels).
- Projector: LayerNorm (replicated) + megatron MLP with a column-parallel fc1, exact GELU and a row-parallel fc2,
  so a trainable projector of the big models is sharded like the LLM; same math as HF's
  `InternVLMultiModalProjector` (LayerNorm -> linear_1 -> GELU -> linear_2).
- LLM: `lm.build_language_model` (Qwen2 / Qwen2.5 decoder, plain 1-D RoPE positions).

Checkpoint layouts (`hf_rules`): what `save_pretrained` of transformers 4.57.1 and 5.x writes
(`language_model.model.*`, `language_model.lm_head.weight`, `vision_tower.*`, `multi_modal_projector.*`), and the
module layout that `_checkpoint_conversion_mapping` maps it to on load (`model.language_model.*`, `lm_head.weight`,
`model.vision_tower.*`, `model.multi_modal_projector.*`: the in-memory state_dict). `detect_layout` tells them apart
by the tensor names; megatron -> HF writes the `save_pretrained` layout unless told otherwise.

Tied embeddings: transformers 5 ties by the config's top-level `tie_word_embeddings` (default true), 4.x by
`text_config.tie_word_embeddings`; the two may disagree, and the version that wrote config.json decides
(`tied_embeddings`), as it decided whether an `lm_head` tensor was written.

OpenGVLab's original remote-code checkpoints (InternVLChatModel, model_type "internvl_chat": `vision_model.*`
with a fused `attn.qkv`, `mlp1.{0,1,3}`, `language_model.*`) are read too: `native_config` translates their
config.json as transformers' conversion script does, and the 'original' layout's rules are plain renames because
our tower keeps q, k and v fused. Their remote code cannot run here, so that layout is proven by round trips and
by giving the very tensors the transformers layout gives, not by a forward pass of the original model.
"""

from __future__ import annotations

import copy
import sys
from typing import Iterable, Sequence

import torch
from megatron.core.enums import ModelType
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn

from megatron_po.config import ModelConfig, ParallelConfig
from megatron_po.convert.rules import Rule, cat_rule, copy_rule, qwen2_lm_rules
from megatron_po.data import image_ops
from megatron_po.models.base import VLMBase, to_device
from megatron_po.models.family import hf_family_spec
from megatron_po.models.internvl3 import processor
# the family contract (models/family.py HFFamilyModule) asks these of the family module
from megatron_po.models.internvl3.processor import (  # noqa: F401
    CHAT_TEMPLATE, RESPONSE_SUFFIX, format_prompt, image_span)
from megatron_po.models.internvl3.vision import InternViT, InternViTShape, activation, image_features
from megatron_po.models.lm import build_language_model, lm_shape_from_hf, rope_fields
from megatron_po.models.shapes import LinearSite, VisionFlops, VisionFootprint
from megatron_po.models.specs import LMShape, padded_vocab_size
from megatron_po.parallel.groups import ParallelGroups

DEFAULT_IMAGE_TOKEN_ID = 151667  # InternVLConfig's default: <IMG_CONTEXT> of the Qwen2 tokenizers

# HF tensors that carry no weight of their own: a tied lm_head (HF re-ties it to embed_tokens on load)
HF_IGNORED = (r"^(language_model\.)?lm_head\.weight$",)

LAYOUTS = {
    # name: (LLM decoder, lm_head, vision tower, projector)
    "transformers": ("language_model.model.", "language_model.lm_head.weight", "vision_tower.",
                     "multi_modal_projector."),
    "module": ("model.language_model.", "lm_head.weight", "model.vision_tower.", "model.multi_modal_projector."),
}


def native_config(hf_config: dict) -> dict:
    """The config in transformers' native form: an OpenGVLab remote-code config.json (model_type
    "internvl_chat", InternVLChatModel) is translated as transformers' convert_internvl_weights_to_hf.py does;
    any other is returned as it is."""
    if hf_config.get("model_type") != "internvl_chat":
        return hf_config
    llm = dict(hf_config.get("llm_config") or {})
    arch = (llm.get("architectures") or ["Qwen2ForCausalLM"])[0]
    if arch != "Qwen2ForCausalLM":
        raise ValueError(f"llm_config.architectures {arch!r}: only Qwen2ForCausalLM (InternVL3 1B-78B but 9B)")
    if hf_config.get("ps_version", "v1") != "v2":
        raise ValueError(f"ps_version {hf_config.get('ps_version', 'v1')!r} unsupported (InternVL3 uses 'v2')")
    v = hf_config.get("vision_config") or {}
    size, patch = v.get("image_size", 224), v.get("patch_size", 14)  # InternVisionConfig's defaults from here on
    vision = {
        "hidden_size": v.get("hidden_size", 3200), "num_hidden_layers": v.get("num_hidden_layers", 48),
        "num_attention_heads": v.get("num_attention_heads", 25), "intermediate_size": v.get("intermediate_size", 12800),
        "attention_bias": bool(v.get("qkv_bias", False)), "use_qk_norm": bool(v.get("qk_normalization", True)),
        "hidden_act": v.get("hidden_act", "gelu"), "norm_type": v.get("norm_type", "rms_norm"),
        "layer_norm_eps": v.get("layer_norm_eps", 1e-6), "image_size": [size, size], "patch_size": [patch, patch],
        "num_channels": v.get("num_channels", 3),
        "use_mean_pooling": True,  # InternVisionModel has no final norm
        "layer_scale_init_value": v.get("initializer_factor", 0.1),
    }
    ratio = hf_config.get("downsample_ratio", 0.5)
    tile = hf_config.get("force_image_size") or size  # the original's num_image_token uses the tile size
    return {
        "model_type": "internvl", "text_config": dict(llm, model_type="qwen2"), "vision_config": vision,
        "downsample_ratio": ratio, "projector_hidden_act": "gelu",
        "vision_feature_layer": hf_config.get("select_layer", -1), "vision_feature_select_strategy": "default",
        "image_token_id": DEFAULT_IMAGE_TOKEN_ID, "image_seq_length": int((tile // patch) ** 2 * ratio**2),
    }


def image_token_id(hf_config: dict) -> int:
    return int(native_config(hf_config).get("image_token_id", DEFAULT_IMAGE_TOKEN_ID))


def check_config(hf_config: dict) -> None:
    """Raises ValueError, naming the field, for an InternVL config this module cannot reproduce exactly."""
    hf_config = native_config(hf_config)
    _text_config(hf_config)
    _check_features(hf_config)
    per_tile = tokens_per_tile(hf_config)
    if int(hf_config.get("image_seq_length", per_tile)) != per_tile:
        raise ValueError(f"image_seq_length {hf_config['image_seq_length']} != the {per_tile} tokens per tile that "
                         f"vision_config gives (image_size / patch_size * downsample_ratio, squared)")


def tied_embeddings(hf_config: dict) -> bool:
    """Whether lm_head is the input embedding. transformers 5 reads InternVLConfig's own `tie_word_embeddings`
    (default true) and ignores text_config's, which 4.x read: the writer's version (config.json's
    `transformers_version`) says which one the saved tensors follow."""
    version = str(hf_config.get("transformers_version") or "4")
    major = int(version.split(".")[0]) if version.split(".")[0].isdigit() else 4
    if major >= 5:
        return bool(hf_config.get("tie_word_embeddings", True))
    return bool((hf_config.get("text_config") or {}).get("tie_word_embeddings", False))


def _text_config(hf_config: dict) -> dict:
    text = dict(rope_fields(hf_config.get("text_config") or {}))  # transformers 4.x or 5.x RoPE fields
    text["tie_word_embeddings"] = tied_embeddings(hf_config)
    if text.get("model_type", "qwen2") != "qwen2":
        raise ValueError(f"InternVL with a {text.get('model_type')!r} LLM is not supported (Qwen2 / Qwen2.5 only)")
    scaling = text.get("rope_scaling") or {}
    if scaling.get("rope_type", scaling.get("type", "default")) not in ("default", "dynamic"):
        raise ValueError(f"text_config.rope_scaling {scaling} is not supported (plain RoPE, or dynamic NTK within "
                         f"max_position_embeddings)")
    if text.get("use_sliding_window"):
        raise ValueError("text_config.use_sliding_window=true is not supported")
    return text


def _check_features(hf_config: dict) -> None:
    if hf_config.get("vision_feature_layer", -1) != -1:
        # transformers' own code path for other layers is broken (it calls a missing `vision_model`)
        raise ValueError(f"vision_feature_layer {hf_config['vision_feature_layer']} unsupported (only -1)")
    if hf_config.get("vision_feature_select_strategy", "default") != "default":
        raise ValueError("vision_feature_select_strategy must be 'default' (the class token is dropped)")


def downsample_ratio(hf_config: dict) -> float:
    return float(hf_config.get("downsample_ratio", 0.5))


def tokens_per_tile(hf_config: dict, tile_height: int | None = None, tile_width: int | None = None) -> int:
    """LLM tokens one tile becomes: (H / patch) * (W / patch) * downsample_ratio^2 (256 for 448px, patch 14)."""
    hf_config = native_config(hf_config)
    v = InternViTShape.from_hf(hf_config.get("vision_config") or {})
    r = downsample_ratio(hf_config)
    h = (tile_height or v.image_size[0]) // v.patch_size[0]
    w = (tile_width or v.image_size[1]) // v.patch_size[1]
    return int(h * r) * int(w * r)


class InternVLProjector(MegatronModule):
    """LayerNorm(d * 4) -> fc1 (column-parallel) -> GELU -> fc2 (row-parallel): [..., d * 4] -> [..., h]."""

    def __init__(self, config: TransformerConfig, input_size: int, act: str, tp_group):
        cfg = copy.deepcopy(config)
        cfg.ffn_hidden_size = config.hidden_size
        cfg.gated_linear_unit = False
        cfg.activation_func = activation(act)
        cfg.add_bias_linear = True
        cfg.bias_activation_fusion = False  # megatron's fused bias-GELU is the tanh approximation
        # image tokens are not sequence-sharded; the merged decoder input is scattered afterwards
        cfg.sequence_parallel = False
        super().__init__(config=cfg)
        # nn.LayerNorm's default eps (1e-5), as HF's projector
        self.layer_norm = nn.LayerNorm(input_size, dtype=cfg.params_dtype)
        self.mlp = MLP(cfg, MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
                       input_size=input_size, ffn_hidden_size=cfg.ffn_hidden_size, tp_group=tp_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, bias = self.mlp(self.layer_norm(x))
        return out + bias if bias is not None else out


class InternVL3Model(VLMBase):
    """InternVL3 with the interface of models.tiny_vlm.model.VLMModel; `forward` returns logits [b, s, v_padded/tp]."""

    def __init__(self, hf_config: dict, model: ModelConfig, par: ParallelConfig, groups: ParallelGroups):
        hf_config = native_config(hf_config)
        check_config(hf_config)
        text = _text_config(hf_config)
        if (text.get("rope_scaling") or {}) and model.max_seq_length > text.get("max_position_embeddings", 32768):
            # dynamic NTK scaling leaves RoPE untouched up to max_position_embeddings and rescales beyond it
            raise ValueError(f"model.max_seq_length {model.max_seq_length} exceeds text_config.max_position_embeddings"
                             f" {text.get('max_position_embeddings')}, past which rope_scaling (dynamic) changes RoPE")
        self.lm_shape: LMShape = lm_shape_from_hf(text, init_method_std=model.init_method_std)
        self.padded_vocab = padded_vocab_size(self.lm_shape.vocab_size, par.tp)
        lm = build_language_model(self.lm_shape, model, par, groups, self.padded_vocab, model.max_seq_length)
        super().__init__(config=lm.config)
        self.model_type = ModelType.encoder_or_decoder  # read by megatron's schedules
        self.sequence_parallel = par.sp
        self.tp_group = groups.tp
        self.vision_shape = InternViTShape.from_hf(hf_config.get("vision_config") or {})
        self.downsample_ratio = downsample_ratio(hf_config)
        self.vision = self.projector = None
        if groups.is_first_stage:  # the tower feeds the embedding: both live on the first pipeline stage
            self.vision = InternViT(self.vision_shape, dtype=lm.config.params_dtype)
            merged = self.vision_shape.hidden_size * int(1 / self.downsample_ratio) ** 2
            self.projector = InternVLProjector(lm.config, merged, hf_config.get("projector_hidden_act", "gelu"),
                                               groups.tp)
        self.language_model = lm
        self.freeze_as_configured(model)

    def encode_images(self, images: dict) -> torch.Tensor:
        """images['pixel_values'] [tiles, 3, H, W] (every image's tiles, in image order) -> [tiles * t, h].

        t = tokens per tile; the rows are the images' `<IMG_CONTEXT>` embeddings in prompt order.
        """
        pixels = images["pixel_values"].to(device=self.vision.embeddings.cls_token.device,
                                           dtype=self.vision.embeddings.cls_token.dtype)
        if pixels.shape[0] == 0:  # a text-only batch
            return pixels.new_zeros(0, self.config.hidden_size)
        tower_grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.vision.parameters())
        with torch.set_grad_enabled(tower_grad):  # a frozen tower keeps no activations for backward
            feats = image_features(self.vision, pixels, self.downsample_ratio)  # [tiles, t, d * 4]
        out = self.projector(feats)
        return out.reshape(-1, out.shape[-1])

    def forward(self, tokens, position_ids, attention_mask, image_embeds, image_token_mask,
                packed_seq_params=None) -> torch.Tensor:
        """Logits [b, s, v_padded/tp] with the `<IMG_CONTEXT>` slots filled: see VLMBase.decode."""
        return self.decode(tokens, position_ids, attention_mask, image_embeds, image_token_mask, packed_seq_params)


def memory_footprint(hf_config: dict, preprocessor_config: dict, max_seq_length: int) -> tuple[LMShape, VisionFootprint]:
    """The family contract's shapes for the memory plan: the tower counted on the meta device (replicated per TP
    rank), the projector's LayerNorm and fc2 bias replicated, fc1 and the fc2 weight TP-sharded; a pair's worst
    image is `max_patches` tiles plus the thumbnail."""
    hf_config = native_config(hf_config)
    check_config(hf_config)
    lm = lm_shape_from_hf(_text_config(hf_config))
    v = InternViTShape.from_hf(hf_config.get("vision_config") or {})
    with torch.device("meta"):
        tower = sum(p.numel() for p in InternViT(v).parameters())
    merged = v.hidden_size * int(1 / downsample_ratio(hf_config)) ** 2
    tiling = processor.TilingConfig.from_preprocessor_config(preprocessor_config) if preprocessor_config else None
    tiles = 1 if tiling is None or tiling.max_patches <= 1 else tiling.max_patches + 1
    span = v.grid[0] * v.grid[1] + 1  # patches and the class token, attended per tile
    h = lm.hidden_size
    hv, per_tile = v.hidden_size, tokens_per_tile(hf_config)
    patches = span / per_tile  # tower positions (patches and the class token) per decoder token
    flops = VisionFlops(
        dense_per_token=2 * patches * (v.num_channels * v.patch_size[0] * v.patch_size[1] * hv
                                       + v.num_layers * (4 * hv * hv + 2 * hv * v.intermediate_size)),
        window_per_token=4 * hv * patches * span * v.num_layers, projector_per_token=2 * (merged * h + h * h))
    return lm, VisionFootprint(
        tower_sharded=0, tower_replicated=tower, projector_sharded=merged * h + h + h * h,
        projector_replicated=2 * merged + h, hidden=v.hidden_size, ffn=v.intermediate_size, heads=v.num_heads,
        layers=v.num_layers, patches_per_pair=tiles * span, attention_span=span,
        image_tokens_per_pair=tiles * per_tile, flops=flops,
        # LayerNorm(merged) -> fc1 (column-parallel) -> GELU -> fc2 (row-parallel)
        projector_linears=(LinearSite("linear_fc1", "column", merged, h), LinearSite("linear_fc2", "row", h, h)))


def build(hf_config: dict, model: ModelConfig, par: ParallelConfig, groups: ParallelGroups) -> InternVL3Model:
    """The model from an HF config.json dict (weights: a converted checkpoint, see convert.core)."""
    return to_device(InternVL3Model(hf_config, model, par, groups), groups.device)


# ---------------------------------------------------------------------------------------------- data side


def preprocess_images(pils: Sequence, preprocessor_config: dict, hf_config: dict | None = None,
                      backend: str = image_ops.DEFAULT_BACKEND) -> dict:
    """PIL images -> {'pixel_values' [tiles, 3, H, W], 'num_patches' [n], 'num_tokens' [n]}, as InternVLProcessor.

    Tokens per tile come from `hf_config` when given (what the model produces for the processor's tile size),
    else from an `image_seq_length` key in `preprocessor_config` (processor_config.json's), else 256. `backend`:
    the transformers 5 image processor to equal (data/image_ops.py).
    """
    cfg = processor.TilingConfig.from_preprocessor_config(preprocessor_config)
    if hf_config is not None:
        per_tile = tokens_per_tile(hf_config, cfg.height, cfg.width)
    else:
        per_tile = int(preprocessor_config.get("image_seq_length", processor.DEFAULT_IMAGE_SEQ_LENGTH))
    return processor.preprocess(pils, cfg, image_seq_length=per_tile, backend=backend)


def image_num_tokens(width: int, height: int, preprocessor_config: dict, hf_config: dict) -> int:
    """LLM tokens of an image of this size (tiles incl. thumbnail x tokens per tile), without its pixels."""
    cfg = processor.TilingConfig.from_preprocessor_config(preprocessor_config)
    return processor.num_tiles(height, width, cfg) * tokens_per_tile(hf_config, cfg.height, cfg.width)


def collate_images(parts: Sequence[dict]) -> dict:
    """Concatenates `preprocess_images` outputs (in order) into one: the images of a batch."""
    return {k: torch.cat([p[k] for p in parts]) for k in ("pixel_values", "num_patches", "num_tokens")}


def position_ids(hf_config: dict, input_ids: torch.Tensor, images: dict | None = None,
                 row_images: list[list[int]] | None = None, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Plain 1-D positions [b, s]: InternVL's LLM uses ordinary RoPE and image tokens take ordinary positions.

    transformers numbers positions from the cache position, ignoring padding; right-padded rows, as ours are,
    therefore agree with it. (`images`, `row_images` and `attention_mask` are accepted for the family contract.)
    """
    b, s = input_ids.shape
    return torch.arange(s, device=input_ids.device).unsqueeze(0).expand(b, s).contiguous()


# ---------------------------------------------------------------------------------------------- conversion


def detect_layout(hf_names: Iterable[str]) -> str:
    """'module' when the names carry the `model.` prefix of the loaded module, 'original' for OpenGVLab's
    remote-code names (`vision_model.*`, `mlp1.*`), else 'transformers'."""
    names = list(hf_names)
    if any(n.startswith(("model.language_model.", "model.vision_tower.")) for n in names):
        return "module"
    if any(n.startswith(("vision_model.", "mlp1.")) for n in names):
        return "original"
    return "transformers"


def _original_vision_rules(v: InternViTShape, m: str = "vision.") -> list[Rule]:
    """InternVLChatModel's `vision_model.*` (fused attn.qkv, ls1/ls2, norm1/norm2) <-> our tower."""
    e = "vision_model.embeddings."
    rules = [copy_rule(f"{m}embeddings.cls_token", f"{e}class_embedding"),
             copy_rule(f"{m}embeddings.patch_embeddings.projection.weight", f"{e}patch_embedding.weight"),
             copy_rule(f"{m}embeddings.patch_embeddings.projection.bias", f"{e}patch_embedding.bias"),
             copy_rule(f"{m}embeddings.position_embeddings", f"{e}position_embedding")]
    norm_params = ("weight",) if v.norm_type == "rms_norm" else ("weight", "bias")
    for i in range(v.num_layers):
        a, b = f"{m}encoder.layer.{i}.", f"vision_model.encoder.layers.{i}."
        pairs = {"attention.qkv.weight": "attn.qkv.weight", "attention.projection_layer.weight": "attn.proj.weight",
                 "attention.projection_layer.bias": "attn.proj.bias", "lambda_1": "ls1", "lambda_2": "ls2",
                 **{f"mlp.{fc}.{p}": f"mlp.{fc}.{p}" for fc in ("fc1", "fc2") for p in ("weight", "bias")},
                 **{f"{ours}.{p}": f"{theirs}.{p}" for ours, theirs in (("layernorm_before", "norm1"),
                                                                       ("layernorm_after", "norm2"))
                    for p in norm_params}}
        if v.attention_bias:
            pairs["attention.qkv.bias"] = "attn.qkv.bias"
        if v.use_qk_norm:
            pairs.update({f"attention.{x}_norm.weight": f"attn.{x}_norm.weight" for x in "qk"})
        rules += [copy_rule(a + ours, b + theirs) for ours, theirs in pairs.items()]
    return rules


def _vision_rules(v: InternViTShape, h: str, m: str = "vision.") -> list[Rule]:
    e = f"{h}embeddings."
    rules = [copy_rule(f"{m}embeddings.cls_token", f"{e}cls_token"),
             copy_rule(f"{m}embeddings.patch_embeddings.projection.weight", f"{e}patch_embeddings.projection.weight"),
             copy_rule(f"{m}embeddings.patch_embeddings.projection.bias", f"{e}patch_embeddings.projection.bias")]
    if v.use_mask_token:
        rules.append(copy_rule(f"{m}embeddings.mask_token", f"{e}mask_token"))
    if v.use_absolute_position_embeddings:
        rules.append(copy_rule(f"{m}embeddings.position_embeddings", f"{e}position_embeddings"))
    norm_params = ("weight",) if v.norm_type == "rms_norm" else ("weight", "bias")
    for i in range(v.num_layers):
        a, b = f"{m}encoder.layer.{i}.", f"{h}encoder.layer.{i}."
        rules.append(cat_rule(f"{a}attention.qkv.weight", tuple(f"{b}attention.{x}_proj.weight" for x in "qkv")))
        if v.attention_bias:
            rules.append(cat_rule(f"{a}attention.qkv.bias", tuple(f"{b}attention.{x}_proj.bias" for x in "qkv")))
        if v.use_qk_norm:
            rules += [copy_rule(f"{a}attention.{x}_norm.weight", f"{b}attention.{x}_norm.weight") for x in "qk"]
        rules += [copy_rule(f"{a}{n}", f"{b}{n}") for n in (
            "attention.projection_layer.weight", "attention.projection_layer.bias",
            "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias", "lambda_1", "lambda_2",
            *(f"{ln}.{p}" for ln in ("layernorm_before", "layernorm_after") for p in norm_params))]
    if not v.use_mean_pooling:
        rules += [copy_rule(f"{m}layernorm.{p}", f"{h}layernorm.{p}") for p in ("weight", "bias")]
    return rules


def _projector_rules(h: str, m: str = "projector.") -> list[Rule]:
    pairs = {"layer_norm": "layer_norm", "mlp.linear_fc1": "linear_1", "mlp.linear_fc2": "linear_2"}
    return [copy_rule(f"{m}{ours}.{p}", f"{h}{theirs}.{p}")
            for ours, theirs in pairs.items() for p in ("weight", "bias")]


def hf_rules(hf_config: dict, hf_names: Iterable[str] | None = None, layout: str | None = None) -> list[Rule]:
    """Rules for every tensor of the TP=1 state_dict of `build(hf_config, ...)`.

    Args:
        hf_names: the checkpoint's tensor names, to pick the layout (`detect_layout`); None: the 4.57.1 layout.
        layout: force a key of LAYOUTS (overrides hf_names).
    """
    original = hf_config.get("model_type") == "internvl_chat"
    hf_config = native_config(hf_config)
    if layout is None:
        layout = detect_layout(hf_names) if hf_names is not None else ("original" if original else "transformers")
    if layout not in (*LAYOUTS, "original"):
        raise ValueError(f"layout {layout!r} unknown (known: {sorted((*LAYOUTS, 'original'))})")
    shape = lm_shape_from_hf(_text_config(hf_config))
    padded = padded_vocab_size(shape.vocab_size, 1)  # TP-independent by construction
    vision = InternViTShape.from_hf(hf_config.get("vision_config") or {})
    if layout == "original":
        # InternVLChatModel: mlp1 = Sequential(LayerNorm, Linear, GELU, Linear); its LLM is Qwen2ForCausalLM
        projector = [copy_rule(f"projector.{ours}.{p}", f"mlp1.{i}.{p}") for ours, i in
                     (("layer_norm", 0), ("mlp.linear_fc1", 1), ("mlp.linear_fc2", 3)) for p in ("weight", "bias")]
        return (_original_vision_rules(vision) + projector
                + qwen2_lm_rules(shape, "language_model.model.", "language_model.lm_head.weight", padded))
    lm_prefix, lm_head, vision_prefix, projector_prefix = LAYOUTS[layout]
    return (_vision_rules(vision, vision_prefix) + _projector_rules(projector_prefix)
            + qwen2_lm_rules(shape, lm_prefix, lm_head, padded))


SPEC = hf_family_spec("internvl3", sys.modules[__name__])
