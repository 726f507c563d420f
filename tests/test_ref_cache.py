"""The reference log-prob cache: what its key refuses, and the CLI round trip (precompute-ref, then train).

Exactness against the live reference in several layouts (cache computed at TP=2, consumed at TP=1 and PP=2, loss
and every gradient within 1e-6) is checked in tests/test_layouts.py.
"""

import json
import math

import pytest

from conftest import REPO, timing_keys, read_metrics, run_python, run_torchrun


@pytest.mark.pure
def test_key_refuses_changed_inputs_and_incomplete_caches(tmp_path):
    run_python([str(REPO / "tests" / "dist" / "ref_cache_checks.py"), str(tmp_path)])
    r = json.loads((tmp_path / "result.json").read_text())
    assert "no manifest.json" in r["before_precompute"]
    # the too-long pair is skipped by the precompute and by training alike; samples are keyed by record id
    assert r["skipped"]["too_long"] == 1 and "too-long" not in r["ids"] and r["ids"] == r["kept"]
    assert r["fresh"] == "ok" and r["restored"] == "ok" and r["objective_kind_same"] == "ok"
    assert r["lookup_seq_rel"] <= 1e-6 and r["lookup_segments_equal"]
    expected = {  # what each change must name
        # the data key of the training split's prepared index: its data files' bytes, its images' path/size/mtime
        "data": "data (train): data files and images",
        "image": "data (train): data files and images",
        "tokenizer": "tokenizer/processor file tokenizer.model",
        "checkpoint": "reference checkpoint file __0_0.distcp",
        "setting": "setting model.max_seq_length: cache 160, now 170",
        "partial": "no entry for 1 train sample(s)",
        "interrupted": "no manifest.json",
    }
    for case, text in expected.items():
        assert text in r[case], (case, r[case])
    for case in ("data", "image", "tokenizer", "checkpoint", "setting"):
        assert "precompute-ref" in r[case] and "now" in r[case], r[case]
        # only what changed is named
        assert sum(name in r[case] for name in ("data (", "tokenizer/", "reference checkpoint", "setting ")) == 1, r[case]


@pytest.mark.pure
def test_reference_gap_is_measured_against_the_dtypes_rounding():
    """The step-0 gap between the policy and its reference: the largest |Δ| in nats and its ratio to 16 ulp per
    token of the sequence (fp32: a cache from another layout is far below 1, a reference from other weights far
    above; bf16 allows ~6e4 times more)."""
    import torch

    from megatron_po.train.step import reference_gap

    ref = torch.tensor([-300.0, -40.0], dtype=torch.float64)
    tokens = torch.tensor([100.0, 10.0], dtype=torch.float64)
    rounding = reference_gap(ref + torch.tensor([3e-5, -2e-6], dtype=torch.float64), ref, tokens, torch.float32)
    assert rounding[0].item() == pytest.approx(3e-5) and rounding[1].item() < 0.05
    other = reference_gap(ref + torch.tensor([0.5, -2.0], dtype=torch.float64), ref, tokens, torch.float32)
    assert other[0].item() == pytest.approx(2.0) and other[1].item() > 1e3
    assert reference_gap(ref + 0.5, ref, tokens, torch.bfloat16)[1].item() < 1


@pytest.mark.e2e
@pytest.mark.slow
def test_cli_precompute_at_dp2_pp2_then_train_from_the_cache(tmp_path):
    """precompute-ref at DP=2 x PP=2 (the CLI; 15 train and 3 eval pairs, so the last DP rank's share is padded),
    then the same 3 steps at TP=2 + SP with the cache and with the live reference: the same metrics, and no
    reference model is built."""
    common = ["data.num_train=15", "data.num_eval=4", "train.global_batch_size=4", "train.micro_batch_size=2",
              "train.train_steps=3", "objective.name=dpo", "eval.interval=3", "eval.max_pairs=3",
              "eval.probe_images=4", "train.progress_bar=false", "optim.lr=5e-3", "optim.adam_eps=1e-3",
              "checkpoint.save=false", f"reference.cache_path={tmp_path / 'cache'}"]
    live, cached = tmp_path / "live", tmp_path / "cached"
    log = run_torchrun(["-m", "megatron_po.cli", "precompute-ref", f"output_dir={cached}", "parallel.pp=2",
                        *common], nproc=4)
    assert "reference cache written" in log
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert {k: v["num_samples"] for k, v in manifest["splits"].items()} == {"train": 15, "eval": 3}
    assert len(set(manifest["splits"]["train"]["ids"])) == 15  # the padding repeat is not written
    log = run_torchrun(["-m", "megatron_po.train", f"output_dir={cached}", "parallel.tp=2", "parallel.sp=true",
                        "reference.source=cache", *common])
    assert "no reference model built" in log
    run_torchrun(["-m", "megatron_po.train", f"output_dir={live}", "parallel.tp=2", "parallel.sp=true", *common])
    a, b = read_metrics(live), read_metrics(cached)
    assert [m["step"] for m in a] == [m["step"] for m in b] == [0, 1, 2, 3]
    # until the first update the policy is the reference: rewards are exactly 0 live and ±1e-7 from a cache computed
    # in another layout, so the share of positive margins or negative rewards is decided by rounding there
    ties = {f"{p}rewards/{k}" for p in ("", "eval/") for k in ("accuracies", "frac_chosen_negative")}
    # the step-0 gap between policy and reference: 0 live; the other layout's rounding only, from the cache
    assert a[1]["reference/step0_max_gap"] == 0.0
    assert 0 < b[1]["reference/step0_max_gap"] < 1e-4 and b[1]["reference/step0_gap_over_rounding"] < 1, b[1]
    gap_keys = {"reference/step0_max_gap", "reference/step0_gap_over_rounding"}
    for ma, mb in zip(a, b):
        assert ma.keys() == mb.keys()
        for k in ma.keys() - timing_keys(ma) - gap_keys - {"step"} - (ties if ma["step"] <= 1 else set()):
            # rewards are β-scaled differences of log-prob sums of ~100 tokens, whose fp32 rounding differs between
            # the layouts (1e-7 relative of the sums): compared absolutely at that scale. The loss and gradients
            # are held to 1e-6 against the live reference in tests/test_layouts.py.
            assert math.isclose(ma[k], mb[k], rel_tol=1e-5, abs_tol=1e-5), (ma["step"], k, ma[k], mb[k])
    # step 1 compares the policy with itself; by step 3 it has moved, so the cached reference values are in use
    assert abs(a[1]["loss"] - math.log(2)) < 1e-6 and abs(a[-1]["loss"] - math.log(2)) > 1e-3
