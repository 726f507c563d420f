"""Context parallelism: each CP rank holds part of every row's tokens; per-sequence sums are reduced over CP.

Rows are split as megatron splits them (`megatron.core.utils.get_batch_on_this_cp_rank`): into 2 x cp chunks,
rank r taking chunks r and 2cp-1-r, so that every rank has as much causal attention work as the others. TE's
attention exchanges keys and values between the ranks (GPU only); megatron's rotary embedding takes the full
rows' positions and slices its table the same way. What is ours: the log-prob sums. A rank's per-sequence sum
covers its own tokens only, so it is summed over the CP group before anything per pair (rewards, α̂, sentence
weights, the loss) is computed from it; the sum's backward hands each rank the gradient of the whole sum, and
megatron's DDP adds the ranks' parameter gradients over DP x CP. The pair count that normalises the step is
counted on one CP rank only, since megatron also sums it over DP x CP.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region


def cp_positions(seq_len: int, cp_size: int, cp_rank: int, device=None) -> torch.Tensor:
    """Positions of a row of `seq_len` tokens that CP rank `cp_rank` holds: chunks r and 2cp-1-r of 2cp.

    Raises:
        ValueError: seq_len is not a multiple of 2 x cp_size (the collator pads rows to one).
    """
    if seq_len % (2 * cp_size):
        raise ValueError(f"a row of {seq_len} tokens does not split into 2 x cp = {2 * cp_size} equal chunks")
    chunk = seq_len // (2 * cp_size)
    first, second = cp_rank * chunk, (2 * cp_size - 1 - cp_rank) * chunk
    return torch.cat([torch.arange(first, first + chunk, device=device),
                      torch.arange(second, second + chunk, device=device)])


def reduce_over_cp(partial_sums: torch.Tensor, cp_group) -> torch.Tensor:
    """Sum of every CP rank's partial sums (forward: all-reduce; backward: the gradient as it is, megatron's
    reduce-from-model-parallel mapping), so each rank's tokens get the gradient of the whole sum."""
    if cp_group is None or dist.get_world_size(cp_group) == 1:
        return partial_sums
    return reduce_from_tensor_model_parallel_region(partial_sums, group=cp_group)


def counts_on_one_cp_rank(count, cp_group):
    """`count` (an int or a tensor) on CP rank 0, 0 on the others: megatron sums the loss normaliser over DP x
    CP."""
    return count if cp_group is None or dist.get_rank(cp_group) == 0 else count * 0
