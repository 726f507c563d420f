"""`megatron-po precompute-ref`: the reference's log-probs of every training (and held-out) sample, written once.

The reference runs forward-only through megatron's schedule in the run's own layout (any TP / PP / DP; DP ranks
share the samples out), exactly as the live reference pass of a training step does, and the last pipeline stage
gathers the per-sample sums over DP; one rank writes them with the manifest (train/ref_cache.py).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_po.config import Config
from megatron_po.kinds import INPUT_KINDS, InputKind, kind_of
from megatron_po.models.family import FamilySpec
from megatron_po.objectives import Objective
from megatron_po.parallel.groups import ParallelGroups
from megatron_po.parallel.reduce import all_gather_cat
from megatron_po.train.data import (build_eval_datasets, build_tokenizer, build_train_dataset, micro_batches,
                                    prepare_data)
from megatron_po.train.models import build_initial_model
from megatron_po.train.ref_cache import CACHED_SPLITS, invalidate, key_components, write_cache
from megatron_po.train.step import Tower, run_logps_pass

logger = logging.getLogger(__name__)

MICRO_BATCHES_PER_PASS = 32
"""Micro-batches collated and run per schedule call (bounds the images held in memory at once)."""


def _split_values(groups: ParallelGroups, model, ds, micro_batch_size: int, kind: InputKind) -> dict[str, torch.Tensor] | None:
    """The split's reference sums in dataset order, on the last stage (None elsewhere).

    DP rank r takes samples [r·n/dp, (r+1)·n/dp) (rounded up; the last rank repeats the final sample to keep
    shapes equal), so the rank-major all-gather is the dataset order and its first n rows are the split.
    """
    n = len(ds)
    per = math.ceil(n / groups.dp_size)
    mine = [min(i, n - 1) for i in range(groups.dp_rank * per, (groups.dp_rank + 1) * per)]
    chunks = [mine[i:i + micro_batch_size] for i in range(0, per, micro_batch_size)]
    tower = Tower("reference", frozen=True)
    values: list[dict[str, torch.Tensor]] = []
    for start in range(0, len(chunks), MICRO_BATCHES_PER_PASS):
        batches = list(micro_batches(ds, chunks[start:start + MICRO_BATCHES_PER_PASS], groups))
        logps = run_logps_pass(groups, model, batches, tower, reference_rows=True)
        if logps is not None:
            values += [kind.cache_values(mb, ref) for mb, ref in zip(batches, logps)]
    if not groups.is_last_stage:
        return None
    out = {}
    for key in values[0]:
        parts = [v[key] for v in values]
        if key == "chosen_segments":  # sentence slots differ per micro-batch and rank: pad to the widest
            k = torch.tensor(max(p.shape[1] for p in parts), device=groups.device)
            dist.all_reduce(k, op=dist.ReduceOp.MAX, group=groups.dp)
            parts = [torch.cat([p, p.new_zeros(p.shape[0], int(k) - p.shape[1])], 1) for p in parts]
        out[key] = all_gather_cat(torch.cat(parts), groups.dp)[:n].cpu()
    return out


def precompute_reference(cfg: Config, objective: Objective, family: FamilySpec, groups: ParallelGroups) -> Path:
    """Computes and writes the cache of `reference.cache_path` for this config, its `objective` (what the
    objective reads decides the rows: pairs, or P2-DPO's reference rows) and `family` (model.family's spec, built
    by the driver); returns its path."""
    if not objective.needs_reference:
        raise ValueError(f"objective {objective.name!r} reads no reference log-probs: there is nothing to precompute")
    if not cfg.reference.cache_path:
        raise ValueError("reference.cache_path: where to write the cache")
    path = Path(cfg.reference.cache_path)
    train_path, tok_path = prepare_data(cfg, objective, family)
    tokenizer = build_tokenizer(cfg, family, tok_path)
    datasets = {"train": build_train_dataset(cfg, family, train_path, tokenizer, objective)}
    if kind_of(objective).evaluates:  # held-out pairs are scored with the objective, hence with the reference
        datasets.update((k, v) for k, v in build_eval_datasets(cfg, family, tokenizer).items()
                        if k in CACHED_SPLITS)
    components = key_components(cfg, objective, family, datasets)
    if dist.get_rank() == 0:
        invalidate(path)
    dist.barrier()

    model = build_initial_model(cfg, family, groups, tokenizer.vocab_size)
    model.requires_grad_(False)
    model.eval()
    splits = {}
    for name, ds in datasets.items():
        values = _split_values(groups, model, ds, cfg.train.micro_batch_size,
                               kind_of(objective) if name == "train" else INPUT_KINDS["pairs"])
        splits[name] = (ds.ids, values)
    writer = groups.is_last_stage and groups.dp_rank == 0 and groups.tp_rank == 0
    if writer:
        write_cache(path, components, splits)
        logger.warning("reference cache %s: %s", path, ", ".join(f"{k} {len(v[0])} samples" for k, v in splits.items()))
    dist.barrier()
    return path
