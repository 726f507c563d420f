"""The policy and reference models of a stage: built from `model.family`'s spec (which the driver builds once and
passes down), with checkpoint.init_from's weights, and the reference as a reference source."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

from megatron_po.config import Config
from megatron_po.models.base import VLMBase
from megatron_po.models.family import FamilySpec
from megatron_po.models.init import uninitialised
from megatron_po.objectives import Objective
from megatron_po.parallel.groups import ParallelGroups
from megatron_po.train import checkpoint as ckpt
from megatron_po.train.reference import LiveReference
from megatron_po.train.step import Tower, same_vision


def build_model(cfg: Config, family: FamilySpec, groups: ParallelGroups, vocab_size: int):
    """One VLM of `model.family` (this rank's pipeline stage of it), as the family's spec builds it (tiny_vlm from
    the config's shapes, an HF family from model.hf_path/config.json).

    Weights depend only on train.seed (then on checkpoint.init_from), never on the layout. When
    checkpoint.init_from will overwrite them, they are allocated on the device and not initialised.
    """
    if not cfg.checkpoint.init_from:
        return family.build_model(cfg, groups, vocab_size)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init_weights=False))
    with uninitialised(groups.device):
        return family.build_model(cfg, groups, vocab_size)


def build_models(cfg: Config, family: FamilySpec, groups: ParallelGroups, vocab_size: int,
                 objective: Objective) -> tuple[VLMBase, Optional[VLMBase]]:
    """Policy and, when the objective reads a reference and no cache provides it, a frozen reference model from
    the same builder and weights."""
    policy = build_initial_model(cfg, family, groups, vocab_size)
    reference = None
    if objective.needs_reference and cfg.reference.source == "model":
        reference = build_initial_model(cfg, family, groups, vocab_size)
        reference.requires_grad_(False)
        reference.eval()
    return policy, reference


def build_initial_model(cfg: Config, family: FamilySpec, groups: ParallelGroups, vocab_size: int) -> VLMBase:
    """`build_model` with checkpoint.init_from's weights loaded when given (a stage's starting point)."""
    model = build_model(cfg, family, groups, vocab_size)
    if cfg.checkpoint.init_from:
        ckpt.load_model_weights(Path(cfg.checkpoint.init_from), model)
    return model


def policy_tower(policy) -> Tower:
    return Tower("policy", frozen=policy.vision_frozen)


def live_reference(policy, reference, groups: ParallelGroups) -> LiveReference:
    """The reference model as a reference source; it shares the policy's image encoding when both towers are
    frozen copies (one encoding per pair and step)."""
    return LiveReference(reference, groups, Tower("policy" if same_vision(policy, reference, groups) else "reference",
                                                  frozen=True))
