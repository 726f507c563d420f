"""Shared helpers of tests/test_objectives*.py: constants, pair rows -> tensors, and a float64 ``loss_fn`` runner.

A row is ``(pol_w, ref_w, pol_l, ref_l, len_w, len_l)`` for one preference pair. Importable as ``objective_helpers``
(pytest puts tests/ on sys.path); functions that mp.spawn workers call live at module level here, so they pickle.
"""

import math

import torch

from megatron_po.objectives import OBJECTIVES, PairLogps, build_objective_config

F64 = torch.float64
# objectives whose loss_fn takes PairLogps (P2-DPO takes P2Logps: tests/test_objectives_p2.py)
PAIR_OBJECTIVES = sorted(name for name, obj in OBJECTIVES.items() if obj.inputs == "pairs")
LN2 = math.log(2)
# Δ_w = +1, Δ_l = −3: the pair of OBJECTIVES.md §13.1 (DPO: margin 0.4, loss 0.5130153)
CANONICAL = (-10.0, -11.0, -15.0, -12.0, 20, 25)
# the TRL metric names every preference objective reports
TRL_KEYS = frozenset({"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                      "logps/chosen", "logps/rejected", "lengths/chosen", "lengths/rejected"})


def columns(rows, dtype=F64, ref_grad=False):
    """rows -> (pol_w, pol_l, ref_w, ref_l, len_w, len_l) in pair_loss / PairLogps order; the policy columns (and,
    with ref_grad, the reference ones) are leaves that require grad."""
    pol_w, ref_w, pol_l, ref_l, len_w, len_l = (torch.tensor(c, dtype=dtype) for c in zip(*rows))
    return (pol_w.requires_grad_(), pol_l.requires_grad_(), ref_w.requires_grad_(ref_grad),
            ref_l.requires_grad_(ref_grad), len_w, len_l)


def make_logps(rows, dtype=F64, drop_reference=False):
    """rows -> PairLogps with leaf policy tensors (reference log-probs None with drop_reference)."""
    pol_w, pol_l, ref_w, ref_l, len_w, len_l = columns(rows, dtype)
    if drop_reference:
        ref_w = ref_l = None
    return PairLogps(pol_w, pol_l, ref_w, ref_l, len_w, len_l)


def run(name, rows, group=None, ctx=None, dtype=F64, drop_reference=False, **hparams):
    """loss_fn on rows -> (per-pair loss, metric samples, d(Σ loss)/d(pol_w), d(Σ loss)/d(pol_l)), the last two
    being the per-pair gradients."""
    logps = make_logps(rows, dtype, drop_reference)
    loss, metrics = OBJECTIVES[name].loss_fn(logps, build_objective_config(name, hparams), group, ctx=ctx)
    g_w, g_l = torch.autograd.grad(loss.sum(), [logps.policy_chosen_logps, logps.policy_rejected_logps])
    return loss.detach(), metrics, g_w, g_l


def random_rows(n, seed, same_policy_as_reference=False):
    """n seeded rows of Python floats: sums in (−200, 0], reference within ~5 nats of the policy (or equal to it,
    i.e. step 0), lengths in [1, 400)."""
    g = torch.Generator().manual_seed(seed)
    pol = -torch.rand(n, 2, generator=g, dtype=F64) * 200
    ref = pol.clone() if same_policy_as_reference else pol + torch.randn(n, 2, generator=g, dtype=F64) * 5
    lengths = torch.randint(1, 400, (n, 2), generator=g).double()
    return [tuple(float(x) for x in (pol[i, 0], ref[i, 0], pol[i, 1], ref[i, 1], lengths[i, 0], lengths[i, 1]))
            for i in range(n)]
