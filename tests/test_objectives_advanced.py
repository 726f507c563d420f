"""Pure-math tests of β-DPO, CW-DPO (SFT-C and stage 2) and ASPO against OBJECTIVES.md §13.2, §13.4 and §13.6
(float64), micro-batch layout checks with the trainer's ``ctx.global_stats`` protocol, and one 2-rank gloo test of
β-DPO's all-gather."""

import itertools
import math
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from megatron_po.objectives import (
    OBJECTIVES,
    ObjectiveContext,
    PairLogps,
    build_objective_config,
    pair_loss,
    summarize_metrics,
)
from megatron_po.objectives import aspo, beta_dpo, cw_dpo

from objective_helpers import CANONICAL, F64, LN2, TRL_KEYS, columns, make_logps, random_rows, run


def approx(expected):
    # spec values carry 7 decimals (rounding error <= 5e-8)
    return pytest.approx(expected, rel=1e-7, abs=1e-7)


def margin_rows(margins):
    """Pairs whose unscaled margin Δ_w − Δ_l is exactly M_i (ref = 0, pol_l = 0)."""
    return [(float(m), 0.0, 0.0, 0.0, 10, 10) for m in margins]


# --------------------------------------------------------------------------------------------- β-DPO §13.2
M_13_2 = [4.0, 1.0, -2.0, 0.5]
STATE_13_2 = {"gap_mean": 0.5, "gap_std": 1.0}


@pytest.mark.pure
def test_beta_dpo_batch_statistics_13_2():
    cfg = build_objective_config("beta_dpo", {})
    m = torch.tensor(M_13_2, dtype=F64)
    assert (m.mean().item(), m.std().item()) == approx((0.875, 2.4622145))
    mu, s = beta_dpo.update_ema(cfg, STATE_13_2, m)
    assert (mu.item(), s.item()) == approx((0.5375, 1.1462214))
    assert beta_dpo.filter_weights(m, mu, s, cfg).tolist() == approx([0.0104349, 0.9218194, 0.0862552, 0.9994650])
    assert beta_dpo.num_kept(4, cfg) == 3
    assert beta_dpo.next_state(cfg, STATE_13_2, {"margin": m}) == approx({"gap_mean": 0.5375, "gap_std": 1.1462214})


def _masked_mean(loss, metrics):
    """The trainer's normalisation: Σ per-pair loss / Σ pair_weight (the global masked mean)."""
    return (loss.sum() / metrics["pair_weight"].sum()).item()


@pytest.mark.pure
def test_beta_dpo_rho0_keeps_all_13_2():
    ctx = ObjectiveContext(step=0, total_steps=10, state=STATE_13_2)
    loss, m, g_w, g_l = run("beta_dpo", margin_rows(M_13_2), ctx=ctx, rho=0.0)
    assert m["beta_dpo/beta_used"].tolist() == approx([0.12025] * 4)
    assert loss.tolist() == approx([0.4812927, 0.6348286, 0.8206099, 0.6635365])
    assert m["pair_weight"].tolist() == [1.0] * 4
    assert _masked_mean(loss, m) == approx(0.6500669)
    # β_used is detached: the gradient is DPO's at β = β_used
    one_minus_sig = 1 - torch.sigmoid(0.12025 * torch.tensor(M_13_2, dtype=F64))
    torch.testing.assert_close(g_w, -0.12025 * one_minus_sig, rtol=0, atol=1e-12)
    torch.testing.assert_close(g_l, 0.12025 * one_minus_sig, rtol=0, atol=1e-12)
    # TRL rewards at β_used, and the EMA the step commits
    assert m["rewards/chosen"].tolist() == approx([0.12025 * x for x in M_13_2])
    assert m["beta_dpo/gap_mean"].tolist() == approx([0.5375] * 4)
    assert m["beta_dpo/gap_std"].tolist() == approx([1.1462214] * 4)


@pytest.mark.pure
def test_beta_dpo_given_mask_13_2(monkeypatch):
    # drive the selection: S = {1, 2, 3} (0-based), as in the spec
    given = torch.tensor([0.0, 1.0, 1.0, 1.0], dtype=F64)
    monkeypatch.setattr(beta_dpo, "selection_mask", lambda weights, cfg, step: given.clone())
    ctx = ObjectiveContext(step=0, total_steps=10, state=STATE_13_2)
    loss, m, g_w, g_l = run("beta_dpo", margin_rows(M_13_2), ctx=ctx)
    assert m["beta_dpo/beta_used"][0].item() == approx(0.05775)
    assert loss.tolist() == approx([0.0, 0.6646890, 0.7525638, 0.6788139])
    assert m["pair_weight"].tolist() == m["beta_dpo/kept"].tolist() == given.tolist()
    assert g_w[0].item() == g_l[0].item() == 0.0, "a filtered pair must send no gradient"
    assert _masked_mean(loss, m) == approx(0.6986889)
    # documentation: the reference code's objective on 2 DP ranks holding {0, 1} and {2, 3} is the DDP average of
    # local masked means, which weighs pair 1 (alone on its rank) twice as much
    local = [loss[i:i + 2].sum() / m["pair_weight"][i:i + 2].sum() for i in (0, 2)]
    assert ((local[0] + local[1]) / 2).item() == approx(0.6901889)
    # ... and the same through the functional entry point
    _, summary = pair_loss("beta_dpo", *columns(margin_rows(M_13_2)), ctx=ctx)
    assert summary["beta_dpo/beta_used"] == approx(0.05775) and summary["beta_dpo/frac_kept"] == 0.75


