"""The fused, chunked, response-only log-prob stage (megatron_po/logprobs.py) against full-vocabulary log_softmax.

Values and gradients with respect to the hidden states and the output weight, in fp32, to 1e-6 relative: in one
process here (chunk sizes, padded vocabulary, ignored labels), and at TP=2 with and without sequence parallelism in
a 2-process gloo launch (tests/dist/fused_logprobs_worker.py).
"""

import json

import pytest
import torch

from conftest import REPO, run_torchrun
from megatron_po.logprobs import IGNORE_INDEX, fused_linear_token_logps, response_token_logps

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


def test_response_positions_only():
    """[S, R, h] hidden states and [R, S] labels: the supervised positions in their places, 0 elsewhere."""
    s, r, h, v = 11, 3, 8, 40
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(s, r, h, generator=g).requires_grad_()
    weight = torch.randn(v, h, generator=g).requires_grad_()
    labels = torch.full((r, s), IGNORE_INDEX)
    labels[0, 4:9] = torch.randint(0, v, (5,), generator=g)
    labels[2, 7:10] = torch.randint(0, v, (3,), generator=g)
    ours = response_token_logps(hidden, weight, labels, chunk_tokens=3)
    theirs = reference(hidden.transpose(0, 1).reshape(-1, h), weight, labels.reshape(-1)).view(r, s)
    assert ours.shape == (r, s) and rel(ours, theirs) <= TOL and (ours[labels == IGNORE_INDEX] == 0).all()
    g_ours = torch.autograd.grad(ours.sum(), (hidden, weight))
    g_theirs = torch.autograd.grad(theirs.sum(), (hidden, weight))
    assert rel(g_ours[0], g_theirs[0]) <= TOL and rel(g_ours[1], g_theirs[1]) <= TOL
    assert (g_ours[0][:, 1] == 0).all()  # a row without supervised positions takes no gradient


def test_tensor_and_sequence_parallel(tmp_path):
    run_torchrun([str(REPO / "tests" / "dist" / "fused_logprobs_worker.py"), str(tmp_path)])
    r = json.loads((tmp_path / "fused.json").read_text())
    assert sorted(r) == ["tp2", "tp2_sp"]
    for name, errs in r.items():
        for k, v in errs.items():
            assert v <= TOL, (name, k, v)
