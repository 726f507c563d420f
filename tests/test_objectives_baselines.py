"""Pure-math tests of the baseline objectives (IPO, SimPO, DPO-Shift, combo) against OBJECTIVES.md §13.1 (float64),
plus a contract test over every registered objective."""

import math

import pytest
import torch

from megatron_po.objectives import (
    OBJECTIVES,
    ObjectiveContext,
    PairLogps,
    build_objective,
    build_objective_config,
    objective_needs_reference,
    pair_loss,
)
from megatron_po.objectives.dpo_shift import shift_lambda

from objective_helpers import CANONICAL, F64, LN2, PAIR_OBJECTIVES, TRL_KEYS, columns, random_rows

pytestmark = pytest.mark.pure

# a config for every registered objective: the registry defaults, combo as RPO (DPO + SFT)
CONFIGS = {name: {} for name in OBJECTIVES} | {"combo": {"weights": {"dpo": 1.0, "sft": 0.5}}}
# a C above every negative's NLL opens SFT-C's gate, so the rejected response gets a gradient
CONFIGS["cw_sftc"] = {"c": 1e3}


def approx(expected):
    # spec values carry 7 decimals: 1e-6 covers their rounding
    return pytest.approx(expected, rel=1e-6, abs=1e-6)


def run(name, rows, ctx=None, drop_reference=False, **hparams):
    """pair_loss on rows -> (per-pair loss, summary, d(Σ loss)/d(pol_w), d(Σ loss)/d(pol_l)). Unlike
    objective_helpers.run (loss_fn, per-pair metric samples), this goes through the functional entry point and
    returns its batch summary."""
    args = columns(rows)
    if drop_reference:
        args = (args[0], args[1], None, None, *args[4:])
    loss, summary = pair_loss(name, *args, ctx=ctx, **hparams)
    # SFT leaves the rejected response out of the graph: its gradient is zero, not an error
    grads = torch.autograd.grad(loss.sum(), [args[0], args[1]], allow_unused=True)
    g_w, g_l = (torch.zeros_like(x) if g is None else g for g, x in zip(grads, args))
    return loss.detach(), summary, g_w, g_l


# ------------------------------------------------------------------------------------------------ §13.1 rows
# name, hparams -> (logit / margin metric, its value, loss, ∂L/∂pol_w, ∂L/∂pol_l)
ROWS_13_1 = {
    "ipo-sum": ("ipo", {"tau": 0.1, "reduction": "sum"}, "ipo/h", 4.0, 1.0, -2.0, 2.0),
    "ipo-mean": ("ipo", {"tau": 0.1, "reduction": "mean"}, "ipo/h", 0.17, 23.3289, -0.483, 0.3864),
    "simpo-2.0": ("simpo", {"beta": 2.0, "gamma_beta_ratio": 0.5}, "simpo/logits", -0.8, 1.1711007, -0.0689974,
                  0.0551980),
    "simpo-2.5": ("simpo", {"beta": 2.5, "gamma_beta_ratio": 0.55}, "simpo/logits", -1.125, 1.4061501, -0.0943644,
                  0.0754915),
    "dpo_shift-0.95": ("dpo_shift", {"beta": 0.1, "lam": 0.95}, None, None, 0.5190620, -0.0404922, 0.0384675),
}


@pytest.mark.parametrize("row", sorted(ROWS_13_1))
def test_spec_13_1_rows(row):
    name, hparams, metric, value, loss_ref, g_w_ref, g_l_ref = ROWS_13_1[row]
    loss, summary, g_w, g_l = run(name, [CANONICAL], drop_reference=name == "simpo", **hparams)
    assert loss.item() == approx(loss_ref)
    assert (g_w.item(), g_l.item()) == approx((g_w_ref, g_l_ref))
    if metric:
        assert summary[metric] == approx(value)


