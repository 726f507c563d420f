"""The reference log-prob cache: written once by `megatron-po precompute-ref`, read by `reference.source=cache`.

A cache directory holds, per split ("train", and "eval" when evaluation is on):

    <split>.safetensors   the reference's per-row sums of every kept sample, in fp64, exactly as the live
                          reference pass computes them: pairs -> ``chosen`` [N], ``rejected`` [N] and
                          ``chosen_segments`` [N, K] (per-sentence sums, 0 past a response's sentences: ASPO);
                          P2-DPO samples -> ``terms`` [N, 6] (the reference rows of P2_TERMS, NaN where a branch
                          is absent)
    manifest.json         the sample ids of each split (row order of its tensors), the key and its components;
                          written last and atomically: a directory without it is an interrupted precompute

Samples are found by record id, never by position: pairs skipped as too long (or any other reason) cannot shift
later ones. The key is a sha256 over everything that decides the numbers — each split's data key from its prepared
index (data/index.py: the data files' bytes, and the path, size and mtime of every image they name), the tokenizer / chat template / processor files, the reference checkpoint's files (or the seed and shapes
of a randomly initialised one), and the settings that change tokens or images (family, max_seq_length, dtype,
the objective's input kind, P2-DPO's calib_reference, tiny_vlm's shapes). A training run recomputes it and
refuses a cache whose key differs, naming each component that changed. No pickle is involved: safetensors + JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from megatron_po.config import Config
from megatron_po.data.digests import file_digests
from megatron_po.kinds import INPUT_KINDS, InputKind, kind_of
from megatron_po.data.p2_collate import P2_TERMS
from megatron_po.models.family import FamilySpec
from megatron_po.objectives import Objective
from megatron_po.train.batch import MicroBatch, SeqLogps
from megatron_po.train.checkpoint import LATEST, latest_checkpoint

FORMAT = 1
"""Bump when the code that turns a record into the reference's rows changes (chat layout, collation, log-probs)."""
MANIFEST = "manifest.json"
CACHED_SPLITS = ("train", "eval")
"""Splits whose reference log-probs a run reads (the yes/no probe scores the policy only)."""


class CacheError(ValueError):
    """The cache cannot serve this run; the message names the cache and what differs or is missing."""


# ------------------------------------------------------------------------------------------------ the key


def reference_files(cfg: Config) -> tuple[Optional[Path], list[Path]]:
    """The reference's checkpoint directory (checkpoint.init_from, its latest iteration if it is a run's
    checkpoints root) and its files; (None, []) for a randomly initialised reference."""
    if not cfg.checkpoint.init_from:
        return None, []
    root = Path(cfg.checkpoint.init_from)
    if (root / LATEST).exists():
        root = latest_checkpoint(root)
    return root, sorted(p for p in root.rglob("*") if p.is_file())


def settings(cfg: Config, objective: Objective, family: FamilySpec) -> dict[str, str]:
    """The configuration values that change the reference's tokens, images or weights."""
    m = cfg.model
    out = {"format": FORMAT, "model.family": m.family, "model.max_seq_length": m.max_seq_length,
           "model.params_dtype": m.params_dtype, "objective.inputs": objective.inputs}
    out.update(family.cache_settings(m))  # e.g. tiny_vlm's shapes (HF families: hashed files)
    out.update(kind_of(objective).settings(objective.cfg))  # e.g. P2-DPO's calibration rows
    if not cfg.checkpoint.init_from:  # a random reference: its weights follow from the seed
        out["train.seed"] = cfg.train.seed
    return {f"setting {k}": json.dumps(v) for k, v in out.items()}


def key_components(cfg: Config, objective: Objective, family: FamilySpec, datasets: dict) -> dict[str, str]:
    """name -> digest or value of everything that decides the cached numbers (collective over all ranks).

    Args:
        family: model.family's spec (the settings beyond hashed files that decide the numbers: cache_settings).
        datasets: split name -> the dataset the run reads; only CACHED_SPLITS are keyed, each by its prepared
            index's data key (the data files' bytes and the images' path, size and mtime: never hashed again).
    """
    splits = {name: ds for name, ds in datasets.items() if name in CACHED_SPLITS}
    tokenizer = next(iter(splits.values())).collator.tokenizer
    ckpt_dir, ckpt_files = reference_files(cfg)
    digests = file_digests([*tokenizer.files, *ckpt_files])
    out = {f"data ({name}): data files and images": ds.index.data_key for name, ds in splits.items()}
    for p in tokenizer.files:
        out[f"tokenizer/processor file {p.name}"] = digests[str(p)]
    for p in ckpt_files:
        out[f"reference checkpoint file {p.relative_to(ckpt_dir)}"] = digests[str(p)]
    out.update(settings(cfg, objective, family))
    return out


