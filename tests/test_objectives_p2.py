"""Pure-math tests of P2-DPO against OBJECTIVES.md §13.5, float64: values, autograd gradients, step 0, per-sample
branch masks, the global masked mean, their metric summary, and input/config validation."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from megatron_po.data.p2_records import keep_pair
from megatron_po.objectives import OBJECTIVES, build_objective_config, pair_loss, summarize_metrics
from megatron_po.objectives import p2_dpo
from megatron_po.objectives.p2_dpo import P2DPOConfig, P2Logps

pytestmark = pytest.mark.pure

F64 = torch.float64
LN2 = math.log(2)
NAN = float("nan")
TOL = 1e-6  # the spec's 7-decimal values; closed-form checks use 1e-12

# §13.5 inputs, one sample
FOCUS = (-10.0, -15.0, -11.0, -12.0)  # pol_w, pol_l, ref_w, ref_l (canonical pair)
CALIB = (-10.0, -13.0, -14.0, -15.0)  # logπ_θ(y_w^f|aug), logπ_θ(y_w^f|deg), logπ_ref(y_l^f|aug), logπ_ref(y_l^f|deg)
ROBUST = (-8.0, -12.0, -9.0, -11.0)   # pol_w, pol_l, ref_w, ref_l under I_noise
CLIP = (0.30, 0.28)                   # CLIPScore(P, I_crop), CLIPScore(P, I)
POLICY_FIELDS = ("policy_focus_chosen_logps", "policy_focus_rejected_logps", "policy_calib_aug_logps",
                 "policy_calib_deg_logps", "policy_robust_chosen_logps", "policy_robust_rejected_logps")
REF_FIELDS = ("ref_focus_chosen_logps", "ref_focus_rejected_logps", "ref_calib_aug_logps", "ref_calib_deg_logps",
              "ref_robust_chosen_logps", "ref_robust_rejected_logps")


def make(focus=(FOCUS,), calib=(CALIB,), robust=(ROBUST,), clip=(CLIP,), has_focus=None, has_robust=None,
         ref_requires_grad=False):
    """Rows per sample -> P2Logps of leaf float64 tensors; None drops a whole branch."""

    def cols(rows, n):
        if rows is None:
            return (None,) * n
        return tuple(torch.tensor(c, dtype=F64) for c in zip(*rows))

    f, c, r, s = cols(focus, 4), cols(calib, 4), cols(robust, 4), cols(clip, 2)
    logps = P2Logps(
        policy_focus_chosen_logps=f[0], policy_focus_rejected_logps=f[1],
        ref_focus_chosen_logps=f[2], ref_focus_rejected_logps=f[3],
        policy_calib_aug_logps=c[0], policy_calib_deg_logps=c[1],
        ref_calib_aug_logps=c[2], ref_calib_deg_logps=c[3],
        policy_robust_chosen_logps=r[0], policy_robust_rejected_logps=r[1],
        ref_robust_chosen_logps=r[2], ref_robust_rejected_logps=r[3],
        clip_crop_score=s[0], clip_image_score=s[1],
        has_focus=None if has_focus is None else torch.tensor(has_focus),
        has_robust=None if has_robust is None else torch.tensor(has_robust),
    )
    grad_fields = POLICY_FIELDS + (REF_FIELDS + ("clip_crop_score", "clip_image_score") if ref_requires_grad else ())
    for name in grad_fields:
        t = getattr(logps, name)
        if t is not None:
            t.requires_grad_()
    return logps


def run(logps, **hparams):
    """loss_fn -> (per-sample loss, samples, {policy field: d(Σ loss)/d field})."""
    loss, samples = p2_dpo.loss_fn(logps, P2DPOConfig(**hparams))
    names = [n for n in POLICY_FIELDS if getattr(logps, n) is not None]
    grads = torch.autograd.grad(loss.sum(), [getattr(logps, n) for n in names])
    return loss.detach(), samples, dict(zip(names, grads))


def close(actual, expected, tol=TOL):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=F64), torch.as_tensor(expected, dtype=F64),
                               rtol=0, atol=tol)


# ------------------------------------------------------------------------------------------------ §13.5 values
def test_values_13_5():
    loss, s, _ = run(make())
    close(s["p2/focus_loss"], [0.5130153])
    close(s["p2/calib_logit"], [0.2])
    close(s["p2/calib_loss"], [0.5981389])
    close(s["p2/robust_loss"], [0.5981389])
    close(s["p2/w_focus"], [0.6226715])
    close(s["p2/w_robust"], [0.3773285])
    close(s["p2/focus_loss"] + 0.3 * s["p2/calib_loss"], [0.6924569])  # L_focus
    close(loss, [0.6568680])
    close(s["p2/focus_logit"], [0.4])
    close(s["p2/robust_logit"], [0.2])
    close(s["p2/calib_gain_policy"], [3.0])
    assert s["pair_weight"].tolist() == [1.0]
    assert s["p2/focus_accuracy"].tolist() == s["p2/robust_accuracy"].tolist() == [1.0]
    assert all(not v.requires_grad and v.shape == (1,) for v in s.values())


def test_ddw_13_5():
    w_f, w_r, r = p2_dpo.ddw_weights(torch.tensor([0.30], dtype=F64), torch.tensor([0.28], dtype=F64), P2DPOConfig())
    close(r, [1.0714286])
    close(w_f - 0.5, [0.1226715])  # α
    close(torch.cat([w_f, w_r]), [0.6226715, 0.3773285])


@pytest.mark.parametrize("crop, image, expected", [
    (0.2, 0.3, (0.6666667, -0.1994916, 0.3005084, 0.6994916)),
    (0.28, 0.28, (1.0, 0.0, 0.5, 0.5)),
    (0.4, 0.28, (1.4285714, 0.1999242, 0.6999242, 0.3000758)),
])
def test_ddw_rows_13_5(crop, image, expected):
    w_f, w_r, r = p2_dpo.ddw_weights(torch.tensor([crop], dtype=F64), torch.tensor([image], dtype=F64),
                                     P2DPOConfig())
    close(torch.cat([r, w_f - 0.5, w_f, w_r]), expected)
    # and the weights the loss applies
    _, s, _ = run(make(clip=((crop, image),)))
    close(torch.cat([s["p2/w_focus"], s["p2/w_robust"]]), expected[2:])


def test_ddw_weights_stay_in_band():
    ratio = torch.logspace(-3, 3, 101, dtype=F64)
    w_f, w_r, _ = p2_dpo.ddw_weights(ratio, torch.ones_like(ratio), P2DPOConfig())
    assert ((w_f >= 0.3) & (w_f <= 0.7)).all() and torch.equal(w_f + w_r, torch.ones_like(w_f))
    # CLIPScore(P, I) <= 0 is floored at eps: the ratio explodes and α saturates, no inf/NaN
    w_f, _, r = p2_dpo.ddw_weights(torch.tensor([0.3, 0.3], dtype=F64), torch.tensor([0.0, -0.1], dtype=F64),
                                   P2DPOConfig())
    close(r, [0.3e8, 0.3e8], tol=1e-3)
    close(w_f, [0.7, 0.7], tol=1e-12)


def test_calib_alternative_reading_13_5():
    # P2-1 "chosen": the caller feeds logπ_ref(y_w^f|aug) = −10.5, logπ_ref(y_w^f|deg) = −12.0
    logps = make(calib=((-10.0, -13.0, -10.5, -12.0),))
    _, s, _ = run(logps, calib_reference="chosen")
    close(s["p2/calib_loss"], [0.6209570])
    close(s["p2/calib_logit"], [0.15])


def test_gradients_13_5():
    loss, s, g = run(make())
    close(g["policy_calib_aug_logps"], [-0.0084092])
    close(g["policy_calib_deg_logps"], [0.0084092])
    # closed form for every policy input: weights are constants, ∂(−log σ(z))/∂z = −σ(−z)
    beta, lam, w_f, w_r = 0.1, 0.3, s["p2/w_focus"], s["p2/w_robust"]
    g_focus = w_f * beta * torch.sigmoid(-s["p2/focus_logit"])
    g_calib = w_f * lam * beta * torch.sigmoid(-s["p2/calib_logit"])
    g_robust = w_r * beta * torch.sigmoid(-s["p2/robust_logit"])
    expected = {
        "policy_focus_chosen_logps": -g_focus, "policy_focus_rejected_logps": g_focus,
        "policy_calib_aug_logps": -g_calib, "policy_calib_deg_logps": g_calib,
        "policy_robust_chosen_logps": -g_robust, "policy_robust_rejected_logps": g_robust,
    }
    for name, value in expected.items():
        close(g[name], value, tol=1e-12)


def test_gradients_never_reach_reference_or_clip():
    logps = make(ref_requires_grad=True)
    loss, _ = p2_dpo.loss_fn(logps, P2DPOConfig())
    frozen = [getattr(logps, n) for n in (*REF_FIELDS, "clip_crop_score", "clip_image_score")]
    assert all(g is None for g in torch.autograd.grad(loss.sum(), frozen, allow_unused=True))


# ------------------------------------------------------------------------------------------------ step 0
def step0_logps(ref_calib):
    """policy == reference in every forward; ref of y_w^f gains 1.5 nats aug vs deg, y_l^f gains 1.0."""
    focus = ((-11.0, -12.0, -11.0, -12.0),)
    robust = ((-9.0, -11.0, -9.0, -11.0),)
    return make(focus=focus, calib=((-10.5, -12.0, *ref_calib),), robust=robust)


def test_step0_default_reading():
    loss, s, g = run(step0_logps(ref_calib=(-14.0, -15.0)))
    w_f, w_r = 0.6226715, 0.3773285
    # both DPO branches are exactly ln 2 with gradient ±β/2 per unit weight
    close(s["p2/focus_loss"], [LN2], tol=1e-15)
    close(s["p2/robust_loss"], [LN2], tol=1e-15)
    close(g["policy_focus_chosen_logps"], [-w_f * 0.05])
    close(g["policy_robust_rejected_logps"], [w_r * 0.05])
    # the calibration term is NOT ln 2: its logit is β·(G_ref(y_w^f) − G_ref(y_l^f)) = 0.1·(1.5 − 1.0)
    close(s["p2/calib_logit"], [0.05], tol=1e-12)
    calib0 = F.softplus(torch.tensor(-0.05, dtype=F64)).item()
    close(s["p2/calib_loss"], [calib0], tol=1e-12)
    assert abs(calib0 - LN2) > 0.02
    close(loss, [w_f * (LN2 + 0.3 * calib0) + w_r * LN2])


def test_step0_alternative_reading_is_ln2_everywhere():
    # "chosen" reading: the reference calibration forwards score y_w^f, which equal the policy's at step 0
    loss, s, g = run(step0_logps(ref_calib=(-10.5, -12.0)), calib_reference="chosen")
    close(s["p2/calib_logit"], [0.0], tol=0)
    close(s["p2/calib_loss"], [LN2], tol=1e-15)
    w_f = s["p2/w_focus"]
    close(loss, (1 + 0.3 * w_f) * LN2, tol=1e-12)  # w_f(1 + λ)·ln2 + w_r·ln2 with w_f + w_r = 1
    close(g["policy_calib_aug_logps"], -w_f * 0.3 * 0.05, tol=1e-12)


# ------------------------------------------------------------------------------------------------ branch masks
def mixed_batch():
    """4 samples: both branches, focus only, robust only, none; absent slots hold NaN placeholders."""
    nan4 = (NAN,) * 4
    return make(
        focus=(FOCUS, FOCUS, nan4, nan4),
        calib=(CALIB, CALIB, nan4, nan4),
        robust=(ROBUST, nan4, ROBUST, nan4),
        clip=(CLIP, (NAN, NAN), (NAN, NAN), (NAN, NAN)),
        has_focus=[True, True, False, False],
        has_robust=[True, False, True, False],
    )


def test_missing_branch_gets_exactly_its_branches_loss():
    loss, s, g = run(mixed_batch())
    focus_only = run(make(robust=None, clip=None))[0]
    robust_only = run(make(focus=None, calib=None, clip=None))[0]
    close(loss, [0.6568680, 0.6924569, 0.5981389, 0.0])
    assert loss[1] == focus_only[0] and loss[2] == robust_only[0]
    assert s["pair_weight"].tolist() == [1.0, 1.0, 1.0, 0.0]
    assert s["p2/has_focus"].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert s["p2/has_robust"].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert s["p2/single_branch"].tolist() == [0.0, 1.0, 1.0, 0.0]
    close(s["p2/w_focus"], [0.6226715, 1.0, 0.0, 0.0])
    close(s["p2/w_robust"], [0.3773285, 0.0, 1.0, 0.0])
    assert all(torch.isfinite(v).all() for v in s.values())
    # NaN placeholders get an exact zero gradient; present slots get the single-branch (weight 1) gradient
    for name, grad in g.items():
        assert torch.isfinite(grad).all(), name
    assert g["policy_focus_chosen_logps"][2:].tolist() == [0.0, 0.0]
    assert g["policy_robust_chosen_logps"][[1, 3]].tolist() == [0.0, 0.0]
    close(g["policy_calib_aug_logps"][1], -0.3 * 0.1 * torch.sigmoid(torch.tensor(-0.2, dtype=F64)), tol=1e-12)


def test_global_masked_mean_is_layout_invariant():
    """Σ loss / Σ pair_weight over all ranks (§0.2) equals the mean over samples that have a branch."""
    loss, s, _ = run(mixed_batch())
    full = loss.sum() / s["pair_weight"].sum()
    close(full, (0.6568680 + 0.6924569 + 0.5981389) / 3)
    # two "ranks" holding {0, 3} and {1, 2}: the sums add up, the local means would not
    halves = [(loss[i].sum(), s["pair_weight"][i].sum()) for i in ([0, 3], [1, 2])]
    close(sum(h[0] for h in halves) / sum(h[1] for h in halves), full, tol=1e-15)
    assert abs(sum(h[0] / h[1] for h in halves) / 2 - full) > 1e-3


def test_static_weights_without_ddw():
    loss, s, _ = run(make(clip=None), use_ddw=False)
    close(s["p2/w_focus"], [0.5], tol=0)
    close(loss, [0.5 * 0.6924569 + 0.5 * 0.5981389])


def test_no_calibration_ablation():
    loss, s, _ = run(make(calib=None), lambda_calib=0.0)
    close(loss, [0.6226715 * 0.5130153 + 0.3773285 * 0.5981389])
    assert s["p2/calib_loss"].tolist() == [0.0]


# ------------------------------------------------------------------------------------------------ metrics
def test_summarize_metrics_masks_branches():
    _, s, _ = run(mixed_batch())
    out = summarize_metrics(s)
    close(out["p2/focus_loss"], 0.5130153)      # over the 2 focus samples, not diluted by the 2 without
    close(out["p2/robust_loss"], 0.5981389)
    close(out["p2/calib_gain_policy"], 3.0, tol=1e-12)
    close(out["p2/frac_single_branch"], 2 / 3, tol=1e-12)
    close(out["p2/frac_focus"], 0.5, tol=0)
    close([out["p2/w_focus_mean"], out["p2/w_focus_min"], out["p2/w_focus_max"]], [0.6226715] * 3)
    close(out["p2/w_focus_std"], 0.0, tol=0)
    close(out["p2/calib_logit_mean"], 0.2, tol=1e-12)
    close(out["p2/frac_robust"], 0.5, tol=0)
    # no sample with both branches: the w_focus spread is left out rather than NaN
    _, s, _ = run(make(robust=None, clip=None))
    out = summarize_metrics(s)
    assert "p2/w_focus_mean" not in out and "p2/robust_loss" not in out
    assert all(math.isfinite(v) for v in out.values())


# ------------------------------------------------------------------------------------------------ §13.5 filter
@pytest.mark.parametrize("chosen_logp, rejected_logp, chosen_ppl, rejected_ppl, margin, keep", [
    (-0.2, -0.3, 1.8, 2.1, 0.1, True),
    (-0.2, -0.45, 1.8, 2.1, 0.25, False),
    (-0.2, -0.3, 1.8, 2.6, 0.1, False),
])
def test_pair_filter_13_5(chosen_logp, rejected_logp, chosen_ppl, rejected_ppl, margin, keep):
    t = lambda x: torch.tensor([x], dtype=F64)  # noqa: E731
    close(t(chosen_logp) - t(rejected_logp), [margin], tol=1e-12)
    assert keep_pair(t(chosen_logp), t(rejected_logp), t(chosen_ppl), t(rejected_ppl)).tolist() == [keep]


# ------------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("field, value", [
    ("beta", 0.0), ("lambda_calib", -0.1), ("calib_reference", "both"), ("use_ddw", 1), ("w_base", 0.0),
    ("alpha_max", -0.1), ("alpha_max", 0.6), ("tau_ddw", 0.0), ("ddw_eps", 0.0),
])
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"p2_dpo\.{field}"):
        P2DPOConfig(**{field: value})


def test_config_defaults():
    cfg = P2DPOConfig()
    assert (cfg.beta, cfg.lambda_calib, cfg.calib_reference, cfg.use_ddw) == (0.1, 0.3, "rejected", True)
    assert (cfg.w_base, cfg.alpha_max, cfg.tau_ddw, cfg.ddw_eps) == (0.5, 0.2, 0.1, 1e-8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.beta = 0.2


@pytest.mark.parametrize("change, message", [
    (dict(calib=None), "lambda_calib"),
    (dict(clip=None), "use_ddw"),
    (dict(robust=None, has_robust=[True]), "has_robust"),
    (dict(has_focus=[1]), "has_focus must be a bool"),
    (dict(focus=((NAN, -15.0, -11.0, -12.0),)), "non-finite.*policy_focus_chosen_logps"),
    (dict(clip=((0.3, float("inf")),)), "non-finite.*clip_image_score"),
    (dict(focus=None, calib=None, robust=None), "both are None"),
])
def test_input_errors(change, message):
    with pytest.raises(ValueError, match=message):
        p2_dpo.loss_fn(make(**change), P2DPOConfig())


def test_input_shape_error():
    logps = make()
    logps.ref_robust_rejected_logps = logps.ref_robust_rejected_logps[:, None]
    with pytest.raises(ValueError, match=r"ref_robust_rejected_logps must have shape \[B\]"):
        p2_dpo.loss_fn(logps, P2DPOConfig())


def test_registered_as_p2_inputs():
    entry = OBJECTIVES["p2_dpo"]
    assert entry.inputs == "p2" and entry.needs_reference(None) and entry.loss_fn is p2_dpo.loss_fn
    assert entry.global_stats is None and entry.next_state is None  # no batch statistics (§11)
    assert "TODO" not in p2_dpo.__doc__
    one = torch.zeros(1, dtype=F64)
    with pytest.raises(ValueError, match="takes 'p2' inputs"):
        pair_loss("p2_dpo", one, one, one, one, one, one)
    with pytest.raises(ValueError, match="'p2_dpo' does not take preference pairs"):
        build_objective_config("combo", {"weights": {"dpo": 1.0, "p2_dpo": 1.0}})
