"""Digests of data, tokenizer and checkpoint files, shared out over ranks: what the prepared index and the
reference cache key on."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch.distributed as dist

_CHUNK = 8 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_digests(paths: list[Path], digest=sha256_file) -> dict[str, str]:
    """`digest` (sha256) of each file, the files shared out over all ranks (each reads 1/world of the bytes)."""
    paths = sorted({str(p) for p in paths})
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    mine = {p: digest(Path(p)) for p in paths[rank::world]}
    if world == 1:
        return mine
    parts = [None] * world
    dist.all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in part.items()}


def relative_name(path: Path, root: Path) -> str:
    """`path` named relative to `root` (so a moved data directory keeps its digests)."""
    path, root = Path(path), Path(root)
    return os.path.relpath(path, root) if path.is_absolute() == root.is_absolute() else str(path)


def combined(entries: dict[str, str]) -> str:
    """One digest over name -> value entries (order-independent)."""
    h = hashlib.sha256()
    for name in sorted(entries):
        h.update(f"{name}\0{entries[name]}\n".encode())
    return h.hexdigest()


def sampled_digest(path: Path, span: int = 1 << 20) -> str:
    """sha256 of a file's first and last `span` bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(span))
        size = f.seek(0, os.SEEK_END)
        f.seek(max(span, size - span))
        h.update(f.read(span))
    return h.hexdigest()


def directory_key(root: Path) -> str:
    """One digest over a checkpoint directory's files: their names, sizes and sampled digests (a 72B checkpoint is
    named in a second, not read whole; any other weights differ in their first and last MiB). Collective under
    torch.distributed: the files are shared out over the ranks, as `file_digests` shares them."""
    files = sorted(p for p in Path(root).rglob("*") if p.is_file())
    sampled = file_digests(files, digest=sampled_digest)
    return combined({str(p.relative_to(root)): f"{p.stat().st_size}:{sampled[str(p)]}" for p in files})