def test_ipo_default_is_trl_per_token_reading_and_rewards_follow_it():
    assert build_objective_config("ipo", {}).reduction == "mean"
    for reduction, (r_w, r_l) in {"mean": (0.1 / 20, -0.3 / 25), "sum": (0.1, -0.3)}.items():
        _, summary, _, _ = run("ipo", [CANONICAL], reduction=reduction)
        assert (summary["rewards/chosen"], summary["rewards/rejected"]) == approx((r_w, r_l))
        # margins = τ·h in either reading: the IPO optimum is at 1/2
        assert summary["rewards/margins"] == approx(0.1 * summary["ipo/h"])


def test_simpo_auxiliary_rewards_and_reference_is_ignored():
    loss, summary, _, _ = run("simpo", [CANONICAL], drop_reference=True, beta=2.0, gamma_beta_ratio=0.5)
    assert (summary["rewards/chosen"], summary["rewards/rejected"]) == approx((-1.0, -1.2))
    assert summary["logps/chosen"] == -10.0  # sums, like every objective's logps/*
    # reference values, even absurd ones, change nothing
    loss_ref, _, _, _ = run("simpo", [(-10.0, 1e6, -15.0, -1e6, 20, 25)], beta=2.0, gamma_beta_ratio=0.5)
    assert loss_ref.item() == loss.item()


def test_simpo_sft_weight_and_label_smoothing():
    beta, ratio, z = 2.0, 0.5, -0.8  # §13.1 SimPO(2.0) logit
    sig = 1 / (1 + math.exp(-z))
    loss, _, g_w, g_l = run("simpo", [CANONICAL], drop_reference=True, beta=beta, gamma_beta_ratio=ratio,
                            sft_weight=1.0)
    assert loss.item() == approx(1.1711007 + 0.5)  # + NLL = −ℓ̄_w = 10/20: TRL CPO-SimPO with cpo_alpha = 1
    assert (g_w.item(), g_l.item()) == approx((-0.0689974 - 1 / 20, 0.0551980))
    eps = 0.1
    loss, _, g_w, _ = run("simpo", [CANONICAL], drop_reference=True, beta=beta, gamma_beta_ratio=ratio,
                          label_smoothing=eps)
    assert loss.item() == approx(-(1 - eps) * math.log(sig) - eps * math.log(1 - sig))
    assert g_w.item() == approx(beta / 20 * (-(1 - eps) * (1 - sig) + eps * sig))


# ------------------------------------------------------------------------------------------ DPO-Shift schedules
@pytest.mark.parametrize("schedule,expected", [
    ("increase_linear", (0.95, 0.975, 1.0)),
    ("decrease_linear", (1.0, 0.975, 0.95)),
    ("fixed", (0.9, 0.9, 0.9)),
])
def test_dpo_shift_schedule_values(schedule, expected):
    cfg = build_objective_config("dpo_shift", {"schedule": schedule, "lam": 0.9, "lam_min": 0.95, "lam_max": 1.0})
    steps = (0, 500, 1000)
    assert [shift_lambda(cfg, ObjectiveContext(t, 1000)) for t in steps] == approx(list(expected))
    # the schedule reaches the loss and the metric: λ multiplies Δ_l = −3 inside β(Δ_w − λΔ_l)
    for t, lam in zip(steps, expected):
        loss, summary, g_w, g_l = run("dpo_shift", [CANONICAL], ctx=ObjectiveContext(t, 1000), schedule=schedule,
                                      lam=0.9, lam_min=0.95, lam_max=1.0)
        z = 0.1 * (1 + 3 * lam)
        assert loss.item() == approx(math.log1p(math.exp(-z)))
        assert g_l.item() == approx(0.1 * lam / (1 + math.exp(z)))
        assert summary["dpo_shift/lambda"] == approx(lam)