@pytest.mark.pure
def test_beta_dpo_step0_is_ln2():
    rows = random_rows(32, seed=2, same_policy_as_reference=True)
    loss, m, g_w, g_l = run("beta_dpo", rows, dtype=torch.float32, rho=0.0)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, torch.full_like(loss, LN2), rtol=0, atol=1e-7)
    assert (g_w < 0).all() and (g_l > 0).all()
    # initial state: μ = s = 0, so the step-0 guard gives uniform weights and β_used = β0
    assert m["beta_dpo/beta_used"].tolist() == approx([0.1] * 32)
    assert m["beta_dpo/weight"].tolist() == [1.0] * 32
    # default ρ = 0.2: K = int(32·0.8) = 25 kept pairs at ln 2, the others 0
    loss, m, _, _ = run("beta_dpo", rows, dtype=torch.float32)
    kept = m["pair_weight"].bool()
    assert kept.sum().item() == 25
    torch.testing.assert_close(loss[kept], torch.full_like(loss[kept], LN2), rtol=0, atol=1e-7)
    assert (loss[~kept] == 0).all()


@pytest.mark.pure
def test_beta_dpo_state_carries_across_steps():
    cfg = build_objective_config("beta_dpo", {"rho": 0.25})
    assert beta_dpo.initial_state() == {"gap_mean": 0.0, "gap_std": 0.0}
    state = None
    for step in range(4):
        rows = random_rows(8, seed=10 + step)
        logps = make_logps(rows)
        ctx = ObjectiveContext(step=step, total_steps=4, state=state)
        _, m = beta_dpo.loss_fn(logps, cfg, ctx=ctx)
        committed = beta_dpo.next_state(cfg, state, beta_dpo.global_stats(logps, cfg))
        # the loss saw exactly the EMA the step commits, and the committed state is plain floats
        assert m["beta_dpo/gap_mean"][0].item() == committed["gap_mean"]
        assert m["beta_dpo/gap_std"][0].item() == committed["gap_std"]
        assert all(type(v) is float for v in committed.values())
        state = committed
    with pytest.raises(ValueError, match="beta_dpo state must hold"):
        beta_dpo.loss_fn(make_logps(random_rows(4, seed=1)), cfg, ctx=ObjectiveContext(state={"gap_mean": 0.0}))


@pytest.mark.pure
def test_beta_dpo_selection_is_seeded_per_step():
    cfg = build_objective_config("beta_dpo", {"rho": 0.5, "selection_seed": 3})
    w = torch.rand(64, generator=torch.Generator().manual_seed(0), dtype=F64)
    masks = [beta_dpo.selection_mask(w, cfg, step) for step in range(6)]
    assert all(mask.sum().item() == 32 for mask in masks)
    torch.testing.assert_close(beta_dpo.selection_mask(w, cfg, 2), masks[2], rtol=0, atol=0)  # reproducible
    assert any(not torch.equal(masks[0], mask) for mask in masks[1:]), "steps must draw different subsets"
    # the global RNG neither matters nor is consumed
    torch.manual_seed(123)
    before = torch.get_rng_state()
    torch.testing.assert_close(beta_dpo.selection_mask(w, cfg, 2), masks[2], rtol=0, atol=0)
    assert torch.equal(torch.get_rng_state(), before)
    other_seed = build_objective_config("beta_dpo", {"rho": 0.5, "selection_seed": 4})
    assert not torch.equal(beta_dpo.selection_mask(w, other_seed, 2), masks[2])
    # ρ = 0 keeps everything; fewer positive weights than K still draws K (zero weights last)
    assert beta_dpo.selection_mask(w, build_objective_config("beta_dpo", {"rho": 0.0}), 0).tolist() == [1.0] * 64
    sparse = torch.zeros(8, dtype=F64)
    sparse[[1, 5]] = 1.0
    mask = beta_dpo.selection_mask(sparse, build_objective_config("beta_dpo", {"rho": 0.5}), 0)
    assert mask.sum().item() == 4 and mask[1] == mask[5] == 1


