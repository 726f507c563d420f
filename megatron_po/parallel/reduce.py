"""The one place where batch statistics cross ranks.

Objectives and metrics never call ``torch.distributed`` themselves: they pass the group they were given
(the data-parallel group, never the full world: TP/CP/SP ranks hold the same pairs, OBJECTIVES.md §0.2) to these
helpers. ``group=None`` means "no peers": the helpers then work in a single process without
``init_process_group``. Neither helper is differentiable; both are for detached statistics (§0.3, §11).
"""

from typing import Optional

import torch
import torch.distributed as dist

_MAX_DIMS = 8  # shape slots exchanged by all_gather_cat's size check


def _world(group: Optional[dist.ProcessGroup]) -> int:
    return 1 if group is None else dist.get_world_size(group)


def all_reduce_sum(t: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Sum of ``t`` over the ranks of ``group`` (no autograd).

    Args:
        t: any tensor; it is detached and left untouched (the reduction runs on a copy).
        group: the group to reduce over; ``None`` or a size-1 group returns a copy of ``t``.

    Returns:
        A new tensor with ``t``'s shape, dtype and device holding the element-wise sum over ranks.
    """
    out = t.detach().clone()
    if _world(group) > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


def all_gather_cat(t: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Concatenation along dim 0 of ``t`` from every rank of ``group``, in rank order (no autograd).

    Every rank must hold the same shape. That is checked with one small all-gather of the shapes first, because
    mismatched sizes would otherwise hang NCCL or silently misplace data; all ranks see the same shapes, so all
    of them raise together instead of deadlocking.

    Args:
        t: ``[n, ...]`` tensor, same shape on every rank.
        group: the group to gather over; ``None`` or a size-1 group returns ``t`` itself.

    Returns:
        ``[world * n, ...]`` tensor; rank r's rows are ``[r * n, (r + 1) * n)``.

    Raises:
        ValueError: the ranks hold tensors of different shapes.
    """
    world = _world(group)
    if world == 1:
        return t
    if not 1 <= t.dim() <= _MAX_DIMS:
        raise ValueError(f"all_gather_cat needs 1 to {_MAX_DIMS} dims, got shape {tuple(t.shape)}")
    t = t.detach().contiguous()
    shape = torch.full((_MAX_DIMS + 1,), -1, dtype=torch.int64, device=t.device)
    shape[0] = t.dim()
    shape[1 : 1 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
    shapes = [torch.empty_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape, group=group)
    shapes = [tuple(s[1 : 1 + s[0]].tolist()) for s in torch.stack(shapes).cpu()]
    if len(set(shapes)) != 1:
        raise ValueError(
            f"all_gather_cat needs equal shapes on every rank, got {shapes} (rank order); "
            "pad to a common size or gather the sizes first"
        )
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t, group=group)
    return torch.cat(parts, dim=0)


def broadcast_from_last_stage(obj, pp_group: Optional[dist.ProcessGroup]):
    """``obj`` of the last pipeline stage on every stage of ``pp_group`` (picklable Python values: metrics, the
    objective's state), for what only the last stage computes but every stage needs (rank 0 logs and saves).

    Returns ``obj`` itself without pipeline parallelism; the value given on the other stages is ignored.
    """
    world = _world(pp_group)
    if world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=dist.get_global_rank(pp_group, world - 1), group=pp_group)
    return box[0]
