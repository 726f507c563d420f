"""Layout invariance (the core correctness property), in one 2-process and one 4-process gloo launch.

The worker (tests/dist/layout_worker.py) runs one real trainer step per layout and objective and compares it
with a plain single-process torch computation of the whole global batch.
"""

import json
import math

import pytest

from conftest import REPO, run_torchrun

pytestmark = [pytest.mark.multirank, pytest.mark.slow]

TOL = 1e-5


# (world size, layouts): process start-up dominates on two cores, so each world size is one launch
LAUNCHES = {2: ["tp1_dp2", "tp1_dp2_2mb", "tp2", "tp2_sp", "tp2_sp_2mb", "pp2", "pp2_4mb", "tp1_dp2_packed",
                "tp2_sp_packed", "pp2_packed"],
            4: ["tp2_sp_pp2", "dp2_pp2"]}
PACKED = {"tp1_dp2_packed", "tp2_sp_packed", "pp2_packed"}
SHORT = {"tp1_dp2_2mb", "tp2_sp", "pp2", "tp2_sp_pp2", "tp2_sp_packed", "pp2_packed"}
CORE = ("dpo", "acpo", "acpo_batch", "acpo_hybrid", "beta_dpo", "cw_sftc")
ALL = {"dpo", "acpo", "acpo_batch", "acpo_hybrid", "ipo", "simpo", "dpo_shift", "combo", "beta_dpo", "cw_sftc",
       "cw_dpo", "aspo", "p2_dpo", "p2_dpo_rejected", "dpo_tower", "dpo_logits", "dpo_recompute_full",
       "acpo_recompute_selective", "dpo_lora", "dpo_lora_recompute_full", "acpo_lora_projector"}
TRAINABLE_TOWER = {"dpo_tower"}  # vision tower and projector train with the LLM
LORA = {"dpo_lora", "dpo_lora_recompute_full", "acpo_lora_projector"}  # adapters only; reference: them off
OWN_ENCODING = TRAINABLE_TOWER | {"acpo_lora_projector"}  # the policy's image embeddings take a gradient
STATISTICS_PASS = {"acpo_batch", "acpo_hybrid", "acpo_recompute_selective", "acpo_lora_projector", "beta_dpo",
                   "cw_sftc"}  # objectives with a no-grad policy pass for global-batch statistics


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = {}
    for nproc, layouts in LAUNCHES.items():
        d = tmp_path_factory.mktemp(f"layouts{nproc}")
        run_torchrun([str(REPO / "tests" / "dist" / "layout_worker.py"), str(d), ",".join(layouts)], nproc=nproc)
        out.update(json.loads((d / "layouts.json").read_text()))
    return out


def test_all_layouts_and_objectives_ran(report):
    layouts = {k.split("/")[-1] for k in report}
    assert layouts == {name for names in LAUNCHES.values() for name in names}
    assert {k.split("/")[0] for k in report} == ALL
    for core in CORE:
        assert {k.split("/")[-1] for k in report if k.startswith(core + "/")} == layouts, core
    # every registered objective (P2-DPO's six rows, SimPO without a reference, ...) runs pipeline-parallel and
    # packed (with SP and with PP)
    for label in ALL:
        assert {"pp2", "tp2_sp_pp2", "tp2_sp_packed", "pp2_packed"} <= {
            k.split("/")[-1] for k in report if k.startswith(label + "/")}, label
    assert {k.split("/")[1] for k in report} == {"ref=same", "ref=drifted", "ref=other", "ref=cache",
                                                 "ref=cache_same"}


def test_logps_loss_alpha_grads_match_plain_torch(report):
    for key, r in report.items():
        assert r["grad_names_match"] and r["grad_names_disjoint"], key
        assert r["logps_rel"] <= TOL, (key, r["logps_rel"])
        assert r["loss_rel"] <= TOL, (key, r["loss_rel"])
        assert r["grad_rel"] <= TOL, (key, r["grad_rel"], r["worst"])
        if "alpha_rel" in r:
            assert r["alpha_rel"] <= TOL, (key, r["alpha_rel"])


# objectives whose step-0 loss (reference == policy) is fixed by definition: DPO-like ln 2; IPO (1/(2 tau))^2
STEP0 = {label: math.log(2) for label in ("dpo", "dpo_tower", "dpo_logits", "dpo_recompute_full", "acpo",
                                          "acpo_batch", "acpo_hybrid", "acpo_recompute_selective", "dpo_shift",
                                          "beta_dpo", "cw_dpo", "aspo", *LORA)} | {
    "ipo": 25.0}