@pytest.mark.pure
def test_beta_dpo_weights_are_sampled_by_weight():
    # multinomial without replacement draws one pair at a time with probability ∝ w among those left (the code's
    # torch.multinomial): the inclusion probability of each §13.2 pair in the 3 kept of 4, enumerated exactly
    cfg = build_objective_config("beta_dpo", {})
    w = [0.0104349, 0.9218194, 0.0862552, 0.9994650]
    inclusion = [0.0] * 4
    for order in itertools.permutations(range(4), 3):
        p, left = 1.0, sum(w)
        for i in order:
            p, left = p * w[i] / left, left - w[i]
        for i in order:
            inclusion[i] += p
    steps = 2000
    counts = torch.stack([beta_dpo.selection_mask(torch.tensor(w, dtype=F64), cfg, t) for t in range(steps)]).sum(0)
    for i in range(4):  # within 4 binomial standard deviations
        sd = math.sqrt(steps * inclusion[i] * (1 - inclusion[i]))
        assert abs(counts[i].item() - steps * inclusion[i]) <= 4 * sd + 1, (i, counts.tolist(), inclusion)


@pytest.mark.pure
def test_beta_dpo_guards():
    cfg = build_objective_config("beta_dpo", {})
    m = torch.zeros(4, dtype=F64)
    # all weights underflow (margins far from μ with a tiny s): uniform fallback instead of a multinomial error
    far = beta_dpo.filter_weights(torch.tensor([1e3, 2e3], dtype=F64), torch.tensor(0.0, dtype=F64),
                                  torch.tensor(1.0, dtype=F64), cfg)
    assert far.tolist() == [1.0, 1.0]
    assert beta_dpo.filter_weights(m, torch.tensor(0.0, dtype=F64), torch.tensor(0.0, dtype=F64), cfg).tolist() \
        == [1.0] * 4
    with pytest.raises(ValueError, match="at least 2 pairs"):
        run("beta_dpo", [CANONICAL])
    # β_used never drops below beta_min (a very negative kept margin)
    ctx = ObjectiveContext(state={"gap_mean": 50.0, "gap_std": 1.0})
    _, metrics, _, _ = run("beta_dpo", margin_rows([-5.0, -6.0]), ctx=ctx, rho=0.0)
    assert metrics["beta_dpo/beta_used"].tolist() == approx([1e-3, 1e-3])
    with pytest.raises(ValueError, match="ctx.pair_index"):
        run("beta_dpo", margin_rows([1.0, 2.0]), ctx=ObjectiveContext(global_stats={"margin": torch.zeros(2)}))


# ----------------------------------------------------------------------------------- layouts (no processes)
def _split_runs(name, rows, hparams, ctx_kwargs, split=2):
    """The trainer's protocol by hand: global_stats per micro-batch, concatenated in global order, then each
    micro-batch's loss with its pair_index. Returns per-pair losses, pol_w grads, pol_l grads (concatenated)."""
    cfg = build_objective_config(name, hparams)
    parts = [rows[i:i + split] for i in range(0, len(rows), split)]
    stats_parts = [OBJECTIVES[name].global_stats(make_logps(p), cfg) for p in parts]
    stats = {k: torch.cat([s[k] for s in stats_parts]) for k in stats_parts[0]}
    losses, g_ws, g_ls = [], [], []
    for i, part in enumerate(parts):
        ctx = ObjectiveContext(global_stats=stats, pair_index=torch.arange(i * split, i * split + len(part)),
                               **ctx_kwargs)
        loss, _, g_w, g_l = run(name, part, ctx=ctx, **hparams)
        losses.append(loss)
        g_ws.append(g_w)
        g_ls.append(g_l)
    return torch.cat(losses), torch.cat(g_ws), torch.cat(g_ls)


@pytest.mark.pure
def test_beta_dpo_global_batch_equals_two_micro_batches():
    rows = random_rows(4, seed=21)
    hparams = {"rho": 0.5, "selection_seed": 7}
    ctx_kwargs = {"step": 5, "total_steps": 10, "state": {"gap_mean": 1.0, "gap_std": 3.0}}
    loss, m, g_w, g_l = run("beta_dpo", rows, ctx=ObjectiveContext(**ctx_kwargs), **hparams)
    assert m["pair_weight"].sum().item() == 2
    split = _split_runs("beta_dpo", rows, hparams, ctx_kwargs)
    torch.testing.assert_close((loss, g_w, g_l), split, rtol=0, atol=1e-15)
    # the statistics must matter: each micro-batch alone would keep int(2·0.5) = 1 pair at another β
    alone = torch.cat([run("beta_dpo", rows[i:i + 2], ctx=ObjectiveContext(**ctx_kwargs), **hparams)[0]
                       for i in (0, 2)])
    assert not torch.allclose(alone, loss)


