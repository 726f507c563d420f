"""A deterministic, resumable, DP-aware sampler of preference pairs.

Global batch ``k`` is a pure function of ``(seed, num_samples, global_batch_size, k)``: the ``k``-th window of
``global_batch_size`` indices in the concatenation of per-epoch permutations (``torch.randperm`` seeded with
``seed + epoch``). Each DP rank takes a contiguous slice of it and cuts the slice into micro-batches, so::

    concat over ranks r, micro-batches m of rank r  ==  global batch k

for every ``(dp_size, micro_batch_size)``. Changing the parallel layout, or resuming on another number of
GPUs, therefore trains on exactly the same pairs in the same global steps.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


_ORDER_FIELDS = {
    "seed": "train.seed",
    "num_samples": "the number of training samples (data.num_train, or the kept pairs of data.train_path)",
    "global_batch_size": "train.global_batch_size",
    "drop_last": "drop_last",
}
"""The sampler state that decides the data order, and how a user sets it."""


class PairBatchSampler:
    """Yields this rank's micro-batches of dataset indices, global batch after global batch, forever.

    Args:
        num_samples: pairs in the dataset.
        global_batch_size: pairs per optimizer step, over all DP ranks and micro-batches.
        micro_batch_size: pairs per forward/backward on one rank.
        dp_rank: this rank's index in the data-parallel group.
        dp_size: size of the data-parallel group.
        seed: the epoch-``e`` permutation is seeded with ``seed + e``.
        drop_last: each epoch yields ``num_samples // global_batch_size`` batches and leaves the remainder out
            (a different remainder each epoch). Otherwise the last batch of an epoch is completed with the
            first indices of the same epoch's permutation, so a few pairs appear twice in that epoch.

    ``consumed_samples`` counts pairs in the global batches handed out so far (all ranks). It advances when a
    batch is yielded, so ``state_dict()`` taken after training on batch ``k`` resumes at batch ``k + 1``; a
    consumer that prefetches batches ahead of a checkpoint must save ``step * global_batch_size`` instead.
    """

    def __init__(self, num_samples: int, global_batch_size: int, micro_batch_size: int, dp_rank: int,
                 dp_size: int, seed: int, drop_last: bool = True):
        if num_samples <= 0:
            raise ValueError(f"num_samples must be > 0, got {num_samples}")
        if global_batch_size <= 0 or micro_batch_size <= 0 or dp_size <= 0:
            raise ValueError(f"global_batch_size ({global_batch_size}), micro_batch_size ({micro_batch_size}) "
                             f"and dp_size ({dp_size}) must be > 0")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank ({dp_rank}) must be in [0, dp_size={dp_size})")
        if global_batch_size % (micro_batch_size * dp_size) != 0:
            raise ValueError(f"global_batch_size ({global_batch_size}) must be divisible by "
                             f"micro_batch_size ({micro_batch_size}) * dp_size ({dp_size})")
        if drop_last and num_samples < global_batch_size:
            raise ValueError(f"num_samples ({num_samples}) < global_batch_size ({global_batch_size}) with "
                             f"drop_last=True: not one full global batch per epoch")
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.drop_last = drop_last
        self.consumed_samples = 0
        self._perm_epoch = -1
        self._perm: torch.Tensor | None = None

    @property
    def steps_per_epoch(self) -> int:
        """Global batches per pass over the data."""
        if self.drop_last:
            return self.num_samples // self.global_batch_size
        return -(-self.num_samples // self.global_batch_size)

    @property
    def epoch(self) -> int:
        """Epoch of the next global batch."""
        return self.consumed_samples // self.global_batch_size // self.steps_per_epoch

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._perm = torch.randperm(self.num_samples, generator=generator)
            self._perm_epoch = epoch
        return self._perm

    def global_batch(self, step: int) -> list[int]:
        """All ``global_batch_size`` indices of global step ``step`` (0-based, counted across epochs)."""
        epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
        perm = self._permutation(epoch)
        start = step_in_epoch * self.global_batch_size
        positions = torch.arange(start, start + self.global_batch_size) % self.num_samples
        return perm[positions].tolist()

    def micro_batches(self, step: int) -> list[list[int]]:
        """This rank's micro-batches of global step ``step``: a contiguous slice of :meth:`global_batch`."""
        share = self.global_batch_size // self.dp_size
        mine = self.global_batch(step)[self.dp_rank * share : (self.dp_rank + 1) * share]
        return [mine[i : i + self.micro_batch_size] for i in range(0, share, self.micro_batch_size)]

    def global_batches(self) -> Iterator[list[list[int]]]:
        """From ``consumed_samples`` on, forever: this rank's micro-batches of each global step."""
        while True:
            step = self.consumed_samples // self.global_batch_size
            self.consumed_samples += self.global_batch_size
            yield self.micro_batches(step)

    def __iter__(self) -> Iterator[list[int]]:
        """Micro-batches one after another (the ``batch_sampler`` protocol of ``torch.utils.data.DataLoader``).

        A ``DataLoader`` with workers prefetches, so ``consumed_samples`` runs ahead of training: save the
        trainer's own ``step * global_batch_size`` then.
        """
        for micro_batches in self.global_batches():
            yield from micro_batches

    def state_dict(self) -> dict:
        """What fixes the data order (checked on resume) and how far the run got."""
        return {"consumed_samples": self.consumed_samples, "num_samples": self.num_samples,
                "global_batch_size": self.global_batch_size, "seed": self.seed, "drop_last": self.drop_last}

    def load_state_dict(self, state: dict) -> None:
        """Resumes at ``state["consumed_samples"]``; dp_size and micro_batch_size may differ from the saver's.

        Args:
            state: a :meth:`state_dict` of the run being resumed (the checkpoint's ``trainer_state.json``).

        Raises:
            ValueError: the order would differ from the saved run's (another train.seed, number of kept samples,
                train.global_batch_size or drop_last: the message names each and both values), or
                consumed_samples is not a whole number of global batches.
        """
        # global batch k is a function of (seed, num_samples, global_batch_size, drop_last): resuming with any of
        # them changed would silently train on other pairs than the saved run's steps k+1.. and repeat or skip some
        changed = [f"{what} is {state[key]!r} in the checkpoint but {getattr(self, key)!r} in this run"
                   for key, what in _ORDER_FIELDS.items() if key in state and state[key] != getattr(self, key)]
        if changed:
            raise ValueError("cannot resume: the data order would change: " + "; ".join(changed) +
                             " (resume with the saved run's settings, or start in a new output_dir)")
        consumed = int(state["consumed_samples"])
        if consumed < 0 or consumed % self.global_batch_size != 0:
            raise ValueError(f"consumed_samples ({consumed}) must be a non-negative multiple of "
                             f"global_batch_size ({self.global_batch_size})")
        self.consumed_samples = consumed
