"""Token log-probabilities from vocab-sharded logits, without gathering the vocabulary.

Each TP rank holds logits for a contiguous slice of the vocabulary. The log-softmax needs only two scalars per
position from the other ranks (max and sum of exp) and the target logit from the rank that owns it: three small
all-reduces over the TP group instead of an all-gather of [b, s, v].

The fused path (`fused_linear_token_logps`, `response_token_logps`) goes further: it takes the hidden states of the
supervised positions and the output weight, never holds more than one chunk of logits, and runs without a single
host synchronisation (the supervised positions come as host-computed indices, `ResponseIndex`), so the GPU is
never left waiting for the CPU in the middle of a step.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

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
        if start + v_local > vocab_size:  # host arithmetic: this slice holds padded entries
            ids = torch.arange(start, start + v_local, device=logits.device)
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

CPU_CHUNK_TOKENS = 256
"""Tokens per chunk off the GPU: small buffers that stay in the CPU's caches."""
GPU_CHUNK_BYTES = 2**30
"""On a GPU, the size of the [chunk, V/tp] fp32 logits buffer: GEMMs of thousands of rows keep the tensor cores
busy, and a few dozen chunks per micro-batch keep the launches few."""
CHUNK_TOKENS_RANGE = (256, 16384)

_FP32_MIN = torch.finfo(torch.float32).min


def auto_chunk_tokens(vocab_local: int, device_type: str) -> int:
    """Tokens per chunk of the fused log-prob stage for `model.logprob_chunk_tokens=0` (auto).

    On CUDA, the multiple of 256 whose [chunk, vocab_local] fp32 buffer is nearest `GPU_CHUNK_BYTES` (1 GiB),
    within `CHUNK_TOKENS_RANGE`: Qwen2.5's 151,936 entries give 1,792 tokens at TP=1 and 7,168 at TP=4. Elsewhere
    `CPU_CHUNK_TOKENS` (256). The memory plan sizes the stage with this same function.

    Args:
        vocab_local: V/tp, this rank's rows of the (padded) output weight.
        device_type: ``torch.device.type`` of the weight ("cuda", "cpu", ...).
    """
    if device_type != "cuda":
        return CPU_CHUNK_TOKENS
    lo, hi = CHUNK_TOKENS_RANGE
    chunk = round(GPU_CHUNK_BYTES / (4 * vocab_local) / 256) * 256
    return min(max(chunk, lo), hi)


_FP32_OUT_GEMM: dict[torch.device, bool] = {}


def _fp32_out_gemm(device: torch.device) -> bool:
    """Whether `torch.mm` / `torch.addmm` take ``out_dtype=torch.float32`` with bf16/fp16 inputs on `device` (CUDA:
    tensor-core GEMMs that accumulate into and return fp32, as apex's fused weight-gradient kernel does). Probed
    once per device, values included (an in-place ``out`` aliasing the addend is part of the probe)."""
    if device.type != "cuda":
        return False
    if device not in _FP32_OUT_GEMM:
        ok = False
        try:
            a = torch.randn(64, 32, device=device).bfloat16()
            b = torch.randn(32, 48, device=device).bfloat16()
            acc = torch.ones(64, 48, device=device)
            want = 1 + a.float() @ b.float()
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            got = torch.mm(a, b, out_dtype=torch.float32)
            ok = (got.dtype == torch.float32 and torch.allclose(acc, want, rtol=1e-4, atol=1e-4)
                  and torch.allclose(got + 1, want, rtol=1e-4, atol=1e-4))
        except (RuntimeError, TypeError, NotImplementedError):
            ok = False
        _FP32_OUT_GEMM[device] = ok
    return _FP32_OUT_GEMM[device]


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, start: int, vocab_size: int | None) -> torch.Tensor:
    """fp32 logits [c, v/tp] of one chunk of tokens (a fresh buffer the caller may overwrite), padded vocabulary
    entries at -inf. bf16 weights multiply on the tensor cores straight into fp32 where torch can (no bf16
    [c, v/tp] product to round and convert)."""
    hidden = hidden.to(weight.dtype)
    if weight.dtype == torch.float32:
        logits = hidden @ weight.t()
    elif _fp32_out_gemm(weight.device):
        logits = torch.mm(hidden, weight.t(), out_dtype=torch.float32)
    else:
        logits = (hidden @ weight.t()).float()
    if vocab_size is not None and start + logits.shape[-1] > vocab_size:
        logits[:, max(vocab_size - start, 0):] = float("-inf")
    return logits


