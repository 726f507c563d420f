"""What a model family provides (`FamilySpec`), and the part every Hugging Face family shares.

A family's package (registered in megatron_po/families.py) defines ``SPEC = FamilySpec(...)``. The trainer, the
data path, the memory plan and the reference cache ask the spec, never the family's name. HF families build theirs
with :func:`hf_family_spec` from a module that satisfies :class:`HFFamilyModule`: the model built from an HF
config.json, the processor and chat template (data/hf_chat.py), and the conversion rules (convert/).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterable, Optional, Protocol, runtime_checkable

import torch

from megatron_po.models.shapes import MissingShapes, ModelShape
from megatron_po.models.specs import padded_vocab_size


@dataclass(frozen=True)
class FamilySpec:
    """Everything about one model family (torchtitan's TrainSpec)."""

    name: str
    build_model: Callable[[Any, Any, int], torch.nn.Module]
    """(cfg: Config, groups: ParallelGroups, tokenizer vocab size) -> this rank's stage of the VLM (a
    models.base.VLMBase), weights from train.seed until a checkpoint is loaded."""
    build_tokenizer: Callable[[Any, Path], Any]
    """(cfg, data.tokenizer_path) -> the tokenizer + chat layout the collator uses (encode, prompt_ids,
    response_end_ids, image_id, pad_id, files)."""
    image_handler: Callable[[Any, Any], Any]
    """(ModelConfig, tokenizer) -> the collators' image handler: slots per image, loading, collation, positions
    and P2-DPO's I_noise (data/fixed_images.FixedSizeImages, data/hf_chat.HFImages)."""
    model_shape: Callable[[Any], Any]
    """cfg -> models.shapes.ModelShape, from the config (and the files under model.hf_path) alone."""
    cache_settings: Callable[[Any], dict]
    """ModelConfig -> the settings beyond hashed files that decide the reference's numbers (ref_cache key)."""
    trains_tokenizer: bool = False
    """The data preparation trains a tokenizer on the embedded task's text when none is given (tiny_vlm)."""
    generates: bool = False
    """Greedy generation (generation.py, `megatron-po generate-p2`) is wired for this family: fixed-size image
    tensors and plain positions (tiny_vlm); the HF families' processors and M-RoPE positions are not yet."""
    hf: Optional[ModuleType] = None
    """HF families: the module with the data side and the conversion rules (:class:`HFFamilyModule`)."""

    @property
    def from_hf(self) -> bool:
        """Built from an HF config.json (model.hf_path) and converted weights (checkpoint.init_from)."""
        return self.hf is not None


@runtime_checkable
class HFFamilyModule(Protocol):
    """What an HF family's module defines (checked for every registered family by tests/test_families.py)."""

    RESPONSE_SUFFIX: str
    """Text that closes an assistant turn (supervised after the response)."""

    def build(self, hf_config: dict, model, par, groups) -> torch.nn.Module:
        """The VLM (VLMBase) from the HF config.json dict; weights come from a converted checkpoint."""

    def hf_rules(self, hf_config: dict, hf_names: Optional[Iterable[str]] = None) -> list:
        """How every tensor of the module's TP=1 state_dict() is made from HF safetensors tensors and back."""

    def preprocess_images(self, pils, preprocessor_config: dict, hf_config: dict) -> dict:
        """The processor: PIL images -> pixel tensors + ``num_tokens`` per image."""

    def image_num_tokens(self, width: int, height: int, preprocessor_config: dict, hf_config: dict) -> int:
        """Decoder tokens of an image of this size, without reading its pixels."""

    def collate_images(self, parts: list) -> dict: ...

    def position_ids(self, hf_config: dict, tokens, images: dict, row_images: list) -> torch.Tensor: ...

    def image_token_id(self, hf_config: dict) -> int: ...

    def image_span(self, num_tokens: int) -> str:
        """One image in a user turn, as the chat template and processor write it."""

    def format_prompt(self, question: str, images_num_tokens, system: Optional[str] = None) -> str:
        """One user turn (images first) and the generation prompt."""

    def memory_footprint(self, hf_config: dict, preprocessor_config: dict, max_seq_length: int) -> tuple:
        """(LMShape, VisionFootprint) from the config files alone."""


def _read_hf_config(cfg) -> dict:
    return json.loads((Path(cfg.model.hf_path) / "config.json").read_text())


def read_hf_configs(hf_path) -> tuple[dict, dict]:
    """An HF family's model.hf_path files that decide shapes and image tokens: config.json, and
    preprocessor_config.json ({} where it is absent: the processor's defaults)."""
    root = Path(hf_path)
    pre = root / "preprocessor_config.json"
    return json.loads((root / "config.json").read_text()), json.loads(pre.read_text()) if pre.is_file() else {}


def hf_family_spec(name: str, module: ModuleType) -> FamilySpec:
    """The spec of an HF family whose module satisfies HFFamilyModule: built from model.hf_path's config.json,
    HF tokenizer + chat template + processor, shapes from the config files."""

    def build_model(cfg, groups, vocab_size: int):
        torch.manual_seed(cfg.train.seed)
        return module.build(_read_hf_config(cfg), cfg.model, cfg.parallel, groups).to(groups.device)

    def build_tokenizer(cfg, tok_path: Path):
        from megatron_po.data.hf_chat import HFTokenizer

        return HFTokenizer(module, cfg.model.hf_path)

    def image_handler(model, tokenizer):
        from megatron_po.data.hf_chat import HFImages

        return HFImages(tokenizer)

    def model_shape(cfg):
        root = Path(cfg.model.hf_path)
        if not (root / "config.json").is_file():
            raise MissingShapes(f"model.hf_path={root}: no config.json to read the shapes from (a converted "
                                "checkpoint's hf/ directory, or the published shapes in launch/configs/shapes/)")
        lm, vision = module.memory_footprint(*read_hf_configs(root), cfg.model.max_seq_length)
        return ModelShape(lm, padded_vocab_size(lm.vocab_size, cfg.parallel.tp), vision)

    # shapes, tokens and processing follow from hf_path's files, which the cache key hashes
    return FamilySpec(name=name, build_model=build_model, build_tokenizer=build_tokenizer,
                      image_handler=image_handler, model_shape=model_shape, cache_settings=lambda model: {},
                      hf=module)