@pytest.mark.pure
def test_cw_sftc_global_batch_equals_two_micro_batches():
    # per-token NLL(y−) = (0.6, 1.6 | 0.4, 0.3): the global mean 0.725 < C = 1 turns the gate on, while the first
    # micro-batch alone (mean 1.1) would leave it off
    rows = [(-10.0, 0.0, -15.0, 0.0, 20, 25), (-12.0, 0.0, -40.0, 0.0, 20, 25),
            (-3.0, 0.0, -4.0, 0.0, 10, 10), (-6.0, 0.0, -3.0, 0.0, 12, 10)]
    loss, m, g_w, g_l = run("cw_sftc", rows)
    assert m["sftc/gate_active"].tolist() == [1.0] * 4
    split = _split_runs("cw_sftc", rows, {}, {})
    torch.testing.assert_close((loss, g_w, g_l), split, rtol=0, atol=1e-15)
    assert run("cw_sftc", rows[:2])[1]["sftc/gate_active"].tolist() == [0.0, 0.0]
    per_sample = build_objective_config("cw_sftc", {"gate": "per_sample"})
    assert OBJECTIVES["cw_sftc"].global_stats(make_logps(rows), per_sample) is None  # S2 needs no batch statistic


# ---------------------------------------------------------------------------- 2 ranks, gloo, FileStore
BETA_TWO_RANK = {"rho": 0.5, "selection_seed": 11}
BETA_TWO_RANK_CTX = {"step": 3, "total_steps": 10, "state": {"gap_mean": 0.5, "gap_std": 2.0}}


def _beta_dpo_two_rank_worker(rank, store_path, rows, expected):
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, 2)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2, timeout=timedelta(seconds=60))
    try:
        mine = slice(2 * rank, 2 * rank + 2)
        loss, m, g_w, g_l = run("beta_dpo", rows[mine], group=dist.group.WORLD,
                                ctx=ObjectiveContext(**BETA_TWO_RANK_CTX), **BETA_TWO_RANK)
        exp_loss, exp_mask, exp_beta, exp_g_w, exp_g_l = expected
        torch.testing.assert_close(loss, exp_loss[mine], rtol=0, atol=1e-15)
        torch.testing.assert_close(m["pair_weight"], exp_mask[mine], rtol=0, atol=0)
        torch.testing.assert_close(m["beta_dpo/beta_used"], exp_beta[mine], rtol=0, atol=1e-15)
        torch.testing.assert_close((g_w, g_l), (exp_g_w[mine], exp_g_l[mine]), rtol=0, atol=1e-15)
    finally:
        dist.destroy_process_group()


@pytest.mark.multirank
def test_beta_dpo_all_gather_across_two_ranks(tmp_path):
    rows = random_rows(4, seed=31)
    loss, m, g_w, g_l = run("beta_dpo", rows, ctx=ObjectiveContext(**BETA_TWO_RANK_CTX), **BETA_TWO_RANK)
    alone = run("beta_dpo", rows[:2], ctx=ObjectiveContext(**BETA_TWO_RANK_CTX), **BETA_TWO_RANK)[1]
    assert not torch.allclose(alone["beta_dpo/beta_used"], m["beta_dpo/beta_used"][:2]), "ranks must need the gather"
    expected = (loss, m["pair_weight"], m["beta_dpo/beta_used"], g_w, g_l)
    mp.spawn(_beta_dpo_two_rank_worker, args=(str(tmp_path / "store"), rows, expected), nprocs=2, join=True)


# ---------------------------------------------------------------------------------------- CW-DPO §13.4
@pytest.mark.pure
def test_cw_sftc_per_token_13_4():
    loss, m, g_w, g_l = run("cw_sftc", [CANONICAL], drop_reference=True, lam=0.5, c=1.0)
    assert (m["sftc/nll_pos"].item(), m["sftc/nll_neg"].item()) == approx((0.5, 0.6))
    assert loss.item() == approx(0.7)
    assert (g_w.item(), g_l.item()) == approx((-0.05, 0.02))
    for gate in ("batch", "per_sample"):  # one pair: both readings agree
        assert run("cw_sftc", [CANONICAL], gate=gate)[0].item() == approx(0.7)


@pytest.mark.pure
def test_cw_sftc_sequence_sum_13_4():
    loss, _, g_w, g_l = run("cw_sftc", [CANONICAL], drop_reference=True, lam=0.5, c=20.0, reduction="sum")
    assert loss.item() == approx(12.5)
    assert (g_w.item(), g_l.item()) == approx((-1.0, 0.5))


SFTC_BATCH = [(-10.0, 0.0, -15.0, 0.0, 20, 25), (-12.0, 0.0, -40.0, 0.0, 20, 25)]  # NLL(y−)/len = (0.6, 1.6)


@pytest.mark.pure
@pytest.mark.parametrize("gate,expected", [("batch", 0.55), ("per_sample", 0.65)])
def test_cw_sftc_batch_of_two_13_4(gate, expected):
    loss, m, _, _ = run("cw_sftc", SFTC_BATCH, drop_reference=True, lam=0.5, c=1.0, gate=gate)
    assert m["sftc/nll_neg"].tolist() == approx([0.6, 1.6])
    assert loss.mean().item() == approx(expected)
    assert m["sftc/gate_active"].tolist() == ([0.0, 0.0] if gate == "batch" else [1.0, 0.0])


