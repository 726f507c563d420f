"""The prepared index of a split: where every record lives, its id, token counts and skip reason, checked once.

Preparing (`megatron-po prepare-data`, or the first launch that finds no valid index, all ranks sharing the work)
reads every record of a split once, in ``workers`` processes per rank: it parses the record, tokenizes it to
decide whether it fits and how many tokens each of its rows takes, and decodes every image of a kept sample, so
bad input is refused before the first step with the messages of data/records.py. It writes ``<dir>/``:

    units_<field>.npy   where each record lives (data/sources.Units): file, byte offset or row, bytes, line, copy
    ids.npy             each record's id, UTF-8 in fixed width
    reason.npy          int8: 0 kept, else 1 + the index of its skip reason in SKIP_REASONS
    rows.npy            int32 [N, R]: tokens of each of the sample's R rows (0: the row is absent)
    image_tokens.npy    int32 [N]: decoder tokens of its images
    image_files.npy     the distinct image files the kept records read, relative to the data root (for the key)
    manifest.json       the data files, the key's components, the counts; written last and atomically: a
                        directory without it is an interrupted preparation

A training run loads it memory-mapped (no record is read, tokenized or decoded before step 1): a rank holds
the pages it touches, 37 bytes a record plus the id. Nothing is pickled: numpy arrays (``allow_pickle=False``)
and JSON.

The key covers the data files' bytes (sha256, shared over ranks), the tokenizer / processor files' bytes, and
the settings that change tokens; of the images it takes path, size and modification time (each launch stats them
again, shared over ranks: no image is read; an image rewritten with its old size and mtime goes unnoticed).
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import signal
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import numpy as np
import torch.distributed as dist

from megatron_po.data.collate import SKIP_REASONS
from megatron_po.data.digests import combined, file_digests, relative_name
from megatron_po.data.records import EmbeddedImage, RecordError
from megatron_po.data.sources import DataFile, RecordReader, Units, check_unique_ids, scan

logger = logging.getLogger(__name__)

FORMAT = 1
"""Bump when what an index records (or how a record's rows are counted) changes."""
MANIFEST = "manifest.json"
IMAGES = "images"
"""The key component recorded at preparation (path, size, mtime of every image file) and not recomputed."""
_CHUNK = 256
"""Records per task handed to a worker (small enough to balance, large enough to amortise the hand-off)."""


class IndexRefused(ValueError):
    """No usable index (data.index=require), or one that is stale; the message names what changed."""


@dataclass(frozen=True)
class Examined:
    """What preparing learns of one record."""

    reason: str
    """"" (kept) or one of SKIP_REASONS."""
    rows: tuple[int, ...]
    """Tokens of each of its rows (the input kind's rows per sample, 0 where a row is absent)."""
    image_tokens: int
    images: tuple = ()
    """The image files it reads (embedded images are bytes of the data files)."""


class SampleRules(Protocol):
    """An input kind's rules for one split (data/dataset.py): what a record's rows are and how to check it."""

    rows_per_sample: int

    def examine(self, record) -> Examined:
        """Decides whether `record` fits and counts its tokens; a kept record's images are decoded (raises
        RecordError / FileNotFoundError naming the record or image)."""


@dataclass
class SampleIndex:
    """A split's records as preparation found them (arrays memory-mapped when loaded from disk)."""

    files: list[DataFile]
    units: Units
    ids: np.ndarray
    reason: np.ndarray
    rows: np.ndarray
    image_tokens: np.ndarray
    components: dict[str, str] = field(default_factory=dict)
    image_files: np.ndarray = field(default_factory=lambda: np.array([], dtype="S1"))
    """The distinct image files the kept records read, relative to the data root (UTF-8)."""

    def __len__(self) -> int:
        return len(self.reason)

    @cached_property
    def kept(self) -> np.ndarray:
        """Units of the samples that fit, in order (int64)."""
        return np.flatnonzero(np.asarray(self.reason) == 0)

    @cached_property
    def costs(self) -> np.ndarray:
        """Tokens of each kept sample's rows (what packing balances and fills rows with), int64."""
        return np.asarray(self.rows)[self.kept].sum(axis=1, dtype=np.int64)

    def skipped(self) -> dict[str, int]:
        counts = np.bincount(np.asarray(self.reason), minlength=len(SKIP_REASONS) + 1)
        return {r: int(counts[i + 1]) for i, r in enumerate(SKIP_REASONS)}

    def id_of(self, u: int) -> str:
        return bytes(self.ids[u]).decode("utf-8")

    @property
    def data_key(self) -> str:
        """One digest over the data files and images (what the reference cache keys its data on)."""
        return combined({k: v for k, v in self.components.items() if k.startswith(("data file", IMAGES))})

    def save(self, path: Path) -> None:
        """Writes the arrays, then the manifest (atomically). One rank calls it."""
        path.mkdir(parents=True, exist_ok=True)
        (path / MANIFEST).unlink(missing_ok=True)
        arrays = {f"units_{k}": getattr(self.units, k) for k in Units._fields}
        arrays.update(ids=self.ids, reason=self.reason, rows=self.rows, image_tokens=self.image_tokens,
                      image_files=self.image_files)
        for name, a in arrays.items():
            np.save(path / f"{name}.npy", np.ascontiguousarray(a), allow_pickle=False)
        manifest = {"format": FORMAT, "files": [vars(f) for f in self.files], "components": self.components,
                    "records": len(self), "kept": int(len(self.kept)), "skipped": self.skipped()}
        tmp = path / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, path / MANIFEST)

    @staticmethod
    def read_manifest(path: Path) -> Optional[dict]:
        """The manifest of a complete index of this format at `path`, else None."""
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return manifest if manifest.get("format") == FORMAT else None

    @classmethod
    def load(cls, path: Path, manifest: dict) -> "SampleIndex":
        def arr(name):
            return np.load(path / f"{name}.npy", mmap_mode="r", allow_pickle=False)

        return cls([DataFile(**f) for f in manifest["files"]], Units(*(arr(f"units_{k}") for k in Units._fields)),
                   arr("ids"), arr("reason"), arr("rows"), arr("image_tokens"), manifest["components"],
                   arr("image_files"))