def _accumulates_into_main_grad(weight: torch.Tensor) -> bool:
    """`weight` is a parameter of megatron's DDP with an fp32 gradient buffer: its gradient is added to
    ``weight.main_grad`` here, as megatron's own layers do with gradient-accumulation fusion
    (``tensor_parallel.layers.LinearWithGradAccumulationAndAsyncCommunication``)."""
    main_grad = getattr(weight, "main_grad", None)
    return (main_grad is not None and main_grad.dtype == torch.float32
            and hasattr(weight, "grad_added_to_main_grad"))


class _FusedLinearLogProb(torch.autograd.Function):
    """log p(target) from hidden states and the vocab-parallel output weight, one chunk of tokens at a time.

    Forward keeps only the inputs and one log-sum-exp per token; backward recomputes each chunk's logits. So
    [t, V/tp] never exists: at most one [chunk, V/tp] fp32 buffer does (and its bf16 copy for the backward GEMMs).

    Communication: one all-gather of three floats per token in forward (each rank's max, sum of exp and target
    logit over its vocabulary slice, combined as a log-sum-exp over the ranks), one all-reduce of the hidden
    gradient in backward. GEMMs run in the weight's dtype (bf16 on tensor cores) with fp32 results; the weight
    gradient accumulates in fp32, into megatron DDP's ``main_grad`` when the weight has one (no [V/tp, h] gradient
    of this stage's own then).
    """

    @staticmethod
    def forward(ctx, hidden, weight, target, group, vocab_size, chunk):
        v_local = weight.shape[0]
        start = (dist.get_rank(group) if group is not None else 0) * v_local
        t = hidden.shape[0]
        # per token, over this rank's vocabulary slice: the max logit m, the sum of exp(logit - m), and the target's
        # logit - m where the slice holds the target (0 elsewhere); all chunks first, then one collective
        stats = torch.empty(3, t, dtype=torch.float32, device=hidden.device)
        for i in range(0, t, chunk):
            logits = _chunk_logits(hidden[i:i + chunk], weight, start, vocab_size)
            local = target[i:i + chunk] - start
            in_range = (local >= 0) & (local < v_local)
            # a slice of padding only has max -inf: exp(-inf - -inf) would be NaN, exp(-inf - finite) is 0
            logits_max = logits.amax(dim=-1).clamp_min(_FP32_MIN)
            logits.sub_(logits_max.unsqueeze(-1))
            picked = logits.gather(-1, local.clamp(0, v_local - 1).unsqueeze(-1)).squeeze(-1)
            stats[0, i:i + chunk] = logits_max
            stats[2, i:i + chunk] = torch.where(in_range, picked, 0.0)
            stats[1, i:i + chunk] = logits.exp_().sum(dim=-1)
            del logits  # before the next chunk's buffer exists: one [chunk, V/tp] buffer at a time
        if group is not None:
            parts = [torch.empty_like(stats) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, stats, group=group)
            m, sum_exp, picked = torch.stack(parts).unbind(1)  # [tp, t] each
            m_max = m.amax(dim=0)
            sum_exp = (sum_exp * (m - m_max).exp()).sum(dim=0)
            # the target's logit - m_max: its owner's (logit - m_owner) + (m_owner - m_max), exact when m_owner = m_max
            owner = (target // v_local).clamp_max(len(parts) - 1).unsqueeze(0)
            picked = picked.sum(dim=0) + (m.gather(0, owner)[0] - m_max)
        else:
            m_max, sum_exp, picked = stats
        log_sum = sum_exp.log()
        ctx.save_for_backward(hidden, weight, target, m_max + log_sum)
        ctx.group, ctx.vocab_size, ctx.chunk, ctx.start = group, vocab_size, chunk, start
        return picked - log_sum

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, target, lse = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        v_local = weight.shape[0]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        into_main_grad = need_weight and _accumulates_into_main_grad(weight)
        if into_main_grad:
            acc = weight.main_grad
        elif need_weight:
            acc = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        # bf16 GEMM operands with fp32 accumulation (or fp32 throughout): the fp32 chunk can go before the GEMMs
        fast = weight.dtype == torch.float32 or _fp32_out_gemm(weight.device)
        grad = grad.float()
        for i in range(0, hidden.shape[0], ctx.chunk):
            h, g = hidden[i:i + ctx.chunk], grad[i:i + ctx.chunk]
            # d logp(t) / d logit_j = 1[j == t] - softmax_j: this rank's vocabulary slice of it, in place
            grad_logits = _chunk_logits(h, weight, ctx.start, ctx.vocab_size)
            grad_logits.sub_(lse[i:i + ctx.chunk].unsqueeze(-1)).exp_().mul_(-g.unsqueeze(-1))
            local = target[i:i + ctx.chunk] - ctx.start
            in_range = (local >= 0) & (local < v_local)
            grad_logits.scatter_add_(-1, local.clamp(0, v_local - 1).unsqueeze(-1),
                                     torch.where(in_range, g, 0.0).unsqueeze(-1))
            low = grad_logits.to(weight.dtype)  # the same tensor for fp32 weights
            if fast:
                grad_logits = None  # the GEMMs take `low`: its fp32 original can go first
            if need_hidden:
                grad_hidden[i:i + ctx.chunk] = low @ weight
            if need_weight:
                if weight.dtype == torch.float32:
                    acc.addmm_(low.t(), h.float())
                elif fast:
                    torch.addmm(acc, low.t(), h.to(weight.dtype), out_dtype=torch.float32, out=acc)
                else:  # no fp32-output GEMM here: multiply the fp32 chunk, as before
                    acc.addmm_(grad_logits.t(), h.float())
            grad_logits = low = None  # before the next chunk's buffer exists
        if need_hidden and ctx.group is not None:
            # every rank's vocabulary slice contributes to d/d hidden (megatron's output layer all-reduces its input
            # gradient the same way): the full gradient on every TP rank
            dist.all_reduce(grad_hidden, group=ctx.group)
        grad_weight = None
        if into_main_grad:
            # megatron's protocol: the gradient is in main_grad; DDP's hook must not add what autograd hands it.
            # autograd still needs a tensor of the weight's shape (the hook asserts one under overlap_grad_reduce);
            # zeros when the weight is tied to the embedding on this stage (its own gradient is summed into it)
            weight.grad_added_to_main_grad = True
            make = torch.zeros if getattr(weight, "zero_out_wgrad", False) else torch.empty
            grad_weight = make(weight.shape, dtype=weight.dtype, device=weight.device)
        elif need_weight:
            grad_weight = acc if weight.dtype == torch.float32 else acc.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None


def fused_linear_token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    tp_group=None,
    vocab_size: int | None = None,
    chunk_tokens: int = 0,
) -> torch.Tensor:
    """Log-probs of `labels` under `hidden @ weight.T`, without materialising the logits of all tokens.

    Numerically the full-vocabulary ``log_softmax`` (fp32 statistics), but computed `chunk_tokens` tokens at a time
    in forward and recomputed per chunk in backward: peak memory is one [chunk, V/tp] fp32 buffer (and, for a
    bf16 weight, its bf16 copy in backward) plus, unless the weight is a megatron DDP parameter with an fp32
    ``main_grad``, the weight's fp32 gradient. No host synchronisation.

    Args:
        hidden: [t, h] hidden states of the positions to score (the same on every TP rank; its gradient is
            summed over TP here, as megatron's output layer sums its input gradient).
        weight: [V/tp, h] this TP rank's slice of the output (vocabulary) weight.
        labels: [t] target ids, IGNORE_INDEX where not scored (their log-prob is 0).
        tp_group: the group that shards the vocabulary (None or size 1: no communication).
        vocab_size: the real vocabulary; padded rows of `weight` beyond it stay out of the softmax.
        chunk_tokens: tokens per chunk (memory vs kernel size); 0: `auto_chunk_tokens` for the weight's device.
    Returns:
        [t] fp32 log-probs, 0 at ignored positions.
    """
    group = tp_group if tp_group is not None and dist.get_world_size(tp_group) > 1 else None
    chunk = int(chunk_tokens) or auto_chunk_tokens(weight.shape[0], weight.device.type)
    mask = labels != IGNORE_INDEX
    target = labels.masked_fill(~mask, 0)
    return _FusedLinearLogProb.apply(hidden, weight, target, group, vocab_size, max(1, chunk)) * mask


