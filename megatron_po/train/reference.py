"""Where a step's reference log-probs come from: a frozen reference model, or the precomputed cache.

A live source is a frozen reference model, or under LoRA the policy with its adapters off (no second model).
Either source fills ``MicroBatch.ref_logps`` of every micro-batch of the step before the policy runs (the
reference is an *input* of the policy step): `LiveReference` with one forward-only pass of the reference model
through megatron's schedule (same layout as the policy, no grad), `CachedReference` by looking the samples up by
record id in a cache written by `megatron-po precompute-ref` (train/ref_cache.py) — no reference model exists then.
"""

from __future__ import annotations

import contextlib
from typing import Protocol

from megatron_po.models.lora import adapters_off
from megatron_po.parallel.groups import ParallelGroups
from megatron_po.train.batch import MicroBatch
from megatron_po.train.step import Tower, run_logps_pass


class ReferenceSource(Protocol):
    forwards: int
    """Reference forwards run so far (micro-batches through the reference model; 0 for the cache)."""

    def fill(self, batches: list[MicroBatch], split: str = "train") -> None:
        """Sets ``ref_logps`` of the micro-batches (at least on the last pipeline stage, where the loss is)."""


class LiveReference:
    """The frozen reference model, run forward-only over the step's micro-batches; or, `adapters_off`, the
    policy itself with every LoRA adapter off (its frozen base), through the same schedule in the same step."""

    def __init__(self, model, groups: ParallelGroups, tower: Tower, adapters_off: bool = False):
        self.model = model
        self.groups = groups
        self.tower = tower
        self.adapters_off = adapters_off
        self.forwards = 0

    def fill(self, batches: list[MicroBatch], split: str = "train") -> None:
        with adapters_off(self.model) if self.adapters_off else contextlib.nullcontext():
            logps = run_logps_pass(self.groups, self.model, batches, self.tower, reference_rows=True)
        self.forwards += len(batches)
        if logps is not None:
            for mb, ref in zip(batches, logps):
                mb.ref_logps = ref


class CachedReference:
    """Reference log-probs read from a checked cache (train/ref_cache.ReferenceCache), by sample id."""

    def __init__(self, cache, device):
        self.cache = cache
        self.device = device
        self.forwards = 0

    def fill(self, batches: list[MicroBatch], split: str = "train") -> None:
        for mb in batches:
            mb.ref_logps = self.cache.lookup(split, mb, self.device)