@pytest.mark.pure
@pytest.mark.parametrize("c", [1.0, 1.5])
def test_cw_sftc_surrogate_gives_the_batch_objective_and_its_gradient(c):
    # the mean of the per-pair surrogate over the global batch is the literal S1 objective, value and gradient
    logps = make_logps(SFTC_BATCH)
    loss, _ = cw_dpo.sftc_loss_fn(logps, build_objective_config("cw_sftc", {"c": c}))
    g = torch.autograd.grad(loss.mean(), [logps.policy_chosen_logps, logps.policy_rejected_logps])
    ref = make_logps(SFTC_BATCH)
    nll_pos = -ref.policy_chosen_logps / ref.chosen_lengths
    nll_neg = -ref.policy_rejected_logps / ref.rejected_lengths
    literal = nll_pos.mean() + 0.5 * F.relu(c - nll_neg.mean())
    g_ref = torch.autograd.grad(literal, [ref.policy_chosen_logps, ref.policy_rejected_logps])
    assert loss.mean().item() == approx(literal.item())
    torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-15)
    assert (g[1].abs() > 0).all() == (c > 1.1)  # mean NLL(y−) = 1.1: the gate opens only for C = 1.5


CW_STAGE2 = {
    # stop_gradient -> (ℓ̄(y_l), w_c, logit, loss, ∂L/∂pol_w, ∂L/∂pol_l)
    True: (-0.6, 0.6899745, 0.3069923, 0.5513856, -0.0423849, 0.0292445),
    False: (-0.6, 0.6899745, 0.3069923, 0.5513856, -0.0423849, 0.0270685),
}


@pytest.mark.pure
@pytest.mark.parametrize("stop_gradient", [True, False])
def test_cw_dpo_stage2_13_4(stop_gradient):
    lbar_l, w_c, logit, loss_ref, g_w_ref, g_l_ref = CW_STAGE2[stop_gradient]
    loss, m, g_w, g_l = run("cw_dpo", [CANONICAL], beta=0.1, l_floor=-1.0, tau=0.5, stop_gradient=stop_gradient)
    assert (m["cw/lbar_l"].item(), m["cw/w_c"].item()) == approx((lbar_l, w_c))
    assert m["cw/effective_margin"].item() == approx(logit)
    assert loss.item() == approx(loss_ref)
    assert (g_w.item(), g_l.item()) == approx((g_w_ref, g_l_ref))
    assert (m["rewards/chosen"].item(), m["rewards/rejected"].item()) == approx((0.1, -0.3))  # unweighted
    assert "pair_weight" not in m


@pytest.mark.pure
def test_cw_dpo_step0_and_filter_hook():
    # ℓ̄(y_l) from −0.1 to −3.1 nats/token: w_c from 0.86 to 0.015, clear of fp32 underflow, so every negative is
    # pushed (by β·w_c/2)
    rows = [(-10.0, -10.0, -2.0 * k - 1.0, -2.0 * k - 1.0, 10, 10) for k in range(16)]
    loss, m, g_w, g_l = run("cw_dpo", rows, dtype=torch.float32)
    torch.testing.assert_close(loss, torch.full_like(loss, LN2), rtol=0, atol=1e-7)
    torch.testing.assert_close(g_l, 0.1 * m["cw/w_c"] / 2, rtol=1e-6, atol=0)
    assert (g_w < 0).all() and (g_l > 0).all()
    # the negative-filtering hook drops easy negatives from the step's average
    loss_f, m_f, _, g_l_f = run("cw_dpo", rows, dtype=torch.float32, min_weight=0.5)
    keep = m["cw/w_c"] >= 0.5
    assert 0 < keep.sum() < 16
    assert m_f["pair_weight"].bool().tolist() == keep.tolist()
    assert (loss_f[~keep] == 0).all() and (g_l_f[~keep] == 0).all()
    torch.testing.assert_close(loss_f[keep], loss[keep], rtol=0, atol=0)


@pytest.mark.pure
def test_cw_metrics_summary():
    _, summary = pair_loss("cw_dpo", *columns([CANONICAL, (-5, -10, -30, -10, 5, 5)]))
    assert {"cw/w_c_mean", "cw/w_c_min", "cw/w_c_max", "cw/w_c_std", "cw/lbar_l_mean", "cw/lbar_w_mean",
            "cw/frac_wc_below_0.1", "cw/frac_wc_above_0.9"} <= set(summary)
    assert summary["cw/frac_wc_below_0.1"] == 0.5  # ℓ̄(y_l) = −6: an easy negative
    _, summary = pair_loss("cw_sftc", *columns(SFTC_BATCH)[:2], None, None, *columns(SFTC_BATCH)[4:])
    assert summary == approx({"sftc/nll_pos": 0.55, "sftc/nll_neg_mean": 1.1, "sftc/gate_active": 0.0,
                              "sftc/penalty": 0.0, "logps/chosen": -11.0, "logps/rejected": -27.5,
                              "lengths/chosen": 20.0, "lengths/rejected": 25.0})


