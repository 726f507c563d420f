"""LoRA training checkpoints -> Hugging Face: the merged model (`megatron-to-hf --merge-lora`) or a PEFT adapter
directory (`megatron-to-hf --adapter`).

A LoRA run's checkpoint (train/checkpoint.py) holds only the adapters; its trainer_state.json's `lora_base` names
the base they belong to (checkpoint.init_from, a converted HF model) with a key of that directory's files, and the
adapters' settings (models/lora.py: A [r, in], B [out, r], the linear gains (α/r)·B A x). Megatron's fused layers
are split as the family's conversion rules split their weights: B's rows follow the adapted weight's rows, so the
weight's rule applied to B gives each HF module its B (q/k/v_proj out of linear_qkv, gate/up_proj out of
linear_fc1), and every piece keeps the whole A (its input columns are the weight's, unsplit).

PEFT names a module as the loaded transformers model does, which is not the checkpoint file's name in transformers
5 (it renames `model.layers.*` to `model.language_model.layers.*` on load, for instance); the family's own rules
for that in-memory layout (`module_rules`) name the adapters, so peft finds every target as it is.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch
from megatron.core import dist_checkpointing

from megatron_po.config import LoraConfig
from megatron_po.convert.core import (DTYPES, HF_SIDE_FILES, PREFIX, ConversionError, _empty_dir, export_dtype,
                                      load_model_tensors, megatron_to_hf, meta_module, read_conversion,
                                      single_process_parallel, tensor_entries)
from megatron_po.convert.rules import Rule
from megatron_po.data.digests import directory_key
from megatron_po.families import FamilyEntry

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
IN_MEMORY_PROBE = ("model.language_model.embed_tokens.weight",)
"""A tensor name of transformers 5's in-memory layout of both HF families (`model.language_model.*`): handed to a
family's `hf_rules` as `hf_names`, it selects the rules that name tensors as the loaded model's modules do."""
LORA_EXPORTS = ("merge", "adapter")
"""export_hf's `lora` modes (--merge-lora, --adapter)."""
Merge = Callable[[str, torch.Tensor], torch.Tensor]
"""(weight's state_dict name, base tensor) -> the tensor to export."""
NOT_SIDE_FILES = ("config.json", "generation_config.json")
"""Left out of an adapter directory: a config.json would make transformers take it for a whole model."""


def export_hf(ckpt_dir: str | Path, out_dir: str | Path, max_shard_bytes: int = 5 << 30, dtype: str = "source",
              lora: Optional[str] = None, lora_base: str | Path | None = None) -> Path:
    """`megatron-to-hf` of any checkpoint: a full one as core.megatron_to_hf writes it; a LoRA one (adapters only)
    needs `lora`.

    Args:
        lora: 'merge': the base (lora_base.init_from) with W + (α/r)·B A in every adapted weight, as a full HF
            model; 'adapter': a PEFT adapter directory for the source HF model. Refused for a full checkpoint.
        lora_base: the base checkpoint directory, where lora_base.init_from has moved (checked against its key).
    """
    ckpt_dir, out = Path(ckpt_dir), Path(out_dir)
    base = check_mode(ckpt_dir, lora)
    if base is None:
        return megatron_to_hf(ckpt_dir, out, max_shard_bytes, dtype)
    if lora == "adapter":
        fam, hf_config, meta = read_conversion(ckpt_dir)
        return write_adapter(ckpt_dir, out, fam, hf_config, meta, base, export_dtype(meta, dtype))
    root = base_dir(ckpt_dir, base, lora_base)  # refused before anything is written
    return megatron_to_hf(ckpt_dir, out, max_shard_bytes, dtype,
                          tensors=lambda *args: base_and_merge(ckpt_dir, root, base, *args))


