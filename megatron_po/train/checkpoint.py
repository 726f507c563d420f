"""Checkpoints with megatron dist_checkpointing: reshardable across TP layouts, resumable after a crash.

Layout of `output_dir/checkpoints/`:
    iter_0000004/            dist_checkpointing directory (model + optimizer shards)
    iter_0000004/trainer_state.json   step, sampler, scheduler (JSON: nothing is unpickled on resume)
    latest                   name of the last *complete* checkpoint, written atomically after every rank finished
A crash during a save leaves `latest` pointing at the previous complete checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch.distributed as dist
from megatron.core import dist_checkpointing

LATEST = "latest"
STATE_FILE = "trainer_state.json"


def _model_sd(policy, prefix: str = "model."):
    # keys are independent of DDP wrapping (DDP.sharded_state_dict adds a 'module.' prefix load does not strip)
    return policy.sharded_state_dict(prefix=prefix)


def save_checkpoint(root: Path, step: int, policy, optimizer, trainer_state: dict,
                    conversion: Optional[tuple[Path, dict]] = None) -> Path:
    """Saves model + optimizer shards and trainer state; all ranks call it. `conversion` (HF families: the hf/
    directory and the conversion record) makes the checkpoint exportable by itself (tools/convert_hf.py)."""
    path = root / f"iter_{step:07d}"
    if dist.get_rank() == 0:
        path.mkdir(parents=True, exist_ok=True)  # dist_checkpointing requires an existing directory
    dist.barrier()
    model_sd = _model_sd(policy)
    sd = {"model": model_sd, "optimizer": optimizer.sharded_state_dict(model_sd)}
    dist_checkpointing.save(sd, str(path))
    dist.barrier()
    if dist.get_rank() == 0:
        if conversion is not None:
            from megatron_po.convert.core import write_conversion

            write_conversion(path, *conversion)
        (path / STATE_FILE).write_text(json.dumps(trainer_state, indent=1))
        tmp = root / (LATEST + ".tmp")
        tmp.write_text(path.name)
        os.replace(tmp, root / LATEST)  # atomic: `latest` only ever names a complete checkpoint
    dist.barrier()
    return path


def latest_checkpoint(root: Path) -> Optional[Path]:
    f = root / LATEST
    if not f.exists():
        return None
    path = root / f.read_text().strip()
    if not (path / STATE_FILE).exists():
        raise RuntimeError(f"{f} names {path}, which is incomplete (no {STATE_FILE})")
    return path


def load_checkpoint(path: Path, policy, optimizer) -> dict:
    """Restores model + optimizer in place (any TP layout) and returns the trainer state."""
    model_sd = _model_sd(policy)
    sd = {"model": model_sd, "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=True)}
    loaded = dist_checkpointing.load(sd, str(path))
    policy.load_state_dict(_strip(loaded["model"]), strict=True)
    optimizer.load_state_dict(loaded["optimizer"])
    return json.loads((path / STATE_FILE).read_text())


def load_model_weights(path: Path, model) -> None:
    """Loads only the weights of a checkpoint (a previous stage) into `model` (policy or reference)."""
    if not (Path(path) / STATE_FILE).exists() and (Path(path) / LATEST).exists():
        path = latest_checkpoint(Path(path))
    if not Path(path).is_dir():
        raise FileNotFoundError(f"checkpoint.init_from: no checkpoint directory at {path}")
    loaded = dist_checkpointing.load({"model": _model_sd(model)}, str(path))
    model.load_state_dict(_strip(loaded["model"]), strict=True)


def _strip(sd: dict, prefix: str = "model.") -> dict:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}
