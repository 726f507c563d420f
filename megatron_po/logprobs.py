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


# ---------------------------------------------------------------------------------------------- fused, chunked


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, start: int, vocab_size: int | None) -> torch.Tensor:
    """fp32 logits [c, v/tp] of one chunk of tokens (a fresh buffer the caller may overwrite), padded vocabulary
    entries at -inf."""
    logits = torch.matmul(hidden, weight.t()).float()
    if vocab_size is not None and start + logits.shape[-1] > vocab_size:
        logits[:, max(vocab_size - start, 0):] = float("-inf")
    return logits


class _FusedLinearLogProb(torch.autograd.Function):
    """log p(target) from hidden states and the vocab-parallel output weight, one chunk of tokens at a time.

    Forward keeps only the inputs and one log-sum-exp per token; backward recomputes each chunk's logits. So
    [t, V/tp] never exists: at most [chunk, V/tp] does, plus the weight's own gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, target, group, vocab_size, chunk):
        v_local = weight.shape[0]
        start = (dist.get_rank(group) if group is not None else 0) * v_local
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(out)
        for i in range(0, hidden.shape[0], chunk):
            logits = _chunk_logits(hidden[i:i + chunk], weight, start, vocab_size)
            local = target[i:i + chunk] - start
            in_range = (local >= 0) & (local < v_local)
            logits_max = logits.max(dim=-1).values
            if group is not None:
                dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
            logits.sub_(logits_max.unsqueeze(-1))
            picked = logits.gather(-1, local.clamp(0, v_local - 1).unsqueeze(-1)).squeeze(-1) * in_range
            both = torch.stack([logits.exp_().sum(dim=-1), picked])
            if group is not None:  # one collective for both partial sums, as in the unfused path
                dist.all_reduce(both, group=group)
            log_sum = both[0].log()
            out[i:i + chunk] = both[1] - log_sum
            lse[i:i + chunk] = logits_max + log_sum
            del logits  # before the next chunk's buffer exists: one [chunk, V/tp] buffer at a time
        ctx.save_for_backward(hidden, weight, target, lse)
        ctx.group, ctx.vocab_size, ctx.chunk, ctx.start = group, vocab_size, chunk, start
        return out

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, target, lse = ctx.saved_tensors
        v_local = weight.shape[0]
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        grad = grad.float()
        for i in range(0, hidden.shape[0], ctx.chunk):
            h, g = hidden[i:i + ctx.chunk], grad[i:i + ctx.chunk]
            # d logp(t) / d logit_j = 1[j == t] - softmax_j: this rank's vocabulary slice of it, in place
            grad_logits = _chunk_logits(h, weight, ctx.start, ctx.vocab_size)
            grad_logits.sub_(lse[i:i + ctx.chunk].unsqueeze(-1)).exp_().mul_(-g.unsqueeze(-1))
            local = target[i:i + ctx.chunk] - ctx.start
            in_range = (local >= 0) & (local < v_local)
            grad_logits.scatter_add_(-1, local.clamp(0, v_local - 1).unsqueeze(-1), (g * in_range).unsqueeze(-1))
            grad_hidden[i:i + ctx.chunk] = torch.matmul(grad_logits.to(weight.dtype), weight)
            grad_weight.addmm_(grad_logits.t(), h.float())
            del grad_logits
        if ctx.group is not None:
            # every rank's vocabulary slice contributes to d/d hidden (megatron's output layer all-reduces its input
            # gradient the same way): the full gradient on every TP rank
            dist.all_reduce(grad_hidden, group=ctx.group)
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None, None


def fused_linear_token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    tp_group=None,
    vocab_size: int | None = None,
    chunk_tokens: int = 256,
) -> torch.Tensor:
    """Log-probs of `labels` under `hidden @ weight.T`, without materialising the logits of all tokens.

    Numerically the full-vocabulary ``log_softmax`` (fp32 statistics, the TP reductions of
    `vocab_parallel_token_logps`), but computed `chunk_tokens` tokens at a time in forward and recomputed per
    chunk in backward: peak memory is one [chunk, V/tp] fp32 buffer plus the weight's gradient, not [t, V/tp].

    Args:
        hidden: [t, h] hidden states of the positions to score (the same on every TP rank; its gradient is
            summed over TP here, as megatron's output layer sums its input gradient).
        weight: [V/tp, h] this TP rank's slice of the output (vocabulary) weight.
        labels: [t] target ids, IGNORE_INDEX where not scored (their log-prob is 0).
        tp_group: the group that shards the vocabulary (None or size 1: no communication).
        vocab_size: the real vocabulary; padded rows of `weight` beyond it stay out of the softmax.
        chunk_tokens: tokens per chunk (memory vs kernel size).
    Returns:
        [t] fp32 log-probs, 0 at ignored positions.
    """
    group = tp_group if tp_group is not None and dist.get_world_size(tp_group) > 1 else None
    mask = labels != IGNORE_INDEX
    target = labels.masked_fill(~mask, 0)
    return _FusedLinearLogProb.apply(hidden, weight, target, group, vocab_size, max(1, int(chunk_tokens))) * mask


class _GatherRows(torch.autograd.Function):
    """All-gather of per-rank row blocks of different (known) sizes along dim 0. Backward takes this rank's block
    of the incoming gradient, which the fused log-prob backward has already summed over TP."""

    @staticmethod
    def forward(ctx, local, counts, group):
        rank = dist.get_rank(group)
        width = max(counts)
        padded = local.new_zeros((width, *local.shape[1:]))
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded.contiguous(), group=group)
        ctx.offset, ctx.count = sum(counts[:rank]), counts[rank]
        return torch.cat([p[:n] for p, n in zip(parts, counts)])

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.offset:ctx.offset + ctx.count], None, None


def response_token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    tp_group=None,
    sequence_parallel: bool = False,
    vocab_size: int | None = None,
    chunk_tokens: int = 256,
) -> torch.Tensor:
    """Per-token log-probs [R, S] of the supervised positions only, from the decoder's final hidden states.

    Only the positions with a label (the responses) go through the vocabulary, with `fused_linear_token_logps`.
    Under sequence parallelism each TP rank holds a contiguous slice of the sequence: only its supervised
    positions are gathered from the others, never the whole sequence.

    Args:
        hidden: [S, R, h] final hidden states in megatron's layout ([S/tp, R, h] under sequence parallelism).
        weight: [V/tp, h] the output layer's weight slice.
        labels: [R, S] targets, IGNORE_INDEX where unsupervised.
    Returns:
        [R, S] fp32 log-probs, 0 where unsupervised.
    """
    mask = (labels != IGNORE_INDEX).t()  # [S, R], the layout of `hidden`
    group = tp_group if tp_group is not None and dist.get_world_size(tp_group) > 1 else None
    if sequence_parallel and group is not None:
        shard = hidden.shape[0]
        local_masks = mask.split(shard)
        selected = _GatherRows.apply(hidden[local_masks[dist.get_rank(group)]],
                                     [int(m.sum()) for m in local_masks], group)
    else:
        selected = hidden[mask]
    logps = fused_linear_token_logps(selected, weight, labels.t()[mask], tp_group, vocab_size, chunk_tokens)
    out = torch.zeros(mask.shape, dtype=torch.float32, device=hidden.device)
    return out.masked_scatter(mask, logps).t()
