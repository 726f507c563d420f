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
later ones. The key is a sha256 over everything that decides the numbers — the data files' bytes, every image they
name, the tokenizer / chat template / processor files, the reference checkpoint's files (or the seed and shapes
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
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from megatron_po.config import Config
from megatron_po.families import family_spec
from megatron_po.data.p2_collate import P2_TERMS
from megatron_po.objectives import Objective
from megatron_po.train.batch import MicroBatch, SeqLogps
from megatron_po.train.checkpoint import LATEST, latest_checkpoint

FORMAT = 1
"""Bump when the code that turns a record into the reference's rows changes (chat layout, collation, log-probs)."""
MANIFEST = "manifest.json"
CACHED_SPLITS = ("train", "eval")
"""Splits whose reference log-probs a run reads (the yes/no probe scores the policy only)."""
_CHUNK = 8 << 20


class CacheError(ValueError):
    """The cache cannot serve this run; the message names the cache and what differs or is missing."""


# ------------------------------------------------------------------------------------------------ the key


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_digests(paths: list[Path]) -> dict[str, str]:
    """sha256 of each file, the files shared out over all ranks (each reads 1/world of the bytes)."""
    paths = sorted({str(p) for p in paths})
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    mine = {p: _sha256(Path(p)) for p in paths[rank::world]}
    if world == 1:
        return mine
    parts = [None] * world
    dist.all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in part.items()}


def _combined(digests: dict[str, str], paths: list[Path], root: Path) -> str:
    """One digest over many files (named relative to `root`, so a moved data directory keeps its key)."""
    h = hashlib.sha256()
    for p in sorted(paths, key=str):
        name = os.path.relpath(p, root) if p.is_absolute() == root.is_absolute() else str(p)
        h.update(f"{name}\0{digests[str(p)]}\n".encode())
    return h.hexdigest()


def reference_files(cfg: Config) -> tuple[Optional[Path], list[Path]]:
    """The reference's checkpoint directory (checkpoint.init_from, its latest iteration if it is a run's
    checkpoints root) and its files; (None, []) for a randomly initialised reference."""
    if not cfg.checkpoint.init_from:
        return None, []
    root = Path(cfg.checkpoint.init_from)
    if (root / LATEST).exists():
        root = latest_checkpoint(root)
    return root, sorted(p for p in root.rglob("*") if p.is_file())


def settings(cfg: Config, objective: Objective) -> dict[str, str]:
    """The configuration values that change the reference's tokens, images or weights."""
    m = cfg.model
    out = {"format": FORMAT, "model.family": m.family, "model.max_seq_length": m.max_seq_length,
           "model.params_dtype": m.params_dtype, "objective.inputs": objective.inputs}
    out.update(family_spec(m.family).cache_settings(m))  # e.g. tiny_vlm's shapes (HF families: hashed files)
    if objective.inputs == "p2":  # the reference's calibration rows hold y_l^f or y_w^f
        out["objective.params.calib_reference"] = objective.cfg.calib_reference
    if not cfg.checkpoint.init_from:  # a random reference: its weights follow from the seed
        out["train.seed"] = cfg.train.seed
    return {f"setting {k}": json.dumps(v) for k, v in out.items()}


def key_components(cfg: Config, objective: Objective, datasets: dict) -> dict[str, str]:
    """name -> digest or value of everything that decides the cached numbers (collective over all ranks).

    Args:
        datasets: split name -> the PreferenceDataset / P2Dataset the run reads (its records, images, source file
            and tokenizer); only CACHED_SPLITS are keyed.
    """
    splits = {name: ds for name, ds in datasets.items() if name in CACHED_SPLITS}
    tokenizer = next(iter(splits.values())).collator.tokenizer
    ckpt_dir, ckpt_files = reference_files(cfg)
    images = {name: sorted({p for r in ds.records for p in ds.image_files(r)}) for name, ds in splits.items()}
    sources = [p for ds in splits.values() for p in ds.data_files]
    digests = file_digests([*sources, *tokenizer.files, *ckpt_files, *(p for ps in images.values() for p in ps)])
    out = {}
    for name, ds in splits.items():
        for p in ds.data_files:  # embedded images are bytes of these files
            out[f"data file ({name}) {p.name}"] = digests[str(p)]
        out[f"images ({name}, {len(images[name])} files)"] = _combined(digests, images[name], ds.image_root)
    for p in tokenizer.files:
        out[f"tokenizer/processor file {p.name}"] = digests[str(p)]
    for p in ckpt_files:
        out[f"reference checkpoint file {p.relative_to(ckpt_dir)}"] = digests[str(p)]
    out.update(settings(cfg, objective))
    return out


