"""GPU-only checks of the fused log-prob stage and the micro-batch's trip to the device (issue 19). CI has no GPU:
these skip there. One process, no megatron parallel state; about a minute on an H100.

What only a GPU shows: that torch's fp32-output GEMMs exist for bf16 (else the stage falls back to fp32 GEMMs),
that the bf16 stage still equals the fp32 log_softmax to bf16 rounding, and that nothing in it, or in moving a
micro-batch to the device, synchronises the host (`torch.cuda.set_sync_debug_mode("error")`, which the CPU cannot
emulate: tests/host_syncs.py covers the Python-level calls there).
"""

import contextlib

import pytest
import torch

from megatron_po.logprobs import IGNORE_INDEX, ResponseIndex, _fp32_out_gemm, response_token_logps

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"), pytest.mark.pure]


@contextlib.contextmanager
def no_syncs():
    """Any synchronising CUDA call in the block raises (pageable copies, .item(), nonzero, ...)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def problem(s=2048, r=2, h=512, v=32000, vocab=31990):
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(s, r, h, generator=g)).cuda().bfloat16()
    weight = (torch.randn(v, h, generator=g) * h ** -0.5).cuda().bfloat16()
    labels = torch.full((r, s), IGNORE_INDEX)
    labels[:, s // 4:] = torch.randint(0, vocab, (r, s - s // 4), generator=g)
    return hidden, weight, labels, vocab


def test_fp32_output_gemms_are_there():
    """bf16 GEMMs with fp32 results (`torch.mm(..., out_dtype=torch.float32)`): without them the stage runs its
    weight-gradient GEMM in fp32, several times slower on an H100."""
    assert _fp32_out_gemm(torch.device("cuda", torch.cuda.current_device()))


@pytest.mark.parametrize("into_main_grad", [False, True])
def test_bf16_stage_equals_fp32_log_softmax_without_host_syncs(into_main_grad):
    hidden, weight, labels, vocab = problem()
    index = ResponseIndex.of(labels.to(hidden.device))
    labels = labels.cuda()
    upstream = torch.randn(labels.shape, device="cuda")
    # plain autograd in fp32 on the same (bf16-valued) inputs
    h32, w32 = hidden.float().requires_grad_(), weight.float().requires_grad_()
    logits = torch.einsum("srh,vh->rsv", h32, w32)[..., :vocab]
    theirs = torch.log_softmax(logits, -1).gather(-1, labels.clamp_min(0)[..., None])[..., 0] * (labels >= 0)
    (theirs * upstream).sum().backward()
    del logits

    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    if into_main_grad:  # megatron DDP's fp32 buffer
        w.main_grad = torch.zeros(w.shape, dtype=torch.float32, device="cuda")
        w.grad_added_to_main_grad = False
    response_token_logps(h, w, labels, vocab_size=vocab, chunk_tokens=1024, index=index)  # warm-up, GEMM probe
    h.grad = w.grad = None
    if into_main_grad:
        w.main_grad.zero_()
    with no_syncs():
        ours = response_token_logps(h, w, labels, vocab_size=vocab, chunk_tokens=1024, index=index)
        (ours * upstream).sum().backward()
    torch.cuda.synchronize()
    assert rel(ours.detach(), theirs.detach()) < 1e-3  # bf16 GEMM inputs, fp32 accumulation and statistics
    assert rel(h.grad, h32.grad) < 2e-2  # the hidden gradient is returned in bf16
    if into_main_grad:
        assert w.grad_added_to_main_grad and w.grad.dtype == torch.bfloat16
        assert rel(w.main_grad, w32.grad) < 1e-3  # accumulated in fp32, never rounded to bf16
    else:
        assert rel(w.grad.float(), w32.grad) < 2e-2


def test_micro_batch_moves_without_host_syncs():
    """Pinned, asynchronous copies: from pageable memory a non_blocking copy synchronises."""
    from megatron_po.train.batch import MicroBatch, Rows

    r, s = 4, 64
    labels = torch.full((r, s), IGNORE_INDEX)
    labels[:, 40:] = 7
    sequence_ids = torch.arange(r).repeat_interleave(s).view(r, s)
    rows = Rows(torch.ones(r, s, dtype=torch.long), labels, torch.arange(s).expand(r, s).clone(),
                torch.zeros(r, s, dtype=torch.bool), [[] for _ in range(r)], torch.full((r,), s), sequence_ids, r)
    host = MicroBatch(rows, torch.zeros(0, 3, 8, 8), 2, ["a", "b"], chosen_lengths=torch.tensor([24, 24]))
    one = host.as_thd()
    device = torch.device("cuda", torch.cuda.current_device())
    with no_syncs():
        mb = one.to(device)
    assert mb.rows.tokens.is_cuda and mb.rows.thd.cu_seqlens.is_cuda and mb.rows.response.flat.is_cuda
    assert mb.rows.thd.max_seqlen == s and mb.chosen_lengths.is_cuda
