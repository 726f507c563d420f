"""Pure-math tests of the objectives against OBJECTIVES.md §13 (float64), plus one 2-rank gloo test of ACPO's
batch-scope all-reduce."""

import math
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from megatron_po.objectives import OBJECTIVES, build_objective_config, pair_loss, summarize_metrics
from megatron_po.parallel.reduce import all_gather_cat, all_reduce_sum

from objective_helpers import CANONICAL, F64, LN2, PAIR_OBJECTIVES, TRL_KEYS, make_logps, random_rows, run

# objectives that compare policy with reference: the ones for which "policy == reference" means step 0
PREFERENCE = [name for name in PAIR_OBJECTIVES if OBJECTIVES[name].needs_reference(OBJECTIVES[name].config_cls())]
# DPO-like ones: ln 2 at step 0 and rewards β·Δ over sequence sums. IPO is neither ((1/(2τ))² at step 0; rewards
# τ·Δ/len in its default per-token reading): tests/test_objectives_baselines.py covers it
DPO_LIKE = [name for name in PREFERENCE if name != "ipo"]
# ... minus beta_dpo (rewards at the batch's β_used; filtered pairs have loss 0) and aspo (needs per-sentence
# inputs): tests/test_objectives_advanced.py covers both
DPO_LIKE = [name for name in DPO_LIKE if name not in ("beta_dpo", "aspo")]


def approx(expected):
    # spec values carry 7 decimals (rounding error <= 5e-8); rel covers the 7-significant-digit ±4.5e5
    return pytest.approx(expected, rel=1e-7, abs=1e-7)


def dpo_shift(rows, beta, lam):
    """DPO-Shift (OBJECTIVES.md §5) written out independently: loss and policy gradients."""
    logps = make_logps(rows)
    z = beta * ((logps.policy_chosen_logps - logps.ref_chosen_logps)
                - lam * (logps.policy_rejected_logps - logps.ref_rejected_logps))
    loss = -F.logsigmoid(z)
    g_w, g_l = torch.autograd.grad(loss.sum(), [logps.policy_chosen_logps, logps.policy_rejected_logps])
    return loss.detach(), g_w, g_l


# ---------------------------------------------------------------------------------------------------- DPO §13.1
@pytest.mark.pure
def test_dpo_canonical_pair():
    loss, m, g_w, g_l = run("dpo", [CANONICAL])
    assert m["rewards/margins"].item() == approx(0.4)
    assert (m["rewards/chosen"].item(), m["rewards/rejected"].item()) == approx((0.1, -0.3))
    assert loss.item() == approx(0.5130153)
    assert (g_w.item(), g_l.item()) == approx((-0.0401312, 0.0401312))


@pytest.mark.pure
def test_dpo_label_smoothing_is_conservative_dpo():
    eps, z = 0.2, 0.4  # canonical pair: z = β(Δ_w − Δ_l) = 0.4
    loss, _, g_w, g_l = run("dpo", [CANONICAL], label_smoothing=eps)
    sig = 1 / (1 + math.exp(-z))
    assert loss.item() == approx(-(1 - eps) * math.log(sig) - eps * math.log(1 - sig))
    dz = -(1 - eps) * (1 - sig) + eps * sig
    assert (g_w.item(), g_l.item()) == approx((0.1 * dz, -0.1 * dz))


