"""Model families selectable by `model.family`, and what each one must provide.

A Hugging Face family module (e.g. megatron_po.models.qwen2_5_vl) defines:
    build(hf_config: dict, model: ModelConfig, par: ParallelConfig, groups: ParallelGroups) -> MegatronModule
        the VLM with the interface of models.vlm.VLMModel (encode_images / forward / set_input_tensor), built
        from the HF config.json dict; weights come from a converted checkpoint (checkpoint.init_from).
    hf_rules(hf_config: dict, hf_names: Iterable[str] | None = None) -> list[convert.rules.Rule]
        how every tensor of the module's TP=1 state_dict() is made from HF safetensors tensors and back;
        `hf_names` (a checkpoint's tensor names) picks among the HF name layouts the family reads.
    preprocess_images(pils, preprocessor_config: dict, hf_config: dict) -> dict, image_num_tokens(width, height,
        preprocessor_config, hf_config) -> int, collate_images(parts) -> dict, position_ids(hf_config, tokens,
        images, row_images), image_token_id(hf_config), format_prompt(...) and RESPONSE_SUFFIX: the data side
        (data/hf_chat.py).
    HF_IGNORED: tuple[str, ...] (optional) regexes of HF tensor names that carry no weight (e.g. rotary buffers).
    memory_footprint(hf_config, preprocessor_config, max_seq_length) -> (LMShape, VisionFootprint): the shapes the
        memory plan (megatron_po.memory_plan) counts, from the config files alone.
Modules are imported lazily: transformers is never needed, and only the selected family's code is loaded.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType


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
class Family:
    name: str
    module: str
    """Python module with build() and hf_rules()."""
    hf_model_types: tuple[str, ...]
    """`model_type` values of the HF config.json this family converts."""

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)


HF_FAMILIES = {
    "qwen2_5_vl": Family("qwen2_5_vl", "megatron_po.models.qwen2_5_vl", ("qwen2_5_vl",)),
    "internvl3": Family("internvl3", "megatron_po.models.internvl3", ("internvl", "internvl_chat")),
}
FAMILY_NAMES = ("tiny_vlm", *HF_FAMILIES)


def family_for_hf_config(hf_config: dict, expected: str | None = None) -> Family:
    """The family that converts this HF config; `expected` (a family name) must agree with it."""
    model_type = hf_config.get("model_type")
    found = [f for f in HF_FAMILIES.values() if model_type in f.hf_model_types]
    if not found:
        known = sorted(t for f in HF_FAMILIES.values() for t in f.hf_model_types)
        raise ValueError(f"HF model_type {model_type!r} is not a supported family (known: {known})")
    if expected is not None and found[0].name != expected:
        raise ValueError(f"HF model_type {model_type!r} is family {found[0].name!r}, not {expected!r}")
    return found[0]