def check_mode(ckpt_dir: Path, mode: Optional[str]) -> Optional[dict]:
    """The checkpoint's `lora_base` entry for a LoRA export (`mode` 'merge' or 'adapter'), None for a full one;
    a LoRA checkpoint without a mode is refused, naming both flags, before anything is written."""
    if mode is not None and mode not in LORA_EXPORTS:
        raise ConversionError(f"lora {mode!r}: one of {list(LORA_EXPORTS)}")
    from megatron_po.train.checkpoint import lora_base_of

    base = lora_base_of(ckpt_dir)
    if mode is None:
        if base is not None:
            raise ConversionError(f"{ckpt_dir} holds LoRA adapters only: pass --merge-lora (a full HF model, base + "
                                  "adapters) or --adapter (a PEFT adapter directory)")
        return None
    if base is None:
        raise ConversionError(f"{ckpt_dir}: --merge-lora / --adapter need a LoRA training checkpoint; this one holds "
                              "full weights (no lora_base in trainer_state.json): export it without either")
    if not base.get("init_from"):
        raise ConversionError(f"{ckpt_dir}: its adapters were trained on a randomly initialised base (no "
                              "checkpoint.init_from): there are no base weights to export them with")
    return base


def lora_config(base: dict) -> LoraConfig:
    return LoraConfig(**base["adapters"])


def base_dir(ckpt_dir: Path, base: dict, override: str | Path | None) -> Path:
    """The base checkpoint directory (`override`, else lora_base.init_from), refused unless its files' key is
    the one the run recorded: merged into other weights, the adapters would give another model silently."""
    from megatron_po.train.checkpoint import resolve_checkpoint

    root = Path(override or base["init_from"])
    if not root.is_dir():
        raise ConversionError(f"{ckpt_dir}: base checkpoint {root} (lora_base.init_from) not found; pass its "
                              "current place with --lora-base DIR")
    root = resolve_checkpoint(root)
    if directory_key(root) != base["key"]:
        raise ConversionError(f"{ckpt_dir}: {root} is not the base its adapters were trained on (its files' key "
                              f"differs from lora_base.key, recorded for {base['init_from']})")
    return root


def load_adapters(ckpt_dir: Path, fam: FamilyEntry, hf_config: dict, dtype: torch.dtype, cfg: LoraConfig,
                  groups) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """adapted weight's state_dict name -> (A, B) at full TP=1 shapes, in `dtype`, from the checkpoint.

    The family's module is built on the meta device with the run's adapters applied, so the sharded keys and the
    swiglu-split B of linear_fc1 are read exactly as the run wrote them."""
    from megatron_po.models.lora import apply_lora, base_name, is_adapter_param

    module = meta_module(fam, hf_config, dtype, groups)
    apply_lora(module, cfg, groups.tp, seed=0)  # A's initial values are overwritten by the load
    sd = {k: v for k, v in module.sharded_state_dict(prefix=PREFIX).items() if is_adapter_param(k)}
    for e in tensor_entries(sd).values():
        e.data = torch.empty(tuple(e.data.shape), dtype=dtype)
    loaded = {k[len(PREFIX):]: v for k, v in dist_checkpointing.load(sd, str(ckpt_dir)).items()}
    if not loaded:
        raise ConversionError(f"{ckpt_dir}: no adapters for target_modules={cfg.target_modules!r}")
    pairs = {}
    for key in loaded:
        if key.endswith(".lora_a"):
            pairs[base_name(key)] = (loaded[key], loaded[key.removesuffix("_a") + "_b"])
    return pairs


def base_and_merge(ckpt_dir: Path, root: Path, base: dict, fam: FamilyEntry, hf_config: dict, meta: dict,
                   rules: list[Rule], groups) -> tuple[dict[str, torch.Tensor], Merge]:
    """The tensors of the base `root` (`base_dir`), and `merge(name, W)`: W + (α/r)·B A in fp32 for an adapted
    weight (rounded once, to the export dtype, by the caller), W for any other. Merged one weight at a time, as
    the export writes it: all adapted weights in fp32 at once would double a bf16 model's memory."""
    base_meta = root / "conversion.json"  # a converted base records its dtype; else it is the run's
    base_dtype = DTYPES[json.loads(base_meta.read_text())["dtype"] if base_meta.is_file() else meta["dtype"]]
    tensors = load_model_tensors(root, fam, hf_config, base_dtype, rules, groups)
    cfg = lora_config(base)
    scale = cfg.alpha / cfg.rank
    pairs = load_adapters(ckpt_dir, fam, hf_config, DTYPES[meta["dtype"]], cfg, groups)
    unknown = sorted(set(pairs) - set(tensors))
    if unknown:
        raise ConversionError(f"{ckpt_dir}: adapters on weights the base does not have, e.g. {unknown[:3]}")

    def merge(name: str, w: torch.Tensor) -> torch.Tensor:
        if name not in pairs:
            return w
        a, b = pairs.pop(name)
        return w.float() + (b.float() @ a.float()) * scale

    return tensors, merge


