"""Checkpoints with megatron dist_checkpointing: reshardable across TP layouts, resumable after a crash.

Layout of `output_dir/checkpoints/`:
    iter_0000004/            dist_checkpointing directory (model + optimizer shards)
    iter_0000004/trainer_state.json   step, sampler, scheduler (JSON: nothing is unpickled on resume)
    latest                   name of the last *complete* checkpoint, written atomically after every rank finished
A crash during a save, or before `latest` moves, leaves `latest` pointing at the previous complete checkpoint.

`Checkpointer` writes them synchronously, or in the background with megatron's asynchronous dist_checkpointing
(`checkpoint.async_save`): training goes on while the shards are written, and `latest` moves only in the finalize
step that megatron runs once every rank's shards are on disk. `checkpoint.keep_last` prunes older ones.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from functools import partial
from pathlib import Path
from typing import Optional

import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from megatron.core.dist_checkpointing.validation import StrictHandling

from megatron_po.config import CheckpointConfig
from megatron_po.models.lora import has_adapters, is_adapter_param

LATEST = "latest"
STATE_FILE = "trainer_state.json"
BASE = "lora_base"
"""trainer_state.json's entry of a LoRA run: the base the adapters belong to ({"init_from", "key"}, see
train/models.base_identity) and the adapters' settings; a resume refuses another base."""
EXTRA_STATE = "_extra_state"
"""Suffix of Transformer-Engine modules' extra state (FP8 scaling metadata), which a checkpoint written with the
local spec (the converter's) does not hold."""
logger = logging.getLogger(__name__)


def _model_sd(policy, prefix: str = "model."):
    # keys are independent of DDP wrapping (DDP.sharded_state_dict adds a 'module.' prefix load does not strip)
    sd = policy.sharded_state_dict(prefix=prefix)
    if has_adapters(policy):  # LoRA: the frozen base is not saved; trainer_state.json names it (BASE)
        sd = {k: v for k, v in sd.items() if is_adapter_param(k)}
    return sd


class Checkpointer:
    """Saves training checkpoints under `root`, synchronously or asynchronously, and prunes old ones.

    All ranks call every method (each is collective). `poll` once per step lets finished background saves move
    `latest`; `close` waits for the pending one (or abandons it after an error, leaving `latest` where it was).
    """

    def __init__(self, root: Path, cfg: CheckpointConfig):
        self.root = Path(root)
        self.keep_last = cfg.keep_last
        self.queue = AsyncCallsQueue() if cfg.async_save else None

    def save(self, step: int, policy, optimizer, trainer_state: dict,
             conversion: Optional[tuple[Path, dict]] = None) -> Path:
        """Model + optimizer shards and trainer state of `step`. `conversion` (HF families: the hf/ directory and
        the conversion record) makes the checkpoint exportable by itself (tools/convert_hf.py)."""
        path = self.root / f"iter_{step:07d}"
        if self.queue is not None:
            # one save in flight at a time: the previous one must have moved `latest` before this one may
            self.queue.maybe_finalize_async_calls(blocking=True)
        if dist.get_rank() == 0:
            path.mkdir(parents=True, exist_ok=True)  # dist_checkpointing requires an existing directory
        dist.barrier()
        model_sd = _model_sd(policy)
        sd = {"model": model_sd, "optimizer": optimizer.sharded_state_dict(model_sd)}
        publish = partial(self._publish, path, trainer_state, conversion)
        if self.queue is None:
            dist_checkpointing.save(sd, str(path))
            dist.barrier()
            publish()
            dist.barrier()
        else:
            # the shards are copied to host memory here; a background process writes them, and megatron runs the
            # finalize functions (its metadata, then `publish`) on every rank once all ranks' writes are done
            request = dist_checkpointing.save(sd, str(path), async_sharded_save=True)
            request.add_finalize_fn(publish)
            self.queue.schedule_async_request(request)
        return path

    def poll(self) -> None:
        """Finalizes the background saves that every rank has finished (a no-op for synchronous saves)."""
        if self.queue is not None:
            self.queue.maybe_finalize_async_calls(blocking=False)

    def close(self, abort: bool = False) -> None:
        """Waits for a pending background save (`abort`: gives it up; `latest` keeps naming the previous one)."""
        if self.queue is not None:
            self.queue.close(abort=abort)
            self.queue = None

    def _publish(self, path: Path, trainer_state: dict, conversion: Optional[tuple[Path, dict]]) -> None:
        """After every rank's shards are written: trainer state, then `latest` (rank 0), then pruning."""
        if dist.get_rank() != 0:
            return
        if conversion is not None:
            from megatron_po.convert.core import write_conversion

            write_conversion(path, *conversion)
        (path / STATE_FILE).write_text(json.dumps(trainer_state, indent=1))
        publish_latest(self.root, path)
        if self.keep_last:
            prune(self.root, self.keep_last)


def publish_latest(root: Path, path: Path) -> None:
    """Points `latest` at `path`, atomically: `latest` only ever names a complete checkpoint."""
    tmp = root / (LATEST + ".tmp")
    tmp.write_text(path.name)
    os.replace(tmp, root / LATEST)


def _step_of(path: Path) -> int:
    return int(path.name.removeprefix("iter_"))