# ------------------------------------------------------------------------------------------------ the key


def key_components(files: list[DataFile], hashed: list[Path], root: Path, tokenizer_files: list[Path],
                   settings: dict[str, Any]) -> dict[str, str]:
    """Everything an index's content follows from, except the images (recorded at preparation): the data files'
    and tokenizer files' bytes (shared over ranks) and the settings that change tokens."""
    digests = file_digests([*hashed, *tokenizer_files])
    out = {f"data file {relative_name(p, root)}": digests[str(p)] for p in hashed}
    out.update({f"tokenizer/processor file {Path(p).name}": digests[str(p)] for p in tokenizer_files})
    out.update({f"setting {k}": json.dumps(v) for k, v in sorted(settings.items())})
    out["setting data files"] = json.dumps([vars(f) | {"path": relative_name(f.path, root)} for f in files])
    return out


_STAT_CHUNK = 4096
"""Image files per digest chunk: the images' digest does not depend on how many ranks stat them."""


def images_component(files, root: Path) -> dict[str, str]:
    """The key component of the image files (relative to `root`): path, size and mtime of each, stat'ed in chunks
    shared out over all ranks (collective when torch.distributed is initialised). A missing file counts as size -1
    (the index is then stale, and preparing it names the file)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    chunks = range(0, len(files), _STAT_CHUNK)
    mine = {}
    for c in list(chunks)[rank::world]:
        h = hashlib.sha256()
        for name in files[c:c + _STAT_CHUNK]:
            name = name.decode("utf-8") if isinstance(name, bytes) else name  # the index's array: decoded here
            try:
                st = os.stat(root / name)
                h.update(f"{name}\0{st.st_size} {st.st_mtime_ns}\n".encode())
            except FileNotFoundError:
                h.update(f"{name}\0-1\n".encode())
        mine[c] = h.hexdigest()
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, mine)
        mine = {k: v for p in parts for k, v in p.items()}
    digest = hashlib.sha256("".join(mine[c] for c in chunks).encode()).hexdigest()
    return {f"{IMAGES} ({len(files)} files: path, size, mtime)": digest}


def changes(before: dict[str, str], now: dict[str, str]) -> list[str]:
    """What differs between an index's components and this run's."""
    def short(v):
        return "absent" if v is None else (v[:12] + "…" if isinstance(v, str) and len(v) == 64 else v)

    names = sorted(before.keys() | now.keys())
    return [f"{k}: index {short(before.get(k))}, now {short(now.get(k))}" for k in names if before.get(k) != now.get(k)]


# ------------------------------------------------------------------------------------------------ preparing

_WORK: Optional[tuple] = None
"""(rules, reader, units) of the preparation in progress: set before the worker processes fork."""


@dataclass
class _Part:
    lo: int
    ids: list = field(default_factory=list)
    reason: list = field(default_factory=list)
    rows: list = field(default_factory=list)
    image_tokens: list = field(default_factory=list)
    images: set = field(default_factory=set)
    """The image files its kept records read."""
    error: Optional[BaseException] = None


def _examine(bounds: tuple[int, int]) -> _Part:
    rules, reader, units = _WORK
    part = _Part(bounds[0])
    codes = {r: i + 1 for i, r in enumerate(SKIP_REASONS)}
    try:
        for u in range(*bounds):
            record = reader.read(units, u)
            ex = rules.examine(record)
            part.ids.append(record.id)
            part.reason.append(codes.get(ex.reason, 0))
            part.rows.append(ex.rows)
            part.image_tokens.append(ex.image_tokens)
            if not ex.reason:
                part.images.update(str(p) for p in ex.images if not isinstance(p, EmbeddedImage))
    except (RecordError, FileNotFoundError, ValueError, OSError) as e:  # reported in record order, on every rank
        part.error = e
    # arrays, not lists of Python ints, travel back to the parent (a million records' lists would be ~450 MB)
    part.reason = np.array(part.reason, dtype=np.int8)
    part.rows = np.array(part.rows, dtype=np.int32).reshape(len(part.reason), rules.rows_per_sample)
    part.image_tokens = np.array(part.image_tokens, dtype=np.int32)
    return part


def _default_signals() -> None:
    # a worker forked from the trainer inherits its stop handlers (train/jobcontrol.py), which only set a flag: the
    # pool's terminate() (SIGTERM) would then never end it, and the trainer would wait for it forever
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _examine_share(rules: SampleRules, reader: RecordReader, units: Units, lo: int, hi: int,
                   workers: int) -> list[_Part]:
    """This rank's records [lo, hi) examined by `workers` processes (forked: the rules' tokenizer is inherited)."""
    global _WORK
    bounds = [(a, min(a + _CHUNK, hi)) for a in range(lo, hi, _CHUNK)]
    _WORK = (rules, reader, units)
    try:
        if workers <= 1 or len(bounds) <= 1:
            return [_examine(b) for b in bounds]
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # HF tokenizers' threads do not survive a fork
        pool = multiprocessing.get_context("fork").Pool(workers, initializer=_default_signals)
        try:
            parts = pool.map(_examine, bounds, chunksize=1)
            pool.close()  # every worker takes its sentinel and exits
            return parts
        finally:
            pool.terminate()
            pool.join()
    finally:
        _WORK = None


def prepare_index(rules: SampleRules, files: list[DataFile], components: dict[str, str], root: Path,
                  workers: int = 1) -> SampleIndex:
    """Examines every record of `files` (collective over all ranks when torch.distributed is initialised: rank r
    takes the r-th 1/world of the records); every rank returns the whole index.

    Raises:
        RecordError, FileNotFoundError: the first bad record or image in the split's order (on every rank).
    """
    t0 = time.perf_counter()
    units = scan(files)
    reader = RecordReader(files)
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    n = len(units)
    parts = _examine_share(rules, reader, units, rank * n // world, (rank + 1) * n // world, workers)
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, parts)
        parts = [p for share in gathered for p in share]
    for p in parts:
        if p.error is not None:
            raise p.error
    ids = [sid for p in parts for sid in p.ids]
    check_unique_ids(ids, reader, units)
    images = sorted({relative_name(k, root) for p in parts for k in p.images})
    components = {**components, **images_component(images, root)}
    encoded = [sid.encode("utf-8") for sid in ids]
    image_files = [name.encode("utf-8") for name in images]
    index = SampleIndex(
        files, units, np.array(encoded, dtype=f"S{max(1, max(map(len, encoded)))}"),
        np.concatenate([np.zeros(0, np.int8), *(p.reason for p in parts)]),
        np.concatenate([np.zeros((0, rules.rows_per_sample), np.int32), *(p.rows for p in parts)]),
        np.concatenate([np.zeros(0, np.int32), *(p.image_tokens for p in parts)]), components,
        np.array(image_files, dtype=f"S{max([1, *map(len, image_files)])}"))
    if rank == 0:
        dt = time.perf_counter() - t0
        logger.warning("prepared the index of %s: %d records in %.1f s (%.0f records/s, %d rank(s) x %d worker(s)); "
                       "kept %d, skipped %s", files[0].path, n, dt, n / max(dt, 1e-9), world, max(1, workers),
                       len(index.kept), index.skipped())
    return index


def open_index(path: Path, rules: SampleRules, files: list[DataFile], components: dict[str, str], root: Path,
               mode: str = "auto", workers: int = 1, log: Callable[[str], None] = logger.warning,
               force: bool = False) -> SampleIndex:
    """The split's index at `path`: loaded when its key matches `components`; else prepared (all ranks sharing the
    work) and saved by rank 0, or with ``mode="require"`` refused, naming what changed. `force`: prepared again
    whatever is there (prepare-data, the dry run's data check: every record read, every image decoded).
    Collective."""
    manifest = None if force else SampleIndex.read_manifest(path)
    if force:
        what = f"preparing the index {path}"
    elif manifest is not None:
        index = SampleIndex.load(path, manifest)
        diff = changes(manifest["components"], {**components, **images_component(index.image_files, root)})
        if not diff:
            return index
        what = f"index {path} is stale — " + "; ".join(diff)
    else:
        what = f"no prepared index at {path}"
    if mode == "require" and not force:
        raise IndexRefused(f"{what} (data.index=require): run megatron-po prepare-data with this config")
    if not force:
        log(f"{what}: preparing it now")
    index = prepare_index(rules, files, components, root, workers)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        index.save(path)
    if dist.is_initialized():
        dist.barrier()  # the index exists before any rank goes on (a later stage may read it)
    return index
