"""The model families `model.family` selects: one registry entry each, the built-in tiny model included.

An entry names the family's package and the HF `model_type`s it converts; the package defines ``SPEC``, a
:class:`megatron_po.models.family.FamilySpec` that carries everything about the family (model builder,
tokenizer and chat layout, image handling, memory-plan shapes, what the reference cache keys, and for HF families
the processor, chat template and conversion rules). Nothing outside a family's package asks which family it is:
the trainer, the data path, the memory plan and the converter go through the spec.

This module imports no model code (config.py validates names against it); a family's package is imported only
when its spec is asked for, so transformers is never needed and only the selected family's code loads.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class FamilyEntry:
    name: str
    package: str
    """Python package whose ``SPEC`` is the family's FamilySpec."""
    hf_model_types: tuple[str, ...] = ()
    """`model_type` values of the HF config.json this family converts; empty: not converted from HF (its shapes
    are config fields and it may train from random weights)."""

    @property
    def from_hf(self) -> bool:
        """Built from an HF config.json (model.hf_path) and converted weights (checkpoint.init_from)."""
        return bool(self.hf_model_types)

    def spec(self):
        """The family's FamilySpec (imports its package)."""
        return importlib.import_module(self.package).SPEC


FAMILIES: dict[str, FamilyEntry] = {e.name: e for e in (
    FamilyEntry("tiny_vlm", "megatron_po.models.tiny_vlm"),
    FamilyEntry("qwen2_5_vl", "megatron_po.models.qwen2_5_vl", ("qwen2_5_vl",)),
    FamilyEntry("internvl3", "megatron_po.models.internvl3", ("internvl", "internvl_chat")),
)}
FAMILY_NAMES = tuple(FAMILIES)
HF_FAMILY_NAMES = tuple(name for name, e in FAMILIES.items() if e.from_hf)


def family_spec(name: str):
    """The FamilySpec of `model.family` `name`."""
    if name not in FAMILIES:
        raise ValueError(f"model.family {name!r} unknown; known: {list(FAMILY_NAMES)}")
    return FAMILIES[name].spec()


def family_for_hf_config(hf_config: dict, expected: str | None = None) -> FamilyEntry:
    """The family that converts this HF config; `expected` (a family name) must agree with it."""
    model_type = hf_config.get("model_type")
    found = [e for e in FAMILIES.values() if model_type in e.hf_model_types]
    if not found:
        known = sorted(t for e in FAMILIES.values() for t in e.hf_model_types)
        raise ValueError(f"HF model_type {model_type!r} is not a supported family (known: {known})")
    if expected is not None and found[0].name != expected:
        raise ValueError(f"HF model_type {model_type!r} is family {found[0].name!r}, not {expected!r}")
    return found[0]