def prune(root: Path, keep_last: int) -> list[Path]:
    """Deletes the checkpoints older than the `keep_last` newest complete ones up to `latest` (and incomplete ones
    older than `latest`); checkpoints newer than `latest` are unfinished saves and are left alone. Returns what
    was deleted."""
    latest = latest_checkpoint(root)
    if latest is None:
        return []
    older = sorted((p for p in root.glob("iter_*") if p.is_dir() and _step_of(p) <= _step_of(latest)),
                   key=_step_of, reverse=True)
    complete = [p for p in older if (p / STATE_FILE).exists()]
    keep = set(complete[:keep_last]) | {latest}
    gone = [p for p in older if p not in keep]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


def resolve_checkpoint(path: Path) -> Path:
    """`path` itself when it is one checkpoint; its `latest` when it is a run's checkpoints root."""
    path = Path(path)
    if not (path / STATE_FILE).exists() and (path / LATEST).exists():
        return latest_checkpoint(path)
    return path


def latest_checkpoint(root: Path) -> Optional[Path]:
    f = root / LATEST
    if not f.exists():
        return None
    path = root / f.read_text().strip()
    if not (path / STATE_FILE).exists():
        raise RuntimeError(f"{f} names {path}, which is incomplete (no {STATE_FILE})")
    return path


def load_checkpoint(path: Path, policy, optimizer, lora_base: Optional[dict] = None) -> dict:
    """Restores model + optimizer in place (any TP layout) and returns the trainer state.

    Under LoRA (`lora_base`: this run's base and adapter settings) only the adapters and their optimizer state are
    read; the policy already holds its base. A checkpoint of another base, other adapters, or of a run with or
    without LoRA where this one differs is refused before anything is read, naming both.
    """
    state = json.loads((path / STATE_FILE).read_text())
    check_lora_base(path, state.get(BASE), lora_base)
    model_sd = _model_sd(policy)
    sd = {"model": model_sd, "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=True)}
    loaded = dist_checkpointing.load(sd, str(path))
    _restore(path, policy, loaded["model"], adapters_only=lora_base is not None)
    optimizer.load_state_dict(loaded["optimizer"])
    return state


def check_lora_base(path: Path, saved: Optional[dict], current: Optional[dict]) -> None:
    """Raises ValueError unless the checkpoint's LoRA base and adapter settings are this run's (both None: no LoRA)."""
    if saved == current:
        return
    if saved is None or current is None:
        has, lacks = ("holds LoRA adapters", "this run has none (model.lora.rank=0)") if current is None else (
            "holds full weights, no LoRA adapters", "this run trains adapters")
        raise ValueError(f"cannot resume from {path}: it {has}; {lacks}")
    for what in ("init_from", "key", "adapters"):
        if saved.get(what) != current.get(what):
            raise ValueError(f"cannot resume from {path}: its adapters were trained on base "
                             f"{saved.get('init_from') or '(random init)'} [{what}: {saved.get(what)}], this run's "
                             f"base is {current.get('init_from') or '(random init)'} [{what}: {current.get(what)}]")


def load_model_weights(path: Path, model) -> None:
    """Loads only the weights of a checkpoint (a previous stage, or a converted HF model) into `model` (policy or
    reference), whichever layer spec wrote it and reads it.

    The local and the Transformer-Engine specs name every weight alike (megatron's local spec maps its norms onto
    TE's fused names), but TE modules also carry `_extra_state` (FP8 scaling metadata) that a local-spec
    checkpoint, such as every converted one, lacks. Those entries, and only those, may be absent: the module keeps
    its fresh extra state (a bf16 run has no FP8 history to restore). Any other missing tensor is an error.
    """
    path = resolve_checkpoint(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint.init_from: no checkpoint directory at {path}")
    if lora_base_of(path) is not None:
        raise ValueError(f"{path} holds LoRA adapters only, not the model's weights (train/models.build_initial_model "
                         "builds its base and adds them)")
    # megatron's "unexpected" keys are those requested but absent from the checkpoint
    loaded, _, absent = dist_checkpointing.load({"model": _model_sd(model)}, str(path),
                                                strict=StrictHandling.RETURN_UNEXPECTED)
    not_extra = sorted(k for k in absent if EXTRA_STATE not in k)
    if not_extra:
        raise RuntimeError(f"checkpoint {path} lacks {len(not_extra)} tensor(s) of the model, e.g. {not_extra[:3]}")
    state = _strip(loaded["model"])
    own = model.state_dict()
    for name in own.keys() - state.keys():
        if name.endswith(EXTRA_STATE):
            state[name] = own[name]
    model.load_state_dict(state, strict=True)


def lora_base_of(path: Path) -> Optional[dict]:
    """The BASE entry of a LoRA run's checkpoint at `path` (or the latest under a run's checkpoints root); None for
    any other checkpoint (a full run's, a converted one)."""
    state = resolve_checkpoint(path) / STATE_FILE
    return json.loads(state.read_text()).get(BASE) if state.is_file() else None


def load_adapters(path: Path, model) -> None:
    """The adapters of a LoRA run's checkpoint into `model` (which holds its base and the same adapters)."""
    path = resolve_checkpoint(path)
    loaded = dist_checkpointing.load({"model": _model_sd(model)}, str(path))
    _restore(path, model, loaded["model"], adapters_only=True)


def _restore(path: Path, model, loaded: dict, adapters_only: bool) -> None:
    """Loaded tensors into `model`: all of them, or (LoRA) every adapter and nothing else."""
    missing, unexpected = model.load_state_dict(_strip(loaded), strict=not adapters_only)
    if adapters_only and (unexpected or any(is_adapter_param(k) for k in missing)):
        raise RuntimeError(f"{path}: adapters do not match the model: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")


def _strip(sd: dict, prefix: str = "model.") -> dict:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}