# --------------------------------------------------------------------------------------------------- ACPO §13.3
# inputs, then (r_w, r_l, τ, α*, α̂, loss, ∂pol_w, ∂pol_l) for [0.3, 0.95] and (α̂, loss, ∂pol_l) for [0, 1]
ACPO_CASES = {
    "A": (CANONICAL, (0.1, -0.3, 4.5, 14.6666667, 0.95, 0.5190620, -0.0404922, 0.0384675), (1.0, 0.5130153, 0.0401312)),
    "B": ((-5, -10, -30, -10, 5, 5), (0.5, -2.0, 1.0, 0.25, 0.3, 0.2873353, -0.0249740, 0.0074922),
          (0.25, 0.3132617, 0.0067235)),
    "C": ((-5, -10, -20, -10, 5, 5), (0.5, -1.0, 1.0, 0.5, 0.5, 0.3132617, -0.0268941, 0.0134471),
          (0.5, 0.3132617, 0.0134471)),
    "D": ((-2, -20, -30, -20, 5, 5), (1.8, -1.0, 1.0, -0.8, 0.3, 0.1155195, -0.0109097, 0.0032729),
          (0.0, 0.1529776, 0.0)),
    "E": ((-10, -11, -11, -12, 20, 25), (0.1, 0.1, 4.5, -44.0, 0.3, 0.6587596, -0.0482507, 0.0144752),
          (0.0, 0.6443967, 0.0)),
    "F": ((-10, -10, -12, -12, 20, 25), (0.0, 0.0, 4.5, 4.5e5, 0.95, 0.6931472, -0.05, 0.0475), (1.0, 0.6931472, 0.05)),
    "G": ((-10, -10, -12.00005, -12, 20, 25), (0.0, -5e-6, 4.5, 4.5e5, 0.95, 0.6931448, -0.0499999, 0.0474999),
          (1.0, 0.6931447, 0.0499999)),
}


@pytest.mark.pure
@pytest.mark.parametrize("case", sorted(ACPO_CASES))
def test_acpo_cases_empirical_window(case):
    inputs, (r_w, r_l, tau, alpha_raw, alpha_hat, loss_ref, g_w_ref, g_l_ref), _ = ACPO_CASES[case]
    loss, m, g_w, g_l = run("acpo", [inputs])
    assert (m["rewards/chosen"].item(), m["rewards/rejected"].item(), m["acpo/tau"].item()) == approx((r_w, r_l, tau))
    assert m["acpo/alpha_raw"].item() == approx(alpha_raw)
    assert m["acpo/alpha_hat"].item() == approx(alpha_hat)
    assert loss.item() == approx(loss_ref)
    assert (g_w.item(), g_l.item()) == approx((g_w_ref, g_l_ref))
    assert m["acpo/effective_margin"].item() == approx(r_w - alpha_hat * r_l)
    assert m["acpo/target_gap"].item() == approx(r_w - r_l - tau)
    flags = {key: bool(m[f"acpo/{key}"].item()) for key in ("at_lo", "at_hi", "rl_pos", "rl_below_eps")}
    assert flags == {"at_lo": case in "BDE", "at_hi": case in "AFG",
                     "rl_pos": case == "E", "rl_below_eps": case in "FG"}


@pytest.mark.pure
@pytest.mark.parametrize("case", sorted(ACPO_CASES))
def test_acpo_cases_formal_window(case):
    inputs, (*_, alpha_raw, _, _, _, _), (alpha_hat, loss_ref, g_l_ref) = ACPO_CASES[case]
    loss, m, _, g_l = run("acpo", [inputs], clip_lo=0.0, clip_hi=1.0)
    assert m["acpo/alpha_raw"].item() == approx(alpha_raw)
    assert m["acpo/alpha_hat"].item() == approx(alpha_hat)
    assert loss.item() == approx(loss_ref)
    assert g_l.item() == approx(g_l_ref)


@pytest.mark.pure
def test_acpo_variant_sign_zero_positive():
    loss, m, _, g_l = run("acpo", [ACPO_CASES["F"][0]], sign_zero=1)
    assert (m["acpo/alpha_raw"].item(), m["acpo/alpha_hat"].item()) == approx((-4.5e5, 0.3))
    assert (loss.item(), g_l.item()) == approx((0.6931472, 0.015))