def cache_key(components: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(components, sort_keys=True).encode()).hexdigest()


# ------------------------------------------------------------------------------------------------ per-sample values


class ReferenceCache:
    """A checked cache: `lookup` gives a micro-batch's reference `SeqLogps` from its sample ids."""

    def __init__(self, path: Path, manifest: dict, tables: dict[str, dict[str, torch.Tensor]],
                 kinds: dict[str, InputKind]):
        self.path = path
        self.kinds = kinds
        """Each split's input kind (its cached values' layout)."""
        self.manifest = manifest
        self.tables = tables
        self.index = {split: {sid: i for i, sid in enumerate(manifest["splits"][split]["ids"])} for split in tables}

    def rows_of(self, split: str, ids: list[str]) -> torch.Tensor:
        index = self.index[split]
        missing = [sid for sid in ids if sid not in index]
        if missing:
            raise CacheError(f"reference cache {self.path}: no entry for {len(missing)} {split} sample(s), e.g. "
                             f"{missing[:3]}: it was computed on other data; rerun megatron-po precompute-ref")
        return torch.tensor([index[sid] for sid in ids])

    def lookup(self, split: str, mb: MicroBatch, device) -> SeqLogps:
        """The reference's sums over ``mb.reference_rows``, laid out as the live reference pass gives them."""
        return self.kinds[split].cache_lookup(self.tables[split], self.rows_of(split, mb.sample_ids), mb, device)


# ------------------------------------------------------------------------------------------------ read / write


def _describe(diff: list[tuple[str, object, object]]) -> str:
    def short(v):
        return "absent" if v is None else (v[:12] + "…" if isinstance(v, str) and len(v) == 64 else v)

    return "; ".join(f"{name}: cache {short(a)}, now {short(b)}" for name, a, b in diff)


def open_cache(cfg: Config, objective: Objective, family: FamilySpec, datasets: dict) -> ReferenceCache:
    """Reads `reference.cache_path` and checks it serves this run (collective over all ranks).

    Raises:
        CacheError: no complete cache there (missing or interrupted), a split the run reads is absent, a sample
            id is missing, or the key differs (naming every component that changed).
    """
    path = Path(cfg.reference.cache_path)
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        raise CacheError(f"reference cache {path}: no {MANIFEST} (not computed, or precompute-ref was interrupted); "
                         "run megatron-po precompute-ref with this config first")
    manifest = json.loads(manifest_file.read_text())
    if manifest.get("format") != FORMAT:
        raise CacheError(f"reference cache {path}: format {manifest.get('format')}, this version reads {FORMAT}; "
                         "recompute it")
    components = key_components(cfg, objective, family, datasets)
    if manifest["key"] != cache_key(components):
        theirs = manifest["components"]
        diff = [(k, theirs.get(k), components.get(k)) for k in sorted(theirs.keys() | components.keys())
                if theirs.get(k) != components.get(k)]
        raise CacheError(f"reference cache {path} was computed for other inputs — {_describe(diff)}. Recompute it "
                         "with megatron-po precompute-ref for this config")
    kind = kind_of(objective)
    needed = [s for s in CACHED_SPLITS if s in datasets and (s == "train" or kind.evaluates)]
    tables = {}
    for split in needed:
        entry = manifest["splits"].get(split)
        if entry is None:
            raise CacheError(f"reference cache {path}: has no {split!r} split; recompute it with this config")
        tables[split] = load_file(str(path / entry["file"]))
    cache = ReferenceCache(path, manifest, tables, {s: kind if s == "train" else INPUT_KINDS["pairs"] for s in needed})
    for split in needed:  # a partial cache fails here, at start-up, not at the step that needs the sample
        cache.rows_of(split, datasets[split].ids)
    return cache


def write_cache(path: Path, components: dict[str, str], splits: dict[str, tuple[list[str], dict]]) -> None:
    """Writes the split files, then the manifest (atomically: it marks the cache complete). One rank calls it.

    Args:
        splits: name -> (sample ids, tensors with those rows).
    """
    path.mkdir(parents=True, exist_ok=True)
    entries = {}
    for name, (ids, tensors) in splits.items():
        file = f"{name}.safetensors"
        tmp = path / (file + ".tmp")
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata={"split": name})
        tmp.chmod(0o644)  # safetensors writes owner-only files; a cache is shared like a checkpoint
        os.replace(tmp, path / file)
        entries[name] = {"file": file, "num_samples": len(ids), "ids": ids}
    manifest = {"format": FORMAT, "key": cache_key(components), "components": components, "splits": entries,
                "terms": list(P2_TERMS)}
    tmp = path / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, path / MANIFEST)


def invalidate(path: Path) -> None:
    """Removes a previous manifest before recomputing, so an interrupted precompute leaves no valid cache."""
    (path / MANIFEST).unlink(missing_ok=True)