@dataclass(frozen=True)
class ResponseIndex:
    """Where the supervised (response) positions of [R, S] labels sit in megatron's [S, R] activation layout,
    computed once on the host when a micro-batch is made (train/batch.Rows), so the log-prob stage can select and
    place them with index ops instead of boolean masks (which make the host wait for the GPU)."""

    flat: torch.Tensor
    """[N] long: ``s * R + r`` of every supervised position, ascending (the order of ``hidden[mask]`` over [S, R]);
    on the batch's device."""
    positions: tuple[int, ...]
    """The same indices on the host (the per-shard counts under sequence parallelism)."""

    @classmethod
    def of(cls, labels: torch.Tensor) -> "ResponseIndex":
        """From [R, S] labels: on the host when `labels` is (the trainer's case); elsewhere this waits for it."""
        flat = (labels != IGNORE_INDEX).t().reshape(-1).nonzero().flatten()
        return cls(flat, tuple(flat.tolist()))

    def shard_bounds(self, shards: int, positions_per_shard: int) -> list[int]:
        """Offsets into `flat` where each of `shards` equal contiguous blocks of flat positions begins (and the
        end): block k holds ``flat[bounds[k]:bounds[k + 1]]``."""
        return [bisect.bisect_left(self.positions, k * positions_per_shard) for k in range(shards)] + [
            len(self.positions)]


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
    chunk_tokens: int = 0,
    index: ResponseIndex | None = None,
) -> torch.Tensor:
    """Per-token log-probs [R, S] of the supervised positions only, from the decoder's final hidden states.

    Only the positions with a label (the responses) go through the vocabulary, with `fused_linear_token_logps`.
    Under sequence parallelism each TP rank holds a contiguous slice of the sequence: only its supervised
    positions are gathered from the others, never the whole sequence. With `index` (the trainer's rows carry one)
    nothing here makes the host wait for the device.

    Args:
        hidden: [S, R, h] final hidden states in megatron's layout ([S/tp, R, h] under sequence parallelism).
        weight: [V/tp, h] the output layer's weight slice.
        labels: [R, S] targets, IGNORE_INDEX where unsupervised.
        chunk_tokens: see `fused_linear_token_logps` (0: auto).
        index: the supervised positions of `labels` (`ResponseIndex.of(labels)`, computed here when None).
    Returns:
        [R, S] fp32 log-probs, 0 where unsupervised.
    """
    index = ResponseIndex.of(labels) if index is None else index
    r, s = labels.shape
    group = tp_group if tp_group is not None and dist.get_world_size(tp_group) > 1 else None
    if sequence_parallel and group is not None:
        shard, rank = hidden.shape[0], dist.get_rank(group)
        bounds = index.shard_bounds(dist.get_world_size(group), shard * r)
        local = index.flat[bounds[rank]:bounds[rank + 1]] - rank * shard * r
        counts = [b - a for a, b in zip(bounds, bounds[1:])]
        selected = _GatherRows.apply(hidden.reshape(shard * r, -1).index_select(0, local), counts, group)
    else:
        selected = hidden.reshape(s * r, -1).index_select(0, index.flat)
    targets = labels.t().reshape(-1).index_select(0, index.flat)
    logps = fused_linear_token_logps(selected, weight, targets, tp_group, vocab_size, chunk_tokens)
    out = torch.zeros(s * r, dtype=torch.float32, device=hidden.device).index_copy(0, index.flat, logps)
    return out.view(s, r).t()