@pytest.mark.pure
@pytest.mark.parametrize("scope", ["pair", "batch", "hybrid"])
@pytest.mark.parametrize("noise", [-5e-5, 5e-5])
def test_acpo_below_eps_is_zero_whatever_its_sign(scope, noise):
    """§7.3-C (2026-12-07): |r_l| < ε counts as r_l = 0, so the sign of rounding noise between a cached reference
    and the policy at step 0 cannot flip α̂ between the window's ends (β = 0.1: r_l = ±5e-6 < ε = 1e-5)."""
    rows = [(-10.0, -10.0, -12.0 + noise, -12.0, 20, 25), (-30.0, -30.0, -8.0 - noise, -8.0, 10, 15)]
    for sign_zero, alpha_hat in ((-1, 0.95), (1, 0.3)):
        _, m, _, _ = run("acpo", rows, alpha_scope=scope, sign_zero=sign_zero)
        assert m["acpo/alpha_hat"].tolist() == approx([alpha_hat] * 2), (scope, noise, sign_zero)
        assert m["acpo/rl_below_eps"].tolist() == [1.0, 1.0]
    # just above ε the sign is taken as it is
    _, m, _, _ = run("acpo", [(-10.0, -10.0, -12.0 + 20 * noise, -12.0, 20, 25)], alpha_scope=scope)
    assert m["acpo/alpha_hat"].item() == approx(0.95 if noise < 0 else 0.3)


@pytest.mark.pure
def test_acpo_variant_delta_in_logratio_units():
    loss, m, _, _ = run("acpo", [CANONICAL], delta_units="logratio")
    assert (m["acpo/tau"].item(), m["acpo/alpha_raw"].item()) == approx((0.45, 1.1666667))
    assert (m["acpo/alpha_hat"].item(), loss.item()) == approx((0.95, 0.5190620))


@pytest.mark.pure
def test_acpo_variant_static_tau():
    loss, m, _, _ = run("acpo", [CANONICAL], tau="static")
    assert (m["acpo/alpha_raw"].item(), m["acpo/alpha_hat"].item()) == approx((0.0, 0.3))
    assert loss.item() == approx(0.6026529)


ABC = [ACPO_CASES[c][0] for c in "ABC"]


@pytest.mark.pure
def test_acpo_alpha_scope_over_abc():
    pair_loss_, _, _, _ = run("acpo", ABC)
    assert pair_loss_.mean().item() == approx(0.3732197)

    batch_loss, m, _, g_l = run("acpo", ABC, alpha_scope="batch")
    assert batch_loss.tolist() == approx([0.5190620, 0.0868362, 0.2107230])
    assert batch_loss.mean().item() == approx(0.2722070)
    assert m["acpo/tau"].tolist() == approx([2.1666667] * 3)
    assert m["acpo/alpha_raw"].tolist() == approx([1.6363636] * 3)
    assert m["acpo/alpha_hat"].tolist() == approx([0.95] * 3)

    # A3: τ_batch = 2.1666667 with per-pair α. B turns interior, where u = r_w − α*·r_l = τ exactly;
    # A and C clip at 0.95 (u = r_w + 0.95·|r_l|).
    hybrid_loss, m, _, _ = run("acpo", ABC, alpha_scope="hybrid")
    tau = 0.1 * 65 / 3
    expected = [0.5190620, math.log1p(math.exp(-tau)), math.log1p(math.exp(-(0.5 + 0.95)))]
    assert hybrid_loss.tolist() == approx(expected)
    assert m["acpo/alpha_raw"][1].item() == approx((0.5 - tau) / -2.0)


@pytest.mark.pure
def test_acpo_equivalences_with_dpo_and_dpo_shift():
    # window [0, 1] on A: α̂ = 1, i.e. DPO
    acpo_loss, _, acpo_g_w, acpo_g_l = run("acpo", [CANONICAL], clip_lo=0.0, clip_hi=1.0)
    dpo_loss, _, dpo_g_w, dpo_g_l = run("dpo", [CANONICAL])
    torch.testing.assert_close((acpo_loss, acpo_g_w, acpo_g_l), (dpo_loss, dpo_g_w, dpo_g_l), rtol=0, atol=1e-12)
    # default window on A: α̂ = 0.95, i.e. DPO-Shift(0.95), §13.1 row
    acpo_loss, _, acpo_g_w, acpo_g_l = run("acpo", [CANONICAL])
    shift = dpo_shift([CANONICAL], beta=0.1, lam=0.95)
    torch.testing.assert_close((acpo_loss, acpo_g_w, acpo_g_l), shift, rtol=0, atol=1e-12)
    assert (shift[0].item(), shift[1].item(), shift[2].item()) == approx((0.5190620, -0.0404922, 0.0384675))


