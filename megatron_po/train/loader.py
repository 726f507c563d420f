"""Each rank's micro-batches, made on the host ahead of the step by torch DataLoader workers.

Item ``k`` of :class:`StepBatches` is this rank's micro-batches of optimizer step ``k``: the sampler's global batch
(a pure function of the seed, the kept samples and k), this DP rank's share of it (spread by the index's token
counts when packing), each micro-batch's records read and their images decoded and processed, tokenized,
collated, packed and positioned, and cut to this CP rank's share. Because an item depends on k alone, workers may
make steps in any order and a resume at step k loads exactly what the saved run would have: the batches are the
same with 0 or N workers, inline or prefetched.

Every TP, CP and PP peer of a DP rank makes its own copy rather than receiving one from a peer by broadcast
(megatron's ``broadcast_data``): the copy costs each rank's workers host time off the critical path, while a
broadcast would put one collective per tensor on the training thread every step, and CP ranks keep only their
share of the positions anyway (benchmarks/bench_data.py measures both).
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from typing import Iterator

import torch

from megatron_po.data.packing import balance_over_dp, pack_rows
from megatron_po.train.batch import BatchWork, MicroBatch


@dataclass(frozen=True)
class BatchLayout:
    """How this rank lays out its micro-batches (picklable: it travels to DataLoader workers)."""

    micro_batch_size: int
    packing: bool
    """data.packing: pack each micro-batch's sequences into rows of `max_seq_length`."""
    max_seq_length: int
    pad_to_multiple_of: int
    thd: bool
    """Packed rows as one THD row (the TE spec)."""
    dp_rank: int = 0
    dp_size: int = 1
    cp_rank: int = 0
    cp_size: int = 1


def host_micro_batch(ds, indices: list[int], layout: BatchLayout, pack: bool = False) -> MicroBatch:
    """Dataset samples `indices` as one micro-batch of this rank, on the host: collated, packed when `pack`, this CP
    rank's share. Everything the step needs to know about the rows is computed here, from CPU tensors."""
    batch = ds.collator([ds[i] for i in indices])
    if pack:
        batch = pack_rows(batch, layout.max_seq_length, layout.pad_to_multiple_of, ds.collator.tokenizer.pad_id)
    mb = MicroBatch.from_collated(batch)
    mb.work = BatchWork.of(mb)  # on the whole rows, from host tensors
    mb = mb.cp_shard(layout.cp_size, layout.cp_rank)
    if pack and layout.thd:
        mb = mb.as_thd()  # TE attention isolates the sequences by cu_seqlens in one row (train/rows.thd_params)
    return mb


def host_step_batches(ds, sampler, step: int, layout: BatchLayout) -> list[MicroBatch]:
    """This rank's micro-batches of optimizer step `step`, each with its samples' positions in the global batch.

    Unpacked, a rank takes a contiguous share of the sampler's global batch. With packing the global batch is
    first spread over the DP ranks by the index's token counts (equal sample counts), and each micro-batch's rows
    are packed (data/packing.py). Either way every rank trains on the same global batch: the objective, its
    normalisation by the global pair count and its statistics do not change.
    """
    order = sampler.global_batch(step)
    if layout.packing:
        mine = balance_over_dp([ds.cost(i) for i in order], layout.dp_size)[layout.dp_rank]
    else:
        share = len(order) // layout.dp_size
        mine = list(range(layout.dp_rank * share, (layout.dp_rank + 1) * share))
    out = []
    for start in range(0, len(mine), layout.micro_batch_size):
        positions = mine[start:start + layout.micro_batch_size]
        mb = host_micro_batch(ds, [order[p] for p in positions], layout, pack=layout.packing)
        mb.sample_index = torch.tensor(positions)
        out.append(mb)
    return out


class StepBatches(torch.utils.data.Dataset):
    """Map-style: item `step` is this rank's micro-batches of that optimizer step (on the host)."""

    def __init__(self, ds, sampler, layout: BatchLayout):
        self.ds, self.sampler, self.layout = ds, sampler, layout

    def __getitem__(self, step: int) -> list[MicroBatch]:
        return host_step_batches(self.ds, self.sampler, step, self.layout)


def _as_is(item):
    return item


def _ignore_stop_signals(worker_id: int) -> None:
    # SLURM signals every process of a job step, workers included: the training process alone decides when to stop
    # (train/jobcontrol.py: finish the step, save, exit 75), and closing the loader then ends its workers
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def step_batches(ds, sampler, layout: BatchLayout, device: torch.device, start: int, stop: int,
                 num_workers: int = 0, prefetch_factor: int = 2) -> Iterator[tuple[list[MicroBatch], float]]:
    """``(micro-batches on `device`, seconds the training thread waited for them)`` of steps start..stop-1.

    With `num_workers` > 0, forked workers make up to ``num_workers * prefetch_factor`` steps ahead and a thread
    pins them (on a GPU), so the wait is the hand-over; with 0 the step's batches are made inline (the wait is
    their whole making)."""
    if num_workers > 0:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # HF tokenizers' threads do not survive a fork
    loader = torch.utils.data.DataLoader(
        StepBatches(ds, sampler, layout), batch_size=None, sampler=range(start, stop), collate_fn=_as_is,
        num_workers=num_workers, prefetch_factor=prefetch_factor if num_workers else None,
        persistent_workers=num_workers > 0, pin_memory=device.type == "cuda", worker_init_fn=_ignore_stop_signals,
        # fork: workers inherit the dataset (its tokenizer, the memory-mapped index) instead of unpickling it
        multiprocessing_context="fork" if num_workers else None)
    it = iter(loader)
    for _ in range(start, stop):
        t0 = time.perf_counter()
        batches = [mb.to(device) for mb in next(it)]
        yield batches, time.perf_counter() - t0
