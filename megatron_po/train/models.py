"""The policy and reference models of a stage: built from `model.family`'s spec (which the driver builds once and
passes down), with checkpoint.init_from's weights, and the reference as a reference source."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

from megatron_po.config import Config, LoraConfig
from megatron_po.data.digests import combined, directory_key
from megatron_po.models.base import VLMBase
from megatron_po.models.family import FamilySpec
from megatron_po.models.init import uninitialised
from megatron_po.models.lora import apply_lora
from megatron_po.objectives import Objective
from megatron_po.parallel.groups import ParallelGroups
from megatron_po.train import checkpoint as ckpt
from megatron_po.train import ref_cache
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
    the same builder and weights (none under LoRA with reference.source=adapters_off: the policy's base is it).
    Under LoRA the policy is its base (checkpoint.init_from's weights, or the seed's) with adapters added."""
    policy = build_initial_model(cfg, family, groups, vocab_size)
    if cfg.model.lora.enabled:
        apply_lora(policy, cfg.model.lora, groups.tp, seed=cfg.train.seed)
    reference = None
    if objective.needs_reference and cfg.reference.source == "model":
        reference = build_initial_model(cfg, family, groups, vocab_size)
        reference.requires_grad_(False)
        reference.eval()
    return policy, reference


def build_initial_model(cfg: Config, family: FamilySpec, groups: ParallelGroups, vocab_size: int,
                        adapters_ok: bool = False) -> VLMBase:
    """`build_model` with checkpoint.init_from's weights loaded when given (a stage's starting point).

    A LoRA run's checkpoint (adapters only, naming its base) gives its base with the adapters on top where
    `adapters_ok` (eval, generate-p2: the trained policy); a training stage or a reference cache refuses it, since
    its base would then carry adapters (start from the `megatron-to-hf --merge-lora` export converted back).
    """
    init_from = Path(cfg.checkpoint.init_from) if cfg.checkpoint.init_from else None
    lora_base = ckpt.lora_base_of(init_from) if init_from else None
    if lora_base is not None:
        if not adapters_ok:
            raise ValueError(f"checkpoint.init_from {init_from} holds LoRA adapters only: start from the merged model "
                             "(tools/convert_hf.py megatron-to-hf CKPT OUT --merge-lora, then hf-to-megatron OUT), or "
                             "resume that run")
        return build_adapted_model(cfg, family, groups, vocab_size, init_from, lora_base)
    model = build_model(cfg, family, groups, vocab_size)
    if init_from:
        ckpt.load_model_weights(init_from, model)
    return model


def build_adapted_model(cfg: Config, family: FamilySpec, groups: ParallelGroups, vocab_size: int, path: Path,
                        lora_base: dict) -> VLMBase:
    """A LoRA run's policy from its checkpoint at `path`: the base it names (its init_from, or its seed's random
    weights), the adapters it was trained with, and their trained values."""
    base_cfg = dataclasses.replace(
        cfg, checkpoint=dataclasses.replace(cfg.checkpoint, init_from=lora_base["init_from"]),
        train=dataclasses.replace(cfg.train, seed=lora_base["seed"]))
    model = build_initial_model(base_cfg, family, groups, vocab_size)
    apply_lora(model, LoraConfig(**lora_base["adapters"]), groups.tp, seed=lora_base["seed"])
    ckpt.load_adapters(path, model)
    return model


def base_identity(cfg: Config, family: FamilySpec) -> Optional[dict]:
    """What a LoRA run's adapters belong to (None without LoRA): checkpoint.init_from and a key of its files (their
    names, sizes and the sha256 of each file's first and last MiB: a 72B base is never read whole at launch, and
    any other weights differ there), or the seed and shapes of a randomly initialised base; and the adapters'
    settings. Saved in every checkpoint (checkpoint.BASE); a resume refuses a checkpoint whose entry differs.
    Collective (every rank calls it): the ranks share out the base's files (data/digests.directory_key)."""
    if not cfg.model.lora.enabled:
        return None
    root, _ = ref_cache.reference_files(cfg)
    if root is None:
        key = combined({k: str(v) for k, v in {"seed": cfg.train.seed, **family.cache_settings(cfg.model)}.items()})
    else:
        key = directory_key(root)
    return {"init_from": str(root) if root else "", "key": key, "seed": cfg.train.seed,
            "adapters": dataclasses.asdict(cfg.model.lora)}


def policy_tower(policy) -> Tower:
    return Tower("policy", frozen=policy.vision_frozen)


def live_reference(policy, reference, groups: ParallelGroups) -> LiveReference:
    """The reference model as a reference source; it shares the policy's image encoding when both towers are
    frozen copies (one encoding per pair and step). `reference=None`: the policy with its adapters off (LoRA),
    which shares the encoding when no adapter sits on the projector (the tower and projector are then its own)."""
    if reference is None:
        return LiveReference(policy, groups, Tower("policy" if policy.vision_frozen else "reference", frozen=True),
                             adapters_off=True)
    return LiveReference(reference, groups, Tower("policy" if same_vision(policy, reference, groups) else "reference",
                                                  frozen=True))
