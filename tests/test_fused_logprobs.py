"""The fused, chunked, response-only log-prob stage (megatron_po/logprobs.py) against full-vocabulary log_softmax.

Values and gradients with respect to the hidden states and the output weight, in fp32, to 1e-6 relative: in one
process here (chunk sizes, padded vocabulary, ignored labels), and at TP=2 with and without sequence parallelism in
a 2-process gloo launch (tests/dist/fused_logprobs_worker.py), where the stage also makes one collective per pass
and no host sync. The weight gradient goes into megatron DDP's fp32 main_grad by megatron's protocol; the chunk
size is sized to the device.
"""

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, run_torchrun
from host_syncs import assert_no_host_syncs
from megatron_po.logprobs import (IGNORE_INDEX, ResponseIndex, auto_chunk_tokens, fused_linear_token_logps,
                                  response_token_logps)

TOL = 1e-6


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12))


def reference(hidden, weight, labels, vocab_size=None):
    """Plain autograd: full logits, log_softmax over the real vocabulary, gather."""
    logits = (hidden @ weight.t()).float()
    if vocab_size is not None:
        logits = logits[:, :vocab_size]
    mask = labels != IGNORE_INDEX
    lp = torch.log_softmax(logits, -1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return lp * mask


def problem(t=37, h=16, v=96, seed=0, ignore_every=5):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(t, h, generator=g, dtype=torch.float64).float().requires_grad_()
    weight = (torch.randn(v, h, generator=g) * 0.5).requires_grad_()
    labels = torch.randint(0, v, (t,), generator=g)
    labels[::ignore_every] = IGNORE_INDEX
    return hidden, weight, labels


@pytest.mark.pure
@pytest.mark.parametrize("chunk", [1, 5, 16, 37, 1000])
@pytest.mark.parametrize("vocab_size", [None, 90])
def test_values_and_gradients_equal_log_softmax(chunk, vocab_size):
    hidden, weight, labels = problem()
    if vocab_size is not None:
        labels = labels.clamp_max(vocab_size - 1)  # padded rows are never targets
        labels[::5] = IGNORE_INDEX
    upstream = torch.linspace(-1.0, 2.0, labels.shape[0])  # an arbitrary dL/dlogp
    ours = fused_linear_token_logps(hidden, weight, labels, vocab_size=vocab_size, chunk_tokens=chunk)
    g_ours = torch.autograd.grad((ours * upstream).sum(), (hidden, weight))
    theirs = reference(hidden, weight, labels, vocab_size)
    g_theirs = torch.autograd.grad((theirs * upstream).sum(), (hidden, weight))
    assert rel(ours, theirs) <= TOL
    assert (ours[labels == IGNORE_INDEX] == 0).all()
    assert rel(g_ours[0], g_theirs[0]) <= TOL and rel(g_ours[1], g_theirs[1]) <= TOL
    if vocab_size is not None:  # padded vocabulary rows get no gradient
        assert (g_ours[1][vocab_size:] == 0).all()


def _response_case(seed: int, spans: dict[int, tuple[int, int]], s: int = 11, r: int = 3, h: int = 8, v: int = 40):
    """[S, R, h] hidden states, a [V, h] weight (both requiring grad) and [R, S] labels supervised on `spans`
    (row -> [start, end))."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(s, r, h, generator=g).requires_grad_()
    weight = torch.randn(v, h, generator=g).requires_grad_()
    labels = torch.full((r, s), IGNORE_INDEX)
    for row, (start, end) in spans.items():
        labels[row, start:end] = torch.randint(0, v, (end - start,), generator=g)
    return hidden, weight, labels


@pytest.mark.pure
def test_response_positions_only():
    """[S, R, h] hidden states and [R, S] labels: the supervised positions in their places, 0 elsewhere."""
    hidden, weight, labels = _response_case(1, {0: (4, 9), 2: (7, 10)})
    s, r, h = hidden.shape
    ours = response_token_logps(hidden, weight, labels, chunk_tokens=3)
    theirs = reference(hidden.transpose(0, 1).reshape(-1, h), weight, labels.reshape(-1)).view(r, s)
    assert ours.shape == (r, s) and rel(ours, theirs) <= TOL and (ours[labels == IGNORE_INDEX] == 0).all()
    g_ours = torch.autograd.grad(ours.sum(), (hidden, weight))
    g_theirs = torch.autograd.grad(theirs.sum(), (hidden, weight))
    assert rel(g_ours[0], g_theirs[0]) <= TOL and rel(g_ours[1], g_theirs[1]) <= TOL
    assert (g_ours[0][:, 1] == 0).all()  # a row without supervised positions takes no gradient


@pytest.mark.multirank
def test_tensor_and_sequence_parallel(tmp_path):
    run_torchrun([str(REPO / "tests" / "dist" / "fused_logprobs_worker.py"), str(tmp_path)])
    r = json.loads((tmp_path / "fused.json").read_text())
    assert sorted(r) == ["tp2", "tp2_rank_all_padding", "tp2_sp"]
    for name, got in r.items():
        for k in ("logps", "grad_hidden", "grad_weight"):
            assert got[k] <= TOL, (name, k, got[k])
        assert got["host_syncs"] == 0, name
        # one all-gather of the per-rank statistics for all chunks (before: two all-reduces per chunk), plus the
        # gather of the response positions under SP; one all-reduce of the hidden gradient in backward
        assert got["forward_collectives"] == (2 if name == "tp2_sp" else 1), (name, got)
        assert got["backward_collectives"] == 1, (name, got)


@pytest.mark.pure
def test_no_host_syncs_with_the_rows_index():
    """With the supervised positions indexed on the host (train/batch.Rows), forward and backward of the stage
    never read a device value: on a GPU nothing in it waits for the device."""
    hidden, weight, labels = _response_case(2, {0: (4, 9), 2: (1, 10)})
    index = ResponseIndex.of(labels)
    with assert_no_host_syncs("response_token_logps"):
        ours = response_token_logps(hidden, weight, labels, vocab_size=37, chunk_tokens=4, index=index)
        ours.sum().backward()
    assert torch.equal(ours.detach(), response_token_logps(hidden, weight, labels, vocab_size=37, chunk_tokens=4))


@pytest.mark.pure
def test_auto_chunk_tokens():
    assert auto_chunk_tokens(151936, "cpu") == 256  # the CPU keeps its small chunks (and the layout tests' numerics)
    for vocab_local in (151936, 151936 // 4, 152064 // 8, 92553 // 2):
        chunk = auto_chunk_tokens(vocab_local, "cuda")
        assert chunk % 256 == 0 and abs(chunk * vocab_local * 4 / 2**30 - 1) < 0.15, (vocab_local, chunk)
    assert auto_chunk_tokens(4096, "cuda") == 16384  # clamped: a small vocabulary needs no bigger chunks
    assert auto_chunk_tokens(10_000_000, "cuda") == 256


@pytest.mark.pure
def test_language_model_resolves_the_chunk(groups, tmp_path):
    from megatron_po.config import load_config
    from megatron_po.models.tiny_vlm.model import build_vlm

    cfg = load_config(None, [f"output_dir={tmp_path}", "model.num_layers=1"])
    lm = build_vlm(cfg.model, cfg.parallel, 1024, groups, seed=0).language_model
    assert cfg.model.logprob_chunk_tokens == 0 and lm.logprob_chunk_tokens == 256  # built on the CPU
    assert lm.configure(cfg.model, "cuda").logprob_chunk_tokens == auto_chunk_tokens(1024, "cuda")
    cfg.model.logprob_chunk_tokens = 384
    assert lm.configure(cfg.model, "cuda").logprob_chunk_tokens == 384


@pytest.mark.pure
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("overlap", [False, True])
def test_weight_gradient_accumulates_into_ddp_main_grad(groups, tied, overlap):
    """Through megatron's DDP: the weight gradient lands in its fp32 main_grad over two micro-batches (megatron's
    gradient-accumulation-fusion protocol: grad_added_to_main_grad, a placeholder for autograd), equal to plain
    autograd; tied to an embedding on the same stage (megatron sets zero_out_wgrad) the embedding's gradient adds."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.module import MegatronModule

    t, h, v = 13, 8, 40
    g = torch.Generator().manual_seed(3)
    init = torch.randn(v, h, generator=g)
    batches = [(torch.randn(t, h, generator=g), torch.randint(0, v, (t,), generator=g),
                torch.randint(0, v, (5,), generator=g)) for _ in range(2)]

    class Head(MegatronModule):
        def __init__(self, config):
            super().__init__(config)
            self.weight = torch.nn.Parameter(init.clone())

    config = TransformerConfig(num_layers=1, hidden_size=h, num_attention_heads=1, use_cpu_initialization=True)
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                                                        overlap_grad_reduce=overlap),
                                  Head(config))
    weight = ddp.module.weight
    if tied:
        weight.zero_out_wgrad = True  # what megatron's LanguageModule sets for a tied weight on one stage
    reference = init.clone().requires_grad_()
    ddp.zero_grad_buffer()
    for hidden, labels, ids in batches:
        for w in (weight, reference):
            loss = fused_linear_token_logps(hidden, w, labels, chunk_tokens=5).sum()
            if tied:
                loss = loss + F.embedding(ids, w).pow(2).sum()
            loss.backward()
    ddp.finish_grad_sync()
    assert weight.grad is None and weight.grad_added_to_main_grad
    assert rel(weight.main_grad, reference.grad) <= TOL
