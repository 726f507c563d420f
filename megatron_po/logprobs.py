"""Token log-probabilities from vocab-sharded logits, without gathering the vocabulary.

Each TP rank holds logits for a contiguous slice of the vocabulary. The log-softmax needs only two scalars per
position from the other ranks (max and sum of exp) and the target logit from the rank that owns it: three small
all-reduces over the TP group instead of an all-gather of [b, s, v].
"""

from __future__ import annotations

import torch
import torch.distributed as dist

IGNORE_INDEX = -100


class _VocabParallelLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, group) -> torch.Tensor:
        v_local = logits.shape[-1]
        rank = dist.get_rank(group) if group is not None else 0
        start = rank * v_local
        logits_max = logits.max(dim=-1).values
        if group is not None:
            dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - logits_max.unsqueeze(-1)
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        in_range = (target >= start) & (target < start + v_local)
        local_target = (target - start).clamp(0, v_local - 1)
        picked = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1) * in_range
        if group is not None:
            # one collective for both partial sums
            both = torch.stack([sum_exp, picked])
            dist.all_reduce(both, group=group)
            sum_exp, picked = both[0], both[1]
        exp.div_(sum_exp.unsqueeze(-1))  # now the local softmax slice, kept for backward
        ctx.save_for_backward(exp, local_target, in_range)
        return picked - sum_exp.log()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        softmax, local_target, in_range = ctx.saved_tensors
        # d logp(t) / d logit_j = 1[j == t] - softmax_j ; each rank owns its vocabulary slice of this gradient
        grad_logits = softmax.mul_(-grad.unsqueeze(-1))
        grad_logits.scatter_add_(-1, local_target.unsqueeze(-1), (grad * in_range).unsqueeze(-1))
        return grad_logits, None, None


def vocab_parallel_token_logps(
    logits: torch.Tensor, labels: torch.Tensor, tp_group, vocab_size: int | None = None
) -> torch.Tensor:
    """Per-token log-probs of `labels` under vocab-sharded `logits`.

    Args:
        logits: [b, s, v/tp] logits of this TP rank's vocabulary slice (any float dtype; computed in fp32).
        labels: [b, s] target ids, IGNORE_INDEX where not supervised.
        tp_group: the tensor-parallel group that shards the vocabulary (None or size 1: no communication).
        vocab_size: the real vocabulary; entries of the padded embedding beyond it are excluded from the softmax
            (a converted HF model's log-probs then equal transformers' exactly). None: all entries count.
    Returns:
        per_token_logps [b, s] fp32, 0 at ignored positions.
    """
    group = tp_group if tp_group is not None and dist.get_world_size(tp_group) > 1 else None
    mask = labels != IGNORE_INDEX
    target = labels.masked_fill(~mask, 0)
    logits = logits.float()
    if vocab_size is not None:
        v_local = logits.shape[-1]
        start = (dist.get_rank(group) if group is not None else 0) * v_local
        ids = torch.arange(start, start + v_local, device=logits.device)
        if bool((ids >= vocab_size).any()):
            logits = logits.masked_fill(ids >= vocab_size, float("-inf"))
    per_token = _VocabParallelLogProb.apply(logits, target, group)
    return per_token * mask


def segment_sums(per_token: torch.Tensor, segment_ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Sums of per-token values over segments (e.g. the sentences of a response, ASPO).

    Args:
        per_token: [b, s] values (log-probs already masked to response tokens), any float dtype.
        segment_ids: [b, s] segment index of each position, -1 where the position belongs to none.
        num_segments: K, the number of segment slots (max over the batch).
    Returns:
        [b, K] sums; differentiable w.r.t. `per_token`. Segments absent from a row sum to 0.
    """
    valid = segment_ids >= 0
    idx = segment_ids.clamp_min(0)
    out = torch.zeros(per_token.shape[0], max(num_segments, 1), dtype=per_token.dtype, device=per_token.device)
    return out.scatter_add(1, idx, per_token * valid)