# --------------------------------------------------------------------------------------------- ASPO §13.6
SEG_POL = [-3.0, -5.0, -2.0]
SEG_REF = [-3.5, -4.8, -2.7]
SEG_LEN = [6, 8, 6]
SEG_SIM = [0.30, 0.22, 0.26]


def run_aspo(segments, rows=(CANONICAL,), dtype=F64, **hparams):
    """ASPO through pair_loss: segments = (pol [B,K], ref [B,K], lengths [B,K], similarity [B,K] or None)."""
    pol, ref, lengths, sim = segments
    pol = torch.tensor(pol, dtype=dtype, requires_grad=True)
    ref, lengths = torch.tensor(ref, dtype=dtype), torch.tensor(lengths, dtype=dtype)
    sim = None if sim is None else torch.tensor(sim, dtype=dtype)
    cols = columns(list(rows), dtype)
    loss, summary = pair_loss("aspo", *cols, policy_chosen_segment_logps=pol, ref_chosen_segment_logps=ref,
                              chosen_segment_lengths=lengths, chosen_segment_similarity=sim, **hparams)
    g_seg, g_l = torch.autograd.grad(loss.sum(), [pol, cols[1]])
    return loss.detach(), summary, g_seg, g_l


CANONICAL_SEGMENTS = ([SEG_POL], [SEG_REF], [SEG_LEN], [SEG_SIM])


@pytest.mark.pure
def test_aspo_sentence_weights_13_6():
    pol, lengths, sim = (torch.tensor([x], dtype=F64) for x in (SEG_POL, SEG_LEN, SEG_SIM))
    valid = lengths > 0
    assert aspo.min_max(sim, valid).tolist() == [approx([1.0, 0.0, 0.5])]
    ppl = torch.exp(-pol / lengths)
    assert ppl.tolist() == [approx([1.6487213, 1.8682460, 1.3956124])]
    assert aspo.min_max(-ppl, valid).tolist() == [approx([0.4644712, 0.0, 1.0])]
    w, valid, known = aspo.sentence_weights(pol, lengths, sim, 0.5)
    assert w.tolist() == [approx([0.7322356, 0.0, 0.75])] and known.tolist() == [True]
    assert (pol - torch.tensor([SEG_REF], dtype=F64)).tolist() == [approx([0.5, -0.2, 0.7])]


ASPO_13_6 = {
    # normalization -> (R_c/R_c*, M*, loss, ∂L/∂logπ_θ(s_i))
    "count": (0.6693089, 0.4265742, 0.5024354, [-0.0457899, -0.0264340, -0.0462595]),
    "token": (0.6921993, 0.4309030, 0.5007280, [-0.0472320, -0.0272665, -0.0477163]),
    "none": (1.0, 0.4891118, 0.4782017, [-0.0658428, -0.0380103, -0.0665180]),
}


@pytest.mark.pure
@pytest.mark.parametrize("normalization", sorted(ASPO_13_6))
def test_aspo_13_6(normalization):
    factor, m_star, loss_ref, g_ref = ASPO_13_6[normalization]
    loss, summary, g_seg, g_l = run_aspo(CANONICAL_SEGMENTS, beta=0.1, alpha_mix=0.5, normalization=normalization)
    assert summary["aspo/norm_factor_mean"] == approx(factor)
    assert summary["aspo/effective_margin"] == approx(m_star)
    assert loss.item() == approx(loss_ref)
    assert g_seg[0].tolist() == approx(g_ref)
    assert g_l.item() == approx(0.1 * (1 - 1 / (1 + math.exp(-m_star))))  # rejected term is plain DPO
    # TRL rewards stay unweighted (comparable with DPO); the weighted chosen term is logged beside them
    assert (summary["rewards/chosen"], summary["rewards/rejected"]) == approx((0.1, -0.3))
    assert summary["rewards/chosen_weighted"] == approx(m_star - 0.3)
    assert summary["aspo/K_mean"] == 3 and summary["aspo/frac_single_sentence"] == 0.0
    assert summary["aspo/w_mean"] == approx((0.7322356 + 0.75) / 3)


@pytest.mark.pure
def test_aspo_single_sentence_is_dpo_13_6():
    loss, summary, g_seg, _ = run_aspo(([[-10.0]], [[-11.0]], [[20]], [[0.3]]))
    assert (summary["aspo/w_mean"], summary["aspo/norm_factor_mean"]) == approx((0.0, 1.0))
    assert loss.item() == approx(0.5130153)
    assert g_seg.item() == approx(-0.0401312)
    assert summary["aspo/frac_single_sentence"] == 1.0