def module_rules(module, hf_config: dict) -> list[Rule]:
    """The family's rules under the loaded transformers model's module names (see the module docstring).

    A remote-code model (config.json's auto_map; OpenGVLab's InternVLChatModel) loads its files' names as they
    are, so the export's own layout is its module layout."""
    if "auto_map" in hf_config or hf_config.get("model_type") == "internvl_chat":
        return module.hf_rules(hf_config)
    return module.hf_rules(hf_config, hf_names=IN_MEMORY_PROBE)


def split_adapter(rule: Rule, a: torch.Tensor, b: torch.Tensor, shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """PEFT's tensors (without the base_model.model. prefix) for one adapted megatron weight of full `shape`.

    The weight's rule splits B's rows; each piece must come out as a [rows, r] B of a whole HF weight [rows, in]
    (a rule that reshuffled input columns, or reshaped, could not be expressed as per-module adapters)."""
    pieces = rule.to_hf(b)
    weights = rule.to_hf(torch.empty(shape, device="meta"))
    out = {}
    for name, b_i, w_i in zip(rule.hf, pieces, weights, strict=True):
        if not name.endswith(".weight") or w_i.dim() != 2 or w_i.shape[1] != a.shape[1] \
                or tuple(b_i.shape) != (w_i.shape[0], a.shape[0]):
            raise ConversionError(f"the adapter of {rule.megatron} does not split onto {list(rule.hf)} row-wise")
        path = name.removesuffix(".weight")
        out[f"{path}.lora_A.weight"] = a.clone()  # one copy per module: safetensors refuses shared storage
        out[f"{path}.lora_B.weight"] = b_i.contiguous()
    return out


def adapter_config(cfg: LoraConfig, modules: list[str], source: str) -> dict:
    """adapter_config.json: peft's LoraConfig fields (peft 0.22), the plain LoRA our adapters are: α/r scaling (no
    rsLoRA, no DoRA), no bias, targets as exact module names (peft matches a name equal to a target)."""
    alpha = int(cfg.alpha) if float(cfg.alpha).is_integer() else cfg.alpha
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": source, "revision": None,
            "inference_mode": True, "r": cfg.rank, "lora_alpha": alpha, "lora_dropout": cfg.dropout,
            "target_modules": sorted(modules), "exclude_modules": None, "fan_in_fan_out": False, "bias": "none",
            "use_rslora": False, "use_dora": False, "lora_bias": False, "modules_to_save": None,
            "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
            "alpha_pattern": {}}


def write_adapter(ckpt_dir: Path, out: Path, fam: FamilyEntry, hf_config: dict, meta: dict, base: dict,
                  export: torch.dtype) -> Path:
    """A PEFT adapter directory: adapter_config.json, adapter_model.safetensors and the tokenizer / processor
    files of hf/ (the base model itself is the source HF checkpoint, conversion.json's `source`)."""
    from safetensors.torch import save_file

    cfg = lora_config(base)
    rules = {r.megatron: r for r in module_rules(fam.spec().hf, hf_config)}
    with single_process_parallel() as groups:
        pairs = load_adapters(ckpt_dir, fam, hf_config, DTYPES[meta["dtype"]], cfg, groups)
    tensors = {}
    for name, (a, b) in pairs.items():
        if name not in rules:
            raise ConversionError(f"{fam.name}: no HF rule for the adapted weight {name}")
        tensors.update(split_adapter(rules[name], a, b, (b.shape[0], a.shape[1])))
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in tensors})
    _empty_dir(out)
    save_file({f"base_model.model.{k}": v.to(export) for k, v in sorted(tensors.items())},
              str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (out / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(cfg, modules, meta.get("source", "")), indent=2))
    for f in (ckpt_dir / "hf").iterdir():
        if f.is_file() and HF_SIDE_FILES.match(f.name) and f.name not in NOT_SIDE_FILES:
            shutil.copy2(f, out / f.name)
    return out