def cache_key(components: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(components, sort_keys=True).encode()).hexdigest()


# ------------------------------------------------------------------------------------------------ per-sample values


def sample_values(mb: MicroBatch, ref: SeqLogps) -> dict[str, torch.Tensor]:
    """One micro-batch's reference sums per sample (the tensors of a split file, B rows)."""
    b = mb.num_samples
    if mb.p2 is not None:
        rows = mb.p2.p2_rows  # [6, B]
        terms = torch.where(rows >= 0, ref.seq[rows.clamp_min(0)], torch.full_like(rows, float("nan"), dtype=ref.seq.dtype))
        return {"terms": terms.t().contiguous()}
    return {"chosen": ref.seq[:b], "rejected": ref.seq[b:], "chosen_segments": ref.segments}


def _pad_columns(t: torch.Tensor, k: int) -> torch.Tensor:
    return torch.cat([t, t.new_zeros(t.shape[0], k - t.shape[1])], 1) if t.shape[1] < k else t


class ReferenceCache:
    """A checked cache: `lookup` gives a micro-batch's reference `SeqLogps` from its sample ids."""

    def __init__(self, path: Path, manifest: dict, tables: dict[str, dict[str, torch.Tensor]]):
        self.path = path
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
        table = self.tables[split]
        rows = self.rows_of(split, mb.sample_ids)
        if mb.p2 is not None:
            terms = table["terms"][rows]  # [B, 6]
            p2_rows = mb.p2.p2_rows.cpu()
            seq = torch.zeros(mb.reference_rows.num_logical, dtype=terms.dtype)
            present = p2_rows >= 0
            seq[p2_rows[present]] = terms.t()[present]
            return SeqLogps(seq.to(device))
        seq = torch.cat([table["chosen"][rows], table["rejected"][rows]])
        segments = None
        if mb.chosen_segment_ids is not None:
            k = mb.num_segment_slots
            segments = _pad_columns(table["chosen_segments"][rows], k)[:, :k]
        return SeqLogps(seq.to(device), None if segments is None else segments.to(device))


# ------------------------------------------------------------------------------------------------ read / write


def _describe(diff: list[tuple[str, object, object]]) -> str:
    def short(v):
        return "absent" if v is None else (v[:12] + "…" if isinstance(v, str) and len(v) == 64 else v)

    return "; ".join(f"{name}: cache {short(a)}, now {short(b)}" for name, a, b in diff)


def open_cache(cfg: Config, objective: Objective, datasets: dict) -> ReferenceCache:
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
    components = key_components(cfg, objective, datasets)
    if manifest["key"] != cache_key(components):
        theirs = manifest["components"]
        diff = [(k, theirs.get(k), components.get(k)) for k in sorted(theirs.keys() | components.keys())
                if theirs.get(k) != components.get(k)]
        raise CacheError(f"reference cache {path} was computed for other inputs — {_describe(diff)}. Recompute it "
                         "with megatron-po precompute-ref for this config")
    needed = [s for s in CACHED_SPLITS if s in datasets]
    if objective.inputs != "pairs":
        needed = ["train"]  # held-out pairs are scored by the policy only when the objective takes no pairs
    tables = {}
    for split in needed:
        entry = manifest["splits"].get(split)
        if entry is None:
            raise CacheError(f"reference cache {path}: has no {split!r} split; recompute it with this config")
        tables[split] = load_file(str(path / entry["file"]))
    cache = ReferenceCache(path, manifest, tables)
    for split in needed:  # a partial cache fails here, at start-up, not at the step that needs the sample
        cache.rows_of(split, [r.id for r in datasets[split].records])
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