@pytest.mark.pure
@pytest.mark.parametrize("scope", ["pair", "batch"])
def test_acpo_alpha_one_ablation_is_dpo(scope):
    rows = random_rows(16, seed=1)
    acpo_out = run("acpo", rows, alpha_one=True, alpha_scope=scope)
    dpo_out = run("dpo", rows)
    torch.testing.assert_close(acpo_out[0], dpo_out[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(acpo_out[2:], dpo_out[2:], rtol=0, atol=1e-12)
    assert (acpo_out[1]["acpo/alpha_hat"] == 1).all()


@pytest.mark.pure
@pytest.mark.parametrize("scope", ["pair", "batch", "hybrid"])
def test_acpo_gradient_is_eq14_closed_form(scope):
    # rewards near the target so that many α̂ are interior, where a non-detached α̂ would change the gradient
    g = torch.Generator().manual_seed(0)
    n = 64
    r_w = torch.rand(n, generator=g, dtype=F64) * 2
    r_l = -torch.rand(n, generator=g, dtype=F64) * 2
    rows = [(r_w[i].item() * 10, 0.0, r_l[i].item() * 10, 0.0, 5.0, 5.0) for i in range(n)]  # β = 0.1, τ_i = 1
    rows[0] = (1.0, 0.0, 1.0, 0.0, 5.0, 5.0)  # r_l > 0 and a pair near r_l = 0 exercise the other regimes
    rows[1] = (1.0, 0.0, 1e-5, 0.0, 5.0, 5.0)
    loss, m, g_w, g_l = run("acpo", rows, alpha_scope=scope, clip_lo=0.0, clip_hi=1.0)
    alpha = m["acpo/alpha_hat"]
    interior = (alpha > 0) & (alpha < 1)
    if scope != "batch":
        assert interior.sum() >= 10, "test data must exercise interior α̂"
        # interior α̂ solves r_w − α̂·r_l = τ (Eq. 10)
        torch.testing.assert_close(m["acpo/effective_margin"][interior], m["acpo/tau"][interior])
    else:
        assert interior.all(), "test data must give an interior batch α"
    one_minus_sig = 1 - torch.sigmoid(m["acpo/effective_margin"])
    torch.testing.assert_close(g_w, -0.1 * one_minus_sig, rtol=0, atol=1e-12)
    torch.testing.assert_close(g_l, 0.1 * alpha * one_minus_sig, rtol=0, atol=1e-12)
    torch.testing.assert_close(loss, -F.logsigmoid(m["acpo/effective_margin"]), rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------ every registered objective
# cw_dpo: ln 2, but easy negatives get w_c -> 0 by design, so their fp32 push underflows to 0 (advanced tests)
STEP0 = [(name, {}) for name in DPO_LIKE if name != "cw_dpo"] + [
    ("beta_dpo", {"rho": 0.0}),
    ("dpo", {"label_smoothing": 0.1}),
    ("acpo", {"alpha_scope": "batch"}),
    ("acpo", {"alpha_scope": "hybrid", "clip_lo": 0.0, "clip_hi": 1.0}),
    ("acpo", {"sign_zero": 1, "delta_units": "logratio"}),
]


@pytest.mark.pure
@pytest.mark.parametrize("name,hparams", STEP0)
def test_step0_policy_equals_reference_gives_ln2(name, hparams):
    loss, _, g_w, g_l = run(name, random_rows(32, seed=2, same_policy_as_reference=True), dtype=torch.float32,
                            **hparams)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, torch.full_like(loss, LN2), rtol=0, atol=1e-7)
    assert (g_w < 0).all() and (g_l > 0).all(), "step 0 must push chosen up and rejected down"


@pytest.mark.pure
@pytest.mark.parametrize("name", [n for n in PAIR_OBJECTIVES if n != "aspo"])  # aspo: test_aspo_contract
def test_loss_fn_contract(name):
    """[B] loss with grad, [B] detached metric samples, defaults constructible, needs_reference honest."""
    rows = random_rows(5, seed=3)
    logps = make_logps(rows)
    if not OBJECTIVES[name].needs_reference(OBJECTIVES[name].config_cls()):
        logps.ref_chosen_logps = logps.ref_rejected_logps = None
    loss, metrics = OBJECTIVES[name].loss_fn(logps, OBJECTIVES[name].config_cls())
    assert loss.shape == (5,) and loss.requires_grad and torch.isfinite(loss).all()
    for key, value in metrics.items():
        assert value.shape == (5,) and not value.requires_grad, key
    assert all(isinstance(v, float) for v in summarize_metrics(metrics).values())


@pytest.mark.pure
@pytest.mark.parametrize("name", DPO_LIKE)
def test_standard_trl_metrics(name):
    rows = [CANONICAL, (-5, -10, -30, -10, 5, 7)]
    _, m, _, _ = run(name, rows)
    assert set(TRL_KEYS) <= set(m)
    assert m["rewards/chosen"].tolist() == approx([0.1, 0.5])
    assert m["rewards/rejected"].tolist() == approx([-0.3, -2.0])
    assert m["rewards/margins"].tolist() == approx([0.4, 2.5])
    assert m["rewards/accuracies"].tolist() == [1.0, 1.0]
    assert m["logps/chosen"].tolist() == [-10.0, -5.0] and m["logps/rejected"].tolist() == [-15.0, -30.0]
    assert m["lengths/chosen"].tolist() == [20.0, 5.0] and m["lengths/rejected"].tolist() == [25.0, 7.0]
    # chosen lost ground, then a tie (r_w == r_l): accuracy counts strict wins only (TRL)
    _, m, _, _ = run(name, [(-12.0, -11.0, -11.0, -12.0, 3, 3), (-10.0, -11.0, -11.0, -12.0, 3, 3)])
    assert m["rewards/accuracies"].tolist() == [0.0, 0.0]


@pytest.mark.pure
@pytest.mark.parametrize("name", PAIR_OBJECTIVES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_policy_logps_raise(name, bad):
    logps = make_logps([CANONICAL, CANONICAL])
    logps.policy_chosen_logps = torch.tensor([-1.0, bad], dtype=F64)
    with pytest.raises(ValueError, match="policy_chosen_logps"):
        OBJECTIVES[name].loss_fn(logps, OBJECTIVES[name].config_cls())


@pytest.mark.pure
@pytest.mark.parametrize("name", PREFERENCE)
def test_reference_inputs_are_checked(name):
    logps = make_logps([CANONICAL])
    logps.ref_rejected_logps = torch.tensor([float("nan")], dtype=F64)
    with pytest.raises(ValueError, match="ref_rejected_logps"):
        OBJECTIVES[name].loss_fn(logps, OBJECTIVES[name].config_cls())
    logps.ref_rejected_logps = None
    with pytest.raises(ValueError, match="ref_rejected_logps"):
        OBJECTIVES[name].loss_fn(logps, OBJECTIVES[name].config_cls())


@pytest.mark.pure
@pytest.mark.parametrize("name", PAIR_OBJECTIVES)
def test_mis_shaped_inputs_raise(name):
    # a [B, 1] length next to [B] log-probs would silently broadcast the loss to [B, B]
    logps = make_logps([CANONICAL, CANONICAL])
    logps.chosen_lengths = logps.chosen_lengths[:, None]
    with pytest.raises(ValueError, match="chosen_lengths"):
        OBJECTIVES[name].loss_fn(logps, OBJECTIVES[name].config_cls())


@pytest.mark.pure
def test_sft_is_per_token_nll_of_chosen_and_ignores_the_rest():
    pol_w = torch.tensor([-10.0, -3.0], dtype=F64, requires_grad=True)
    pol_l = torch.tensor([float("nan"), 1e9], dtype=F64, requires_grad=True)
    lengths = torch.tensor([20, 0])  # int lengths; the empty response is clamped to 1 (§0.4)
    loss, summary = pair_loss("sft", pol_w, pol_l, None, None, lengths, lengths)
    assert loss.tolist() == approx([0.5, 3.0])
    g_w, g_l = torch.autograd.grad(loss.sum(), [pol_w, pol_l], allow_unused=True)
    assert g_w.tolist() == approx([-1 / 20, -1.0])
    assert g_l is None
    assert summary == approx({"sft/nll": 1.75, "logps/chosen": -6.5, "lengths/chosen": 10.0})


# --------------------------------------------------------------------------------------- configs and registry
@pytest.mark.pure
@pytest.mark.parametrize("name,params,field", [
    ("dpo", {"beta": 0.0}, "dpo.beta"),
    ("dpo", {"beta": -1.0}, "dpo.beta"),
    ("dpo", {"label_smoothing": 0.5}, "dpo.label_smoothing"),
    ("acpo", {"beta": -1.0}, "acpo.beta"),
    ("acpo", {"eps": 0.0}, "acpo.eps"),
    ("acpo", {"delta": -0.1}, "acpo.delta"),
    ("acpo", {"clip_lo": 0.9, "clip_hi": 0.3}, r"acpo.clip_lo/clip_hi: empty clip window \[0.9, 0.3\]"),
    ("acpo", {"clip_hi": 95.0}, "acpo.clip_lo/clip_hi"),
    ("acpo", {"alpha_scope": "global"}, "acpo.alpha_scope"),
    ("acpo", {"delta_units": "nats"}, "acpo.delta_units"),
    ("acpo", {"tau": "fixed"}, "acpo.tau"),
    ("acpo", {"sign_zero": 0}, "acpo.sign_zero"),
    ("acpo", {"alpha_scope": "hybrid", "tau": "static"}, "acpo.alpha_scope"),
])
def test_config_validation_names_the_field(name, params, field):
    with pytest.raises(ValueError, match=field):
        build_objective_config(name, params)


@pytest.mark.pure
def test_build_objective_config():
    cfg = build_objective_config("acpo", {"beta": 0.2, "alpha_scope": "batch"})
    assert (cfg.beta, cfg.alpha_scope, cfg.clip_lo, cfg.clip_hi, cfg.sign_zero) == (0.2, "batch", 0.3, 0.95, -1)
    with pytest.raises(ValueError, match=r"objective 'acpo' has no hyper-parameter 'betta'; known: \[.*'beta'"):
        build_objective_config("acpo", {"betta": 0.1})
    with pytest.raises(ValueError, match="unknown objective 'dpp'"):
        build_objective_config("dpp", {})
    assert OBJECTIVES["sft"].needs_reference(None) is False


@pytest.mark.pure
def test_summarize_metrics():
    samples = {
        "acpo/alpha_hat": torch.tensor([0.3, 0.95, 0.5, 0.95]),
        "acpo/alpha_raw": torch.tensor([1e5, -1e5, 2.0, 0.5], dtype=F64),
        "acpo/at_lo": torch.tensor([1.0, 0.0, 0.0, 0.0]),
        "acpo/tau": torch.tensor([1.0, 2.0, 3.0, 4.0]),
        "rewards/chosen": torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=F64),
    }
    alpha = torch.tensor([0.3, 0.95, 0.5, 0.95], dtype=torch.float32).double()
    assert summarize_metrics(samples) == approx({
        "acpo/alpha_hat_mean": alpha.mean().item(), "acpo/alpha_hat_std": alpha.std(correction=0).item(),
        "acpo/alpha_hat_min": alpha.min().item(), "acpo/alpha_hat_max": alpha.max().item(),
        "acpo/alpha_raw_median": 0.5, "acpo/frac_at_lo": 0.25, "acpo/tau_mean": 2.5, "rewards/chosen": 0.25,
    })
    assert summarize_metrics({"acpo/alpha_hat": torch.tensor([0.5])})["acpo/alpha_hat_std"] == 0.0
    assert summarize_metrics({}) == {}


@pytest.mark.pure
def test_pair_loss_functional_without_process_group():
    logps = make_logps(ABC)
    per_pair, summary = pair_loss("acpo", *list(vars(logps).values())[:6], beta=0.1, alpha_scope="batch")
    assert per_pair.shape == (3,) and per_pair.requires_grad
    assert per_pair.detach().tolist() == approx([0.5190620, 0.0868362, 0.2107230])
    assert summary["acpo/alpha_hat_mean"] == approx(0.95) and summary["acpo/alpha_raw_median"] == approx(1.6363636)
    assert summary["acpo/tau_mean"] == approx(2.1666667) and summary["acpo/frac_at_hi"] == 1.0
    assert {"acpo/alpha_raw", "acpo/at_lo", "acpo/tau"}.isdisjoint(summary)
    assert set(TRL_KEYS) <= set(summary)
    assert summary["rewards/margins"] == approx((0.4 + 2.5 + 1.5) / 3)


@pytest.mark.pure
def test_reduce_helpers_without_group():
    t = torch.arange(3.0)
    out = all_reduce_sum(t, None)
    out += 1  # must be a copy: callers reduce in place-free style on statistics they still use
    assert t.tolist() == [0.0, 1.0, 2.0]
    assert all_gather_cat(t, None) is t


# ------------------------------------------------------------------------------------- 2 ranks, gloo, FileStore
# rank 0 holds {A, B}, rank 1 holds {C, D'}; the global batch α* (0.930) is interior and differs from both
# rank-local ones, so ignoring the group changes the per-pair losses
TWO_RANK_ROWS = ABC + [(-2, -20, -30, -20, 2, 2)]
SCOPES = ("batch", "hybrid")


def _two_rank_worker(rank, store_path, expected):
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, 2)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2, timeout=timedelta(seconds=60))
    try:
        group = dist.group.WORLD
        mine = slice(2 * rank, 2 * rank + 2)
        for scope in SCOPES:
            loss, m, g_w, g_l = run("acpo", TWO_RANK_ROWS[mine], group=group, alpha_scope=scope)
            exp_loss, exp_alpha, exp_g_w, exp_g_l = expected[scope]
            torch.testing.assert_close(loss, exp_loss[mine], rtol=0, atol=1e-12)
            torch.testing.assert_close(m["acpo/alpha_hat"], exp_alpha[mine], rtol=0, atol=1e-12)
            torch.testing.assert_close((g_w, g_l), (exp_g_w[mine], exp_g_l[mine]), rtol=0, atol=1e-12)
            torch.testing.assert_close(all_gather_cat(loss, group), exp_loss, rtol=0, atol=1e-12)
        assert all_reduce_sum(torch.tensor([rank + 1.0]), group).item() == 3.0
        with pytest.raises(ValueError, match=r"equal shapes.*\[\(1,\), \(2,\)\]"):
            all_gather_cat(torch.zeros(rank + 1), group)
    finally:
        dist.destroy_process_group()


@pytest.mark.multirank
def test_acpo_batch_scope_across_two_ranks(tmp_path):
    expected = {}
    for scope in SCOPES:
        loss, m, g_w, g_l = run("acpo", TWO_RANK_ROWS, alpha_scope=scope)
        expected[scope] = (loss, m["acpo/alpha_hat"], g_w, g_l)
        halves = torch.cat([run("acpo", TWO_RANK_ROWS[i:i + 2], alpha_scope=scope)[0] for i in (0, 2)])
        assert not torch.allclose(halves, loss), "rank-local statistics must differ for the test to mean anything"
    assert 0.3 < expected["batch"][1][0].item() < 0.95
    mp.spawn(_two_rank_worker, args=(str(tmp_path / "store"), expected), nprocs=2, join=True)
