"""Hugging Face safetensors directory <-> megatron dist_checkpointing checkpoint, for any HF family.

HF -> megatron: the family's module is built on the meta device at TP=1 (no weights are allocated), its
`sharded_state_dict()` names every checkpoint tensor with its full shape, and each one is filled from the HF
shards through the family's rules. Everything is validated (config, shards, names, shapes, unused tensors) on
metadata before a single byte is written. Megatron checkpoints are TP/PP-agnostic, so the result loads at any
layout (`train.checkpoint.load_model_weights`, or `checkpoint.init_from` in a run).

Memory: HF tensors are read one at a time from memory-mapped shards (safetensors `safe_open`) and converted; the
converted model is held once until megatron writes it, never the HF and megatron copies together beyond the
tensor in flight. megatron -> HF writes HF shards as they fill and frees them.

Output layout of a converted checkpoint directory:
    <dist_checkpointing files>   keys "model.<sharded key>", the same as a training checkpoint's model part
    hf/                          the HF config.json, tokenizer and processor files (what a run needs to tokenize)
    conversion.json              family, source and dtype
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory

from megatron_po.config import ModelConfig, ParallelConfig
from megatron_po.convert.rules import Rule
from megatron_po.families import FamilyEntry, family_for_hf_config

HF_SIDE_FILES = re.compile(
    r"^(config\.json|generation_config\.json|preprocessor_config\.json|processor_config\.json|chat_template\.(json|jinja)|"
    r"tokenizer(_config)?\.json|special_tokens_map\.json|added_tokens\.json|vocab\.json|merges\.txt|tokenizer\.model)$"
)
CONVERSION_FILE = "conversion.json"
PREFIX = "model."  # same as train/checkpoint.py: a converted checkpoint is a valid `init_from`
logger = logging.getLogger("megatron_po")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16"}
"""safetensors' dtype strings -> DTYPES names (the dtypes a HF checkpoint converts from as it is)."""


def dtype_name(dtype: torch.dtype) -> str:
    """'float32' for torch.float32: the DTYPES name conversion.json records."""
    return str(dtype).removeprefix("torch.")


class ConversionError(ValueError):
    """Bad input to a converter; raised before anything is written."""