@pytest.mark.pure
def test_aspo_padding_slots_and_unknown_similarity():
    nan = float("nan")
    # row 0: §13.6 with one padding slot; row 1: one sentence padded to K = 4 (garbage in padded similarity)
    padded = ([SEG_POL + [0.0], [-10.0, 0.0, 0.0, 0.0]], [SEG_REF + [0.0], [-11.0, 0.0, 0.0, 0.0]],
              [SEG_LEN + [0], [20, 0, 0, 0]], [SEG_SIM + [nan], [0.3, 9.0, nan, -9.0]])
    loss, summary, g_seg, _ = run_aspo(padded, rows=(CANONICAL, CANONICAL))
    assert loss.tolist() == approx([0.5024354, 0.5130153])
    assert g_seg[0].tolist() == approx([-0.0457899, -0.0264340, -0.0462595, 0.0])
    assert summary["aspo/K_mean"] == 2.0 and summary["aspo/frac_single_sentence"] == 0.5
    assert summary["aspo/similarity_known"] == 1.0
    # similarity unknown (a NaN in a real sentence, or no similarity input): w = PPL' alone
    ppl_only = [0.4644712, 0.0, 1.0]
    factor = 3 / (3 + sum(ppl_only))
    m_star = factor * 0.1 * sum((1 + w) * lr for w, lr in zip(ppl_only, [0.5, -0.2, 0.7])) + 0.3
    for sim in ([[0.3, nan, 0.26]], None):
        loss, summary, _, _ = run_aspo(([SEG_POL], [SEG_REF], [SEG_LEN], sim))
        assert summary["aspo/similarity_known"] == 0.0
        assert summary["aspo/effective_margin"] == approx(m_star)
        assert loss.item() == approx(math.log1p(math.exp(-m_star)))
    # the mix degenerates to one term at α_mix = 1 / 0 (the ASPO-S / ASPO-P ablations)
    w_s = aspo.sentence_weights(*(torch.tensor([x], dtype=F64) for x in (SEG_POL, SEG_LEN, SEG_SIM)), 1.0)[0]
    assert w_s.tolist() == [approx([1.0, 0.0, 0.5])]


@pytest.mark.pure
def test_aspo_step0_is_ln2():
    g = torch.Generator().manual_seed(4)
    seg = -torch.rand(8, 3, generator=g, dtype=torch.float32) * 30
    lengths = torch.randint(1, 30, (8, 3), generator=g).float()
    rows = [(float(seg[i].sum()), float(seg[i].sum()), -20.0, -20.0, float(lengths[i].sum()), 15.0)
            for i in range(8)]
    sim = torch.rand(8, 3, generator=g).tolist()
    loss, _, g_seg, g_l = run_aspo((seg.tolist(), seg.tolist(), lengths.tolist(), sim), rows=rows,
                                   dtype=torch.float32)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, torch.full_like(loss, LN2), rtol=0, atol=1e-7)
    assert (g_seg < 0).all() and (g_l > 0).all()


@pytest.mark.pure
def test_aspo_input_checks():
    cols = columns([CANONICAL])
    with pytest.raises(ValueError, match=r"per-sentence inputs \['policy_chosen_segment_logps', "
                                         r"'ref_chosen_segment_logps', 'chosen_segment_lengths'\]"):
        pair_loss("aspo", *cols)
    seg = torch.tensor([SEG_POL], dtype=F64)
    lengths = torch.tensor([SEG_LEN], dtype=F64)
    with pytest.raises(ValueError, match=r"needs per-sentence inputs \['ref_chosen_segment_logps'\]"):
        pair_loss("aspo", *cols, policy_chosen_segment_logps=seg, chosen_segment_lengths=lengths)
    with pytest.raises(ValueError, match="chosen_segment_lengths must have shape"):
        pair_loss("aspo", *cols, policy_chosen_segment_logps=seg, ref_chosen_segment_logps=seg,
                  chosen_segment_lengths=lengths[0])
    with pytest.raises(ValueError, match="chosen_segment_similarity must have shape"):
        pair_loss("aspo", *cols, policy_chosen_segment_logps=seg, ref_chosen_segment_logps=seg,
                  chosen_segment_lengths=lengths, chosen_segment_similarity=torch.zeros(1, 2, dtype=F64))
    with pytest.raises(ValueError, match=r"non-finite log-probs in \['ref_chosen_segment_logps'\]"):
        pair_loss("aspo", *cols, policy_chosen_segment_logps=seg, ref_chosen_segment_logps=seg * float("nan"),
                  chosen_segment_lengths=lengths)
    with pytest.raises(ValueError, match="chosen_segment_lengths must be >= 0"):
        pair_loss("aspo", *cols, policy_chosen_segment_logps=seg, ref_chosen_segment_logps=seg,
                  chosen_segment_lengths=-lengths)