def test_step0_loss_when_reference_equals_policy(report):
    same = {k: r for k, r in report.items() if "/ref=same/" in k and k.split("/")[0] in STEP0}
    core = [label for label in STEP0 if label in CORE]
    num_layouts = sum(len(names) for names in LAUNCHES.values())
    assert len(same) == num_layouts * len(core) + len(SHORT) * (len(STEP0) - len(core))
    assert {k.split("/")[-1] for k in same} >= {"pp2", "pp2_4mb", "tp2_sp_pp2", "dp2_pp2"}  # ln 2 at PP=2 too
    for key, r in same.items():
        expected = STEP0[key.split("/")[0]]
        assert abs(r["mean_loss"] - expected) < 1e-6 * max(1.0, expected), (key, r["mean_loss"])
    # and it moves once the reference differs (guards against comparing the policy with itself)
    for key, r in report.items():
        label = key.split("/")[0]
        if "/ref=same/" not in key and "/ref=cache_same/" not in key and label in STEP0:
            assert abs(r["mean_loss"] - STEP0[label]) > 1e-5, key


def p2_step0(batch: dict, lambda_calib: float = 0.3) -> float:
    """P2-DPO's mean loss when reference == policy under calib_reference="chosen" (OBJECTIVES.md §9.1).

    Every logit is 0 (focus and robust DPO: Δ_w = Δ_l = 0; calibration: the reference's gain is the policy's own
    on y_w^f), so L_dpo_focus = L_calib = L_dpo_rob = ln 2 and a sample's loss is
    ln 2·(w_focus·(1 + λ_calib) + w_robust): ln 2·(1 + λ·w_focus) with both branches (w_focus + w_robust = 1,
    DDW w_focus = 0.5 + 0.2·tanh((crop/image − 1)/0.1)), ln 2·(1 + λ) focus only, ln 2 robust only.
    """
    total, count = 0.0, 0
    for f, r, crop, image in zip(batch["has_focus"], batch["has_robust"], batch["clip_crop_score"],
                                 batch["clip_image_score"]):
        w_focus = 0.5 + 0.2 * math.tanh((crop / image - 1) / 0.1) if f and r else float(f)
        w_robust = 1.0 - w_focus if f and r else float(r)
        total += math.log(2) * (w_focus * (1 + lambda_calib) + w_robust)
        count += f or r
    return total / count


def test_p2_dpo_step0_closed_form(report):
    same = {k: r for k, r in report.items() if k.startswith("p2_dpo/ref=same/")}
    assert sorted(k.split("/")[-1] for k in same) == sorted(SHORT)
    for key, r in same.items():
        batch = r["p2_batch"]
        # the global batch mixes both-branch, focus-only and robust-only samples, so every weight case is checked
        kinds = set(zip(batch["has_focus"], batch["has_robust"]))
        assert kinds == {(True, True), (True, False), (False, True)}, (key, kinds)
        assert abs(r["mean_loss"] - p2_step0(batch)) < 1e-6, (key, r["mean_loss"], p2_step0(batch))
        drifted = report[key.replace("ref=same", "ref=drifted")]
        assert abs(drifted["mean_loss"] - p2_step0(batch)) > 1e-5, key


def test_reference_and_frozen_vision_never_change(report):
    for key, r in report.items():
        assert r["ref_grads_none"], key
        assert r["ref_unchanged"], key
        # a frozen tower never moves; a trainable one (with its gradients checked above) does
        assert r["vision_unchanged"] == (key.split("/")[0] not in TRAINABLE_TOWER), key
        assert r["lm_changed"], key  # the optimizer did step: the two checks above are not vacuous


def test_lora_trains_adapters_only_in_every_layout(report):
    """LoRA: the gradients (compared above with a plain-torch replica: base + (α/r)·x Aᵀ Bᵀ hooks, the bare base as
    its reference) are the adapters' only, the base never moves, and both adapter placements ran in every short
    layout with B = 0 (step 0: ln 2, checked above) and with B drifted."""
    for label in LORA:
        for mode in ("same", "drifted"):
            assert {k.split("/")[-1] for k in report if k.startswith(f"{label}/ref={mode}/")} == SHORT, (label, mode)
    for key, r in report.items():
        if key.split("/")[0] in LORA:
            assert all(name.endswith(("_lora.lora_a", "_lora.lora_b")) for _, name in r["worst"]), key
            assert r["ref_unchanged"] and r["ref_grads_none"] and r["lm_changed"], key


def test_cached_reference_equals_live(report):
    """The reference log-prob cache, computed at TP=2 by precompute_reference from a saved reference checkpoint
    and consumed at TP=1 x DP=2, at PP=2 and packed at PP=2, gives the live reference's losses and gradients."""
    cached = {k: r for k, r in report.items() if "/ref=cache/" in k}
    assert sorted(cached) == sorted(f"{label}/ref=cache/{layout}" for label in ("acpo_batch", "dpo", "aspo",
                                                                               "p2_dpo_rejected", "dpo_lora")
                                    for layout in ("tp1_dp2", "pp2", "pp2_packed")
                                    if label in ("acpo_batch", "dpo") or layout != "tp1_dp2")
    for key, r in cached.items():
        assert r["live_loss_rel"] <= 1e-6 and r["live_grad_rel"] <= 1e-6, (key, r["live_loss_rel"], r["live_grad_rel"])
        live = report[key.replace("ref=cache", "ref=drifted")]
        assert abs(r["mean_loss"] - live["mean_loss"]) <= 1e-6 * live["mean_loss"], key