class HFCheckpoint:
    """Lazy view of a HF safetensors directory: names and shapes from headers, tensors on demand."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise ConversionError(f"{self.path}: no config.json (not a Hugging Face model directory)")
        self.config = json.loads((self.path / "config.json").read_text())
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        elif (self.path / "model.safetensors").is_file():
            weight_map = None
        else:
            raise ConversionError(f"{self.path}: neither model.safetensors nor model.safetensors.index.json")
        files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        missing = [f for f in files if not (self.path / f).is_file()]
        if missing:
            raise ConversionError(f"{self.path}: shard(s) listed in the index are missing: {missing}")
        self._handles = {f: safe_open(str(self.path / f), framework="pt") for f in files}
        self.where: dict[str, str] = {}
        for f, h in self._handles.items():
            for name in h.keys():
                self.where[name] = f
        if weight_map:
            absent = sorted(n for n, f in weight_map.items() if self.where.get(n) != f)
            if absent:
                raise ConversionError(f"{index}: {len(absent)} tensor(s) not found in their shard, e.g. {absent[:3]}")

    def names(self) -> set[str]:
        return set(self.where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self.where[name]].get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        return self._handles[self.where[name]].get_slice(name).get_dtype()

    def get(self, name: str) -> torch.Tensor:
        return self._handles[self.where[name]].get_tensor(name)


@contextlib.contextmanager
def single_process_parallel() -> Iterator:
    """A 1-rank gloo group with TP=PP=1 (the converters' own process), unless the caller already set one up.

    The CPU is asked for by name (`backend="gloo"`), so this runs on a GPU machine too (step 1 of a GPU recipe):
    conversion builds the module on the meta device and converts tensors from memory-mapped shards straight into
    the written checkpoint: a GPU would only add copies. The process sees no CUDA afterwards (parallel/cpu.py)."""
    import torch.distributed as dist

    from megatron_po.parallel.groups import init_parallel, teardown

    if dist.is_initialized():
        from megatron.core import parallel_state

        if not parallel_state.model_parallel_is_initialized():
            raise RuntimeError("torch.distributed is initialised but megatron's parallel state is not")
        from megatron_po.parallel.groups import current_groups

        yield current_groups(torch.device("cpu"))
        return
    groups = init_parallel(ParallelConfig(backend="gloo"), seed=0)
    try:
        yield groups
    finally:
        teardown()


def _model_config(dtype: torch.dtype) -> ModelConfig:
    # the family module reads its shapes from the HF config; this only picks dtype and the local spec
    return ModelConfig(params_dtype="bf16" if dtype == torch.bfloat16 else "fp32", spec="local")


def meta_module(family: FamilyEntry, hf_config: dict, dtype: torch.dtype, groups) -> torch.nn.Module:
    """The family's module at TP=1 on the meta device: names and full shapes of every tensor, no memory."""
    with torch.device("meta"):
        return family.spec().hf.build(hf_config, _model_config(dtype), ParallelConfig(backend="gloo"), groups)


def _meta_sharded_state_dict(family: FamilyEntry, hf_config: dict, dtype: torch.dtype, groups) -> dict:
    return meta_module(family, hf_config, dtype, groups).sharded_state_dict(prefix=PREFIX)


def tensor_entries(sd: dict) -> dict[str, ShardedTensor | ShardedTensorFactory]:
    """state_dict name (without PREFIX) -> sharded entry, for every tensor entry; objects are checked apart."""
    out = {}
    for name, entry in sd.items():
        if isinstance(entry, (ShardedTensor, ShardedTensorFactory)):
            out[name[len(PREFIX):]] = entry
        elif not isinstance(entry, ShardedObject):
            raise ConversionError(f"unexpected entry {name} of type {type(entry).__name__} in the sharded state")
    return out


def _shape_of(entry) -> tuple[int, ...]:
    return tuple(entry.data.shape)


def _check_rules(rules: list[Rule], entries: dict, hf: HFCheckpoint, ignored: tuple[str, ...]) -> None:
    by_name = {r.megatron: r for r in rules}
    no_rule = sorted(set(entries) - set(by_name))
    if no_rule:
        raise ConversionError(f"{len(no_rule)} megatron tensor(s) have no HF source, e.g. {no_rule[:3]}")
    stray = sorted(set(by_name) - set(entries))
    if stray:
        raise ConversionError(f"rules name megatron tensors the model does not have, e.g. {stray[:3]}")
    names = hf.names()
    needed = {n for r in rules for n in r.hf}
    missing = sorted(needed - names)
    if missing:
        raise ConversionError(f"{hf.path}: {len(missing)} tensor(s) the {hf.config.get('model_type')} model needs "
                              f"are missing, e.g. {missing[:3]}")
    unused = sorted(n for n in names - needed if not any(re.search(p, n) for p in ignored))
    if unused:
        raise ConversionError(f"{hf.path}: {len(unused)} tensor(s) would be dropped (unknown to the converter), "
                              f"e.g. {unused[:3]}")
    for r in rules:
        # the rule itself computes the shape on meta tensors: no data is read
        metas = [torch.empty(hf.shape(n), device="meta") for n in r.hf]
        try:
            got = tuple(r.to_megatron(*metas).shape)
        except Exception as e:  # a reshape that cannot apply is a shape mismatch of the input
            raise ConversionError(f"{hf.path}: shapes {[tuple(m.shape) for m in metas]} of {list(r.hf)} do not fit "
                                  f"{r.megatron}: {e}") from None
        want = _shape_of(entries[r.megatron])
        if got != want:
            raise ConversionError(f"{hf.path}: {list(r.hf)} give shape {got} for {r.megatron}, the config implies "
                                  f"{want}")


def _empty_dir(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        raise ConversionError(f"{out} exists and is not empty; refusing to overwrite")
    out.mkdir(parents=True, exist_ok=True)


def hf_to_megatron(hf_dir: str | Path, out_dir: str | Path, family: str | None = None, dtype: str = "auto") -> Path:
    """Converts a HF safetensors model directory into a megatron checkpoint directory (see module docstring).

    Args:
        family: expected family name (`model.family`); None accepts whatever the config's model_type says.
        dtype: 'auto' keeps the stored dtype (the checkpoint's tensors); 'float32' / 'bfloat16' cast.
    """
    hf_dir, out = Path(hf_dir), Path(out_dir)
    hf = HFCheckpoint(hf_dir)
    try:
        fam = family_for_hf_config(hf.config, family)
    except ValueError as e:
        raise ConversionError(f"{hf_dir}: {e}") from None
    stored = {hf.dtype(n) for n in hf.names()}
    if dtype == "auto":
        name = SAFETENSORS_DTYPES.get(next(iter(stored)) if len(stored) == 1 else "")
        target = DTYPES.get(name)
        if target is None:
            raise ConversionError(f"{hf_dir}: stored dtypes {sorted(stored)}: pass dtype=float32 or bfloat16")
    else:
        target = DTYPES[dtype]
    module = fam.spec().hf
    with single_process_parallel() as groups:
        sd = _meta_sharded_state_dict(fam, hf.config, target, groups)
        entries = tensor_entries(sd)
        # a family reads several HF name layouts (hub vs transformers-module names): the names pick one
        rules = module.hf_rules(hf.config, hf_names=hf.names())
        _check_rules(rules, entries, hf, getattr(module, "HF_IGNORED", ()))
        _empty_dir(out)
        for r in rules:
            t = r.to_megatron(*[hf.get(n) for n in r.hf]).to(target).contiguous()
            entries[r.megatron].data = t
            if isinstance(entries[r.megatron], ShardedTensor):
                entries[r.megatron].dtype = t.dtype
        dist_checkpointing.save(sd, str(out))
    side = out / "hf"
    side.mkdir()
    for f in hf_dir.iterdir():
        if HF_SIDE_FILES.match(f.name):
            shutil.copy2(f, side / f.name)
    source_dtype = SAFETENSORS_DTYPES.get(next(iter(stored)) if len(stored) == 1 else "")
    (out / CONVERSION_FILE).write_text(json.dumps(
        {"family": fam.name, "source": str(hf_dir.resolve()), "dtype": dtype_name(target),
         "source_dtype": source_dtype or dtype_name(target)}, indent=1))
    return out


def conversion_record(init_from: Path, hf_path: Path, family: str, params_dtype: torch.dtype) -> dict:
    """The conversion.json a training checkpoint carries (with a copy of hf/): the family and source of the
    converted checkpoint the run started from, and the dtype the run trained in, so that `megatron-to-hf
    OUTPUT_DIR/checkpoints/iter_N` needs nothing else."""
    found = [p / CONVERSION_FILE for p in (Path(init_from), Path(hf_path).parent) if (p / CONVERSION_FILE).is_file()]
    meta = json.loads(found[0].read_text()) if found else {"family": family, "source": str(hf_path)}
    meta.setdefault("source_dtype", meta.get("dtype", dtype_name(params_dtype)))
    return dict(meta, dtype=dtype_name(params_dtype))


def write_conversion(ckpt_dir: Path, hf_path: Path, record: dict) -> None:
    """hf/ (config, tokenizer, processor files) and conversion.json next to a training checkpoint's shards."""
    side = Path(ckpt_dir) / "hf"
    side.mkdir(exist_ok=True)
    for f in Path(hf_path).iterdir():
        if f.is_file() and HF_SIDE_FILES.match(f.name):
            shutil.copy2(f, side / f.name)
    (Path(ckpt_dir) / CONVERSION_FILE).write_text(json.dumps(record, indent=1))


def read_conversion(ckpt_dir: Path) -> tuple[FamilyEntry, dict, dict]:
    ckpt_dir = Path(ckpt_dir)
    meta_file, cfg_file = ckpt_dir / CONVERSION_FILE, ckpt_dir / "hf" / "config.json"
    if not meta_file.is_file() or not cfg_file.is_file():
        raise ConversionError(f"{ckpt_dir}: not a converted checkpoint (needs {CONVERSION_FILE} and hf/config.json)")
    meta = json.loads(meta_file.read_text())
    hf_config = json.loads(cfg_file.read_text())
    return family_for_hf_config(hf_config, meta["family"]), hf_config, meta


EXPORT_DTYPES = {"source": None, "bf16": torch.bfloat16, "fp32": torch.float32}


def export_dtype(meta: dict, dtype: str) -> torch.dtype:
    """The dtype `dtype` ('source', 'bf16', 'fp32') names for a checkpoint with conversion record `meta`; warns
    when it is narrower than the weights the run saved."""
    if dtype not in EXPORT_DTYPES:
        raise ConversionError(f"dtype {dtype!r}: one of {sorted(EXPORT_DTYPES)}")
    saved = DTYPES[meta["dtype"]]
    export = EXPORT_DTYPES[dtype] or DTYPES[meta.get("source_dtype", meta["dtype"])]
    if torch.finfo(export).bits < torch.finfo(saved).bits:
        logger.warning("megatron-to-hf: the checkpoint holds %s weights; exporting %s rounds them (--dtype fp32 "
                       "keeps them)", dtype_name(saved), dtype_name(export))
    return export


def load_model_tensors(ckpt_dir: Path, family: FamilyEntry, hf_config: dict, dtype: torch.dtype, rules: list[Rule],
                       groups) -> dict[str, torch.Tensor]:
    """Every tensor of the family's model from `ckpt_dir` at its full TP=1 shape, in `dtype` (the one it was saved
    in), keyed by state_dict name without PREFIX. Every tensor must have a rule (checked before reading)."""
    sd = _meta_sharded_state_dict(family, hf_config, dtype, groups)
    entries = tensor_entries(sd)
    missing = sorted(set(entries) - {r.megatron for r in rules})
    if missing:
        raise ConversionError(f"{len(missing)} megatron tensor(s) have no HF rule, e.g. {missing[:3]}")
    for e in entries.values():
        e.data = torch.empty(_shape_of(e), dtype=dtype)
    loaded = dist_checkpointing.load(sd, str(ckpt_dir))
    return {k[len(PREFIX):]: v for k, v in loaded.items() if k.startswith(PREFIX) and k[len(PREFIX):] in entries}


def write_safetensors(out: Path, tensors: Iterator[tuple[str, torch.Tensor]], max_shard_bytes: int) -> None:
    """HF shards model.safetensors or model-0000i-of-0000n.safetensors (+ index) from (name, tensor) pairs,
    each shard written as soon as it fills so that only one shard is held at a time."""
    from safetensors.torch import save_file

    shard: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}
    files: list[str] = []
    size = 0

    def flush():
        nonlocal shard, size
        if shard:
            name = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            files.append(name)
            weight_map.update({k: name for k in shard})
            shard, size = {}, 0

    for name, t in tensors:
        if name in weight_map or name in shard:
            raise ConversionError(f"two rules write HF tensor {name}")
        nbytes = t.numel() * t.element_size()
        if size and size + nbytes > max_shard_bytes:
            flush()
        shard[name] = t.contiguous()
        size += nbytes
    flush()
    # rename model-0000i.safetensors to the HF convention model-0000i-of-0000n.safetensors
    n = len(files)
    renamed = {}
    for i, name in enumerate(files, 1):
        final = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
        (out / name).rename(out / final)
        renamed[name] = final
    if n > 1:
        index = {"metadata": {}, "weight_map": {k: renamed[v] for k, v in sorted(weight_map.items())}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


TensorSource = Callable[[FamilyEntry, dict, dict, list[Rule], object],
                        tuple[dict[str, torch.Tensor], Callable[[str, torch.Tensor], torch.Tensor]]]
"""(family, hf_config, conversion record, rules, groups) -> (megatron tensors by name, map(name, tensor) applied
as each is written): where megatron_to_hf's weights come from other than the checkpoint itself (LoRA merge)."""


def megatron_to_hf(ckpt_dir: str | Path, out_dir: str | Path, max_shard_bytes: int = 5 << 30,
                   dtype: str = "source", tensors: Optional[TensorSource] = None) -> Path:
    """Writes a HF safetensors directory (sharded, with index) from a converted or trained checkpoint.

    `ckpt_dir` is a directory made by `hf_to_megatron`, or a training checkpoint (OUTPUT_DIR/checkpoints/iter_N)
    of a run that started from one (it carries hf/ and conversion.json). A LoRA run's checkpoint holds adapters
    only: convert/lora.py exports it (`export_hf`, which refuses it without a LoRA mode), handing its merged weights
    in as `tensors`.

    Args:
        dtype: 'source' (the original HF checkpoint's dtype), 'bf16' or 'fp32'. Weights are read in the dtype
            they were saved in (the run's); a narrower export dtype rounds them, with a warning.
    """
    ckpt_dir, out = Path(ckpt_dir), Path(out_dir)
    fam, hf_config, meta = read_conversion(ckpt_dir)
    export = export_dtype(meta, dtype)
    module = fam.spec().hf
    rules = module.hf_rules(hf_config)  # written back in the family's default layout
    with single_process_parallel() as groups:
        _empty_dir(out)
        if tensors is None:
            loaded = load_model_tensors(ckpt_dir, fam, hf_config, DTYPES[meta["dtype"]], rules, groups)
            merge = lambda name, w: w  # noqa: E731
        else:
            loaded, merge = tensors(fam, hf_config, meta, rules, groups)

    def hf_tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for r in rules:
            tensor = merge(r.megatron, loaded.pop(r.megatron))
            for name, t in zip(r.hf, r.to_hf(tensor), strict=True):
                yield name, t.to(export)

    write_safetensors(out, hf_tensors(), max_shard_bytes)
    for f in (ckpt_dir / "hf").iterdir():
        shutil.copy2(f, out / f.name)
    return out