@pytest.mark.pure
def test_aspo_contract():
    """What tests/test_objectives*.py check for every objective, with the sentence inputs ASPO needs."""
    b, k = 6, 4
    rows = random_rows(b, seed=7)
    g = torch.Generator().manual_seed(7)
    share = torch.rand(b, k, generator=g, dtype=F64)
    share[:, -1] = torch.where(torch.arange(b) % 2 == 0, 0.0, share[:, -1])  # half the rows have padding
    share = share / share.sum(-1, keepdim=True)
    pol_w, pol_l, ref_w, ref_l, len_w, len_l = (torch.tensor(c, dtype=F64) for c in zip(*rows))
    lengths = torch.where(share > 0, (share * 40).round().clamp_min(1), torch.zeros_like(share))
    seg_pol = (share * pol_w[:, None]).requires_grad_()
    seg_ref = (share * ref_w[:, None]).requires_grad_()
    pol_l.requires_grad_()
    logps = PairLogps(seg_pol.sum(-1), pol_l, ref_w, ref_l, lengths.sum(-1), len_l, seg_pol, seg_ref, lengths,
                      torch.rand(b, k, generator=g, dtype=F64))
    loss, metrics = aspo.loss_fn(logps, aspo.ASPOConfig(), None, ctx=ObjectiveContext(3, 10))
    assert loss.shape == (b,) and torch.isfinite(loss).all()
    loss.sum().backward()
    assert seg_pol.grad.abs().sum() > 0 and pol_l.grad.abs().sum() > 0
    assert seg_ref.grad is None or (seg_ref.grad == 0).all(), "reference log-probs must receive no gradient"
    assert (seg_pol.grad[:, -1][::2] == 0).all(), "padding slots must receive no gradient"
    assert TRL_KEYS <= set(metrics)
    for key, value in metrics.items():
        assert value.shape == (b,) and not value.requires_grad and value.grad_fn is None, key
    assert all(isinstance(v, float) for v in summarize_metrics(metrics).values())


# ------------------------------------------------------------------------------------- registry and configs
@pytest.mark.pure
def test_registry_entries():
    assert OBJECTIVES["beta_dpo"].needs_reference(None) and OBJECTIVES["beta_dpo"].next_state is beta_dpo.next_state
    assert OBJECTIVES["beta_dpo"].global_stats is beta_dpo.global_stats
    assert not OBJECTIVES["cw_sftc"].needs_reference(None) and OBJECTIVES["cw_sftc"].global_stats is not None
    assert OBJECTIVES["cw_dpo"].needs_reference(None) and OBJECTIVES["aspo"].needs_reference(None)
    assert all(OBJECTIVES[name].next_state is None for name in OBJECTIVES if name != "beta_dpo")
    cfg = build_objective_config("beta_dpo", {})
    assert (cfg.beta0, cfg.a, cfg.ema_momentum, cfg.rho, cfg.selection_seed) == (0.1, 0.6, 0.9, 0.2, 0)
    assert build_objective_config("cw_sftc", {}).gate == "batch"
    assert build_objective_config("cw_sftc", {}).reduction == "mean"
    assert build_objective_config("cw_dpo", {}).stop_gradient is True
    assert build_objective_config("aspo", {}).normalization == "count"
    # the step context's state is not part of its identity (like global_stats)
    assert ObjectiveContext(1, 2, state={"gap_mean": 1.0}) == ObjectiveContext(1, 2)


@pytest.mark.pure
@pytest.mark.parametrize("name,params,field", [
    ("beta_dpo", {"beta0": 0.0}, "beta_dpo.beta0"),
    ("beta_dpo", {"a": -0.1}, "beta_dpo.a"),
    ("beta_dpo", {"ema_momentum": 1.0}, "beta_dpo.ema_momentum"),
    ("beta_dpo", {"rho": 1.0}, "beta_dpo.rho"),
    ("beta_dpo", {"rho": -0.1}, "beta_dpo.rho"),
    ("beta_dpo", {"selection_seed": -1}, "beta_dpo.selection_seed"),
    ("beta_dpo", {"selection_seed": 1.5}, "beta_dpo.selection_seed"),
    ("beta_dpo", {"beta_min": 0.0}, "beta_dpo.beta_min"),
    ("beta_dpo", {"std_floor": 0.0}, "beta_dpo.std_floor"),
    ("cw_sftc", {"lam": -0.5}, "cw_sftc.lam"),
    ("cw_sftc", {"c": -1.0}, "cw_sftc.c"),
    ("cw_sftc", {"gate": "global"}, "cw_sftc.gate"),
    ("cw_sftc", {"reduction": "token"}, "cw_sftc.reduction"),
    ("cw_dpo", {"beta": 0.0}, "cw_dpo.beta"),
    ("cw_dpo", {"tau": 0.0}, "cw_dpo.tau"),
    ("cw_dpo", {"l_floor": float("inf")}, "cw_dpo.l_floor"),
    ("cw_dpo", {"stop_gradient": "yes"}, "cw_dpo.stop_gradient"),
    ("cw_dpo", {"min_weight": 1.0}, "cw_dpo.min_weight"),
    ("aspo", {"beta": -0.1}, "aspo.beta"),
    ("aspo", {"alpha_mix": 1.5}, "aspo.alpha_mix"),
    ("aspo", {"normalization": "reward"}, "aspo.normalization"),
    ("aspo", {"lam": 0.5}, "objective 'aspo' has no hyper-parameter 'lam'"),
])
def test_config_validation_names_the_field(name, params, field):
    with pytest.raises(ValueError, match=field):
        build_objective_config(name, params)