def test_step0_cache_from_another_layout_equals_live_for_acpo(report):
    """ACPO at step 0 with the reference read from a cache written at TP=2 from the policy's own weights: the
    policy's log-probs differ from the cached ones by TP=1 vs TP=2 rounding (|r_l| ~ 1e-7, either sign), which
    counts as r_l = 0 (OBJECTIVES.md §7.3-C), so every α̂ is the window's top, as live, and the loss and gradients
    equal the live reference's (before the rule, α̂ flipped to 0.3 on pairs whose noise was positive)."""
    cached = {k: r for k, r in report.items() if "/ref=cache_same/" in k}
    assert sorted(cached) == sorted(f"acpo/ref=cache_same/{layout}" for layout in ("tp1_dp2", "pp2", "pp2_packed"))
    for key, r in cached.items():
        assert r["alpha_hat"] == [0.95] * len(r["alpha_hat"]) and r["alpha_rel"] == 0.0, (key, r["alpha_hat"])
        assert r["live_loss_rel"] <= 1e-6 and r["live_grad_rel"] <= 1e-6, (key, r["live_loss_rel"], r["live_grad_rel"])
        assert abs(r["mean_loss"] - math.log(2)) <= 1e-6, (key, r["mean_loss"])


def test_objective_state_after_the_step_on_every_stage(report):
    """β-DPO's EMA after one step, as rank 0 (the first pipeline stage, which writes checkpoints) holds it,
    equals the plain computation's in every layout; objectives without state keep none."""
    for key, r in report.items():
        plain, got = r["plain_objective_state"], r["objective_state"]
        if not key.startswith("beta_dpo/"):
            assert plain is None and got is None, key
            continue
        assert got.keys() == plain.keys() == {"gap_mean", "gap_std"}, key
        for k in plain:
            assert abs(got[k] - plain[k]) <= 1e-5 * max(1.0, abs(plain[k])), (key, k, got[k], plain[k])
    moved = [r["objective_state"]["gap_std"] for k, r in report.items() if k.startswith("beta_dpo/ref=drifted")]
    assert moved and min(moved) > 0  # the drifted reference moves the EMA off its initial (0, 0)


def test_each_image_is_encoded_once_per_step(report):
    """Frozen towers that are copies of each other encode each micro-batch's images once per step, shared by the
    reference, statistics and policy passes; a reference with other towers, or a trainable policy tower, adds
    its own encoding; the cache none."""
    for key, r in report.items():
        label, mode = key.split("/")[0], key.split("/")[1]
        reads_reference = label not in ("simpo", "cw_sftc")
        own = (mode == "ref=other" or label in OWN_ENCODING) and reads_reference
        # a policy tower that trains encodes again in a global-batch statistics pass (without grad)
        stats = label in OWN_ENCODING and label in STATISTICS_PASS
        assert r["encodes_per_micro_batch"] == 1 + own + stats, (key, r["encodes_per_micro_batch"])


def test_activation_recompute_replays_the_forward(report):
    """model.recompute=full replays each decoder layer in backward, selective (core_attn, mlp) the attention: the
    forwards per layer and micro-batch of the policy's step, on every rank (the values above are exact anyway)."""
    expected = {"dpo_recompute_full": [[2.0, 2.0]], "acpo_recompute_selective": [[1.0, 2.0]],
                "dpo_lora_recompute_full": [[2.0, 2.0]], "acpo_lora_projector": [[1.0, 2.0]]}
    for key, r in report.items():
        assert r["forwards_per_layer"] == expected.get(key.split("/")[0], [[1.0, 1.0]]), key


def test_packed_rows_hold_several_sequences(report):
    """Packing is not vacuous: fewer rows than sequences and less padding than the unpacked layout (the
    equalities above hold for these layouts like for any other)."""
    for key, r in report.items():
        layout = key.split("/")[-1]
        if layout in PACKED:
            unpacked = report[key.replace(layout, layout.replace("_packed", ""))]
            assert r["rows_per_sequence"] < 1 and r["padding_efficiency"] > unpacked["padding_efficiency"], key
        else:
            assert r["rows_per_sequence"] == 1, key


def test_memory_plan_counts_each_ranks_parameters(report):
    """The memory plan's parameters of each rank (its pipeline stage, its TP shard; trainable towers included)
    equal the modules that rank built, in every layout."""
    for key, r in report.items():
        assert r["plan_param_mismatches"] == [], key