def test_dpo_shift_schedule_edges():
    cfg = build_objective_config("dpo_shift", {"schedule": "increase_linear", "lam_min": 0.5})
    assert shift_lambda(cfg) == 0.5  # no context = step 0
    assert shift_lambda(cfg, ObjectiveContext(5000, 1000)) == 1.0  # past the planned end: clamped, not > λ_max
    # λ = 1 at every step is DPO
    shift = run("dpo_shift", random_rows(8, seed=4), lam=1.0)
    dpo = run("dpo", random_rows(8, seed=4))
    torch.testing.assert_close(shift[0], dpo[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(shift[2:], dpo[2:], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="ObjectiveContext.total_steps"):
        ObjectiveContext(0, 0)
    with pytest.raises(ValueError, match="ObjectiveContext.step"):
        ObjectiveContext(-1, 10)


# ------------------------------------------------------------------------------------------------------ step 0
STEP0_LN2 = [
    ("dpo_shift", {}),
    ("dpo_shift", {"lam": 0.5}),
    ("dpo_shift", {"schedule": "increase_linear", "lam_min": 0.3}),
    ("combo", {"weights": {"dpo": 1.0}}),
    ("combo", {"weights": {"dpo": 0.5, "dpo_shift": 0.5}, "params": {"dpo_shift": {"lam": 0.8}}}),
]


@pytest.mark.parametrize("name,hparams", STEP0_LN2)
def test_step0_gives_ln2(name, hparams):
    loss, _, g_w, g_l = run(name, random_rows(16, seed=2, same_policy_as_reference=True),
                            ctx=ObjectiveContext(0, 100), **hparams)
    torch.testing.assert_close(loss, torch.full_like(loss, LN2), rtol=0, atol=1e-12)
    assert (g_w < 0).all() and (g_l > 0).all()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_ipo_step0_is_squared_target_not_ln2(reduction, tau):
    # IPO does not define its step-0 loss as ln 2: h = 0 gives (0 − 1/(2τ))², 25 at τ = 0.1
    loss, _, g_w, g_l = run("ipo", random_rows(16, seed=2, same_policy_as_reference=True), tau=tau,
                            reduction=reduction)
    torch.testing.assert_close(loss, torch.full_like(loss, (1 / (2 * tau)) ** 2), rtol=0, atol=1e-12)
    assert (g_w < 0).all() and (g_l > 0).all()


# -------------------------------------------------------------------------------------------- reference inputs
def test_reference_free_and_reference_objectives_with_ref_none():
    loss, summary, _, _ = run("simpo", random_rows(4, seed=5), drop_reference=True)
    assert loss.shape == (4,) and torch.isfinite(loss).all() and TRL_KEYS <= set(summary)
    for name in ("ipo", "dpo_shift", "combo"):
        with pytest.raises(ValueError, match=rf"objective '(ipo|dpo_shift|dpo)' needs ref_chosen_logps, got None"):
            run(name, random_rows(4, seed=5), drop_reference=True)


def test_objective_needs_reference():
    reference_free = {"sft", "simpo", "cw_sftc"}
    for name in OBJECTIVES:
        assert objective_needs_reference(name, build_objective_config(name, {})) is (name not in reference_free), name
        # the built objective carries the same answer, decided once
        assert build_objective(name, {}).needs_reference is (name not in reference_free), name
    for weights, expected in (({"dpo": 1.0, "sft": 0.5}, True), ({"simpo": 1.0, "sft": 0.5}, False)):
        cfg = build_objective_config("combo", {"weights": weights})
        assert objective_needs_reference("combo", cfg) is expected, weights
    # ... and such a combo runs without reference log-probs
    loss, summary, _, _ = run("combo", random_rows(4, seed=5), drop_reference=True, weights={"simpo": 1.0, "sft": 1.0})
    assert loss.shape == (4,) and {"combo/simpo_loss", "combo/sft_loss"} <= set(summary)
    with pytest.raises(ValueError, match="unknown objective 'dpp'"):
        objective_needs_reference("dpp", None)


# ------------------------------------------------------------------------------------------------------- combo
def test_combo_is_the_weighted_sum_of_its_terms():
    rows = random_rows(8, seed=6)
    combo_loss, combo_summary, combo_g_w, combo_g_l = run(
        "combo", rows, weights={"dpo": 1.0, "sft": 0.5}, params={"dpo": {"beta": 0.2}})
    dpo_loss, dpo_summary, dpo_g_w, dpo_g_l = run("dpo", rows, beta=0.2)
    sft_loss, sft_summary, sft_g_w, sft_g_l = run("sft", rows)
    torch.testing.assert_close(combo_loss, dpo_loss + 0.5 * sft_loss, rtol=0, atol=1e-12)
    torch.testing.assert_close(combo_g_w, dpo_g_w + 0.5 * sft_g_w, rtol=0, atol=1e-12)
    torch.testing.assert_close(combo_g_l, dpo_g_l + 0.5 * sft_g_l, rtol=0, atol=1e-12)
    assert combo_summary["combo/dpo_loss"] == approx(dpo_loss.mean().item())
    assert combo_summary["combo/sft_loss"] == approx(sft_loss.mean().item())
    assert {k: combo_summary[k] for k in dpo_summary} == approx(dpo_summary)
    assert combo_summary["sft/nll"] == approx(sft_summary["sft/nll"])


def test_combo_metric_clash_first_preference_term_wins():
    rows = [CANONICAL]
    # SFT listed first still does not own the TRL names; of the preference terms, the first listed wins
    _, summary, _, _ = run("combo", rows, weights={"sft": 1.0, "simpo": 1.0, "dpo": 1.0})
    _, simpo_summary, _, _ = run("simpo", rows)
    assert summary["rewards/chosen"] == approx(simpo_summary["rewards/chosen"])
    _, summary, _, _ = run("combo", rows, weights={"sft": 1.0, "dpo": 1.0, "simpo": 1.0})
    assert summary["rewards/chosen"] == approx(0.1)
    # passes the step context to its terms
    _, summary, _, _ = run("combo", rows, ctx=ObjectiveContext(1, 2), weights={"dpo_shift": 1.0},
                           params={"dpo_shift": {"schedule": "increase_linear", "lam_min": 0.5}})
    assert summary["dpo_shift/lambda"] == approx(0.75)


@pytest.mark.parametrize("params,match", [
    ({"weights": {"dpp": 1.0}}, r"combo.weights: unknown objective 'dpp'"),
    ({"weights": {"combo": 1.0}}, r"combo.weights: 'combo' cannot be a term"),
    ({"weights": {}}, r"combo.weights must map at least one objective"),
    ({"weights": {"dpo": 0.0}}, r"combo.weights\['dpo'\] must be a finite number > 0"),
    ({"weights": {"dpo": -1.0}}, r"combo.weights\['dpo'\]"),
    ({"weights": {"dpo": float("nan")}}, r"combo.weights\['dpo'\]"),
    ({"weights": {"dpo": "1"}}, r"combo.weights\['dpo'\]"),
    ({"weights": {"dpo": 1.0}, "params": {"dpo": {"betta": 0.1}}},
     r"combo.params\['dpo'\]: objective 'dpo' has no hyper-parameter 'betta'"),
    ({"weights": {"dpo": 1.0}, "params": {"dpo": {"beta": 0.0}}}, r"combo.params\['dpo'\]: dpo.beta must be > 0"),
    ({"weights": {"dpo": 1.0}, "params": {"sft": {}}}, r"combo.params\['sft'\]: 'sft' is not a term"),
    ({"weights": {"dpo": 1.0}, "params": {"dpo": 0.1}}, r"combo.params\['dpo'\] must be a dict"),
    ({"weights": {"dpo": 1.0}, "term_configs": {}}, r"objective 'combo' has no hyper-parameter 'term_configs'"),
])
def test_combo_config_errors_name_the_culprit(params, match):
    with pytest.raises(ValueError, match=match):
        build_objective_config("combo", params)


def test_combo_config_copies_its_inputs():
    weights = {"dpo": 1, "sft": 0.5}
    cfg = build_objective_config("combo", {"weights": weights, "params": {"dpo": {"beta": 0.3}}})
    weights["ipo"] = 1.0
    assert cfg.weights == {"dpo": 1.0, "sft": 0.5}
    assert cfg.term_configs["dpo"].beta == 0.3
    assert build_objective_config("combo", {}).weights == {"dpo": 1.0}


# ------------------------------------------------------------------------------------------- config validation
@pytest.mark.parametrize("name,params,field", [
    ("ipo", {"tau": 0.0}, "ipo.tau"),
    ("ipo", {"tau": -0.1}, "ipo.tau"),
    ("ipo", {"reduction": "token"}, "ipo.reduction"),
    ("simpo", {"beta": 0.0}, "simpo.beta"),
    ("simpo", {"gamma_beta_ratio": -0.5}, "simpo.gamma_beta_ratio"),
    ("simpo", {"sft_weight": -1.0}, "simpo.sft_weight"),
    ("simpo", {"label_smoothing": 0.5}, "simpo.label_smoothing"),
    ("dpo_shift", {"beta": 0.0}, "dpo_shift.beta"),
    ("dpo_shift", {"beta": -1.0}, "dpo_shift.beta"),
    ("dpo_shift", {"lam": 0.0}, "dpo_shift.lam "),
    ("dpo_shift", {"lam": 1.5}, "dpo_shift.lam "),
    ("dpo_shift", {"lam_max": 1.2}, "dpo_shift.lam_max"),
    ("dpo_shift", {"lam_min": 0.9, "lam_max": 0.5}, "dpo_shift.lam_min must be <= dpo_shift.lam_max"),
    ("dpo_shift", {"schedule": "cosine"}, "dpo_shift.schedule"),
    ("simpo", {"gamma": 0.5}, "objective 'simpo' has no hyper-parameter 'gamma'"),
])
def test_config_validation_names_the_field(name, params, field):
    with pytest.raises(ValueError, match=field):
        build_objective_config(name, params)


# ------------------------------------------------------------------------------------ every registered objective
def test_every_objective_is_covered():
    assert set(OBJECTIVES) == {"dpo", "acpo", "sft", "ipo", "simpo", "dpo_shift", "combo",
                               "beta_dpo", "cw_sftc", "cw_dpo", "aspo", "p2_dpo"}


# aspo needs per-sentence inputs: tests/test_objectives_advanced.py::test_aspo_contract
@pytest.mark.parametrize("name", [n for n in PAIR_OBJECTIVES if n != "aspo"])
def test_contract_over_every_objective(name):
    """Finite [B] loss, gradient into the policy, none into the reference, detached [B] metrics."""
    b = 6
    cfg = build_objective_config(name, CONFIGS[name])
    pol_w, pol_l, ref_w, ref_l, len_w, len_l = columns(random_rows(b, seed=7), ref_grad=True)
    logps = PairLogps(pol_w, pol_l, ref_w, ref_l, len_w, len_l)
    loss, metrics = OBJECTIVES[name].loss_fn(logps, cfg, None, ctx=ObjectiveContext(3, 10))
    assert loss.shape == (b,) and loss.dtype == F64 and torch.isfinite(loss).all()
    loss.sum().backward()
    assert pol_w.grad is not None and pol_w.grad.abs().sum() > 0
    if name != "sft":  # SFT reads only the chosen response
        assert pol_l.grad is not None and pol_l.grad.abs().sum() > 0
    for ref in (ref_w, ref_l):
        assert ref.grad is None or (ref.grad == 0).all(), "reference log-probs must receive no gradient"
    assert metrics
    for key, value in metrics.items():
        assert isinstance(value, torch.Tensor) and value.shape == (b,) and not value.requires_grad, key
        assert value.grad_fn is None, key
    if name not in ("sft", "cw_sftc"):  # SFT stages have no implicit rewards
        assert TRL_KEYS <= set(metrics)
    # None context = step 0, the same as passing it explicitly
    loss0, _ = OBJECTIVES[name].loss_fn(logps, cfg)
    loss0_explicit, _ = OBJECTIVES[name].loss_fn(logps, cfg, ctx=ObjectiveContext())
    torch.testing.assert_close(loss0, loss0_explicit, rtol=0, atol=0)
