"""Tiny end-to-end runs of the real driver under torchrun: resume exactness and the demo stages."""

import json
import math
from pathlib import Path

import pytest

from conftest import REPO, run_python, run_torchrun

TIMING_KEYS = {"tokens_per_s", "step_time_s"}
COMMON = ["parallel.tp=2", "parallel.sp=true", "train.progress_bar=false", "data.num_train=64",
          "train.global_batch_size=4", "train.micro_batch_size=2", "optim.lr=5e-3", "optim.adam_eps=1e-3"]


def metrics(out: Path) -> list[dict]:
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


def train(out: Path, *overrides: str) -> str:
    return run_torchrun(["-m", "megatron_po.train", f"output_dir={out}", *COMMON, *overrides])


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    train(out, "objective.name=sft", "train.train_steps=6")
    return out


def test_resume_equals_straight_run(tmp_path, sft_run):
    """4 steps straight vs 2 steps + exit + relaunch: same weights and the same logged metrics."""
    init = [f"checkpoint.init_from={sft_run / 'checkpoints'}", f"data.tokenizer_path={sft_run / 'data' / 'tokenizer.model'}",
            "objective.name=acpo", "train.train_steps=4"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(straight, *init)
    train(resumed, *init, "train.exit_interval=2")
    assert [m["step"] for m in metrics(resumed)] == [1, 2], "exit_interval did not stop the first launch"
    log = train(resumed, *init)
    assert "resumed from" in log
    a, b = metrics(straight), metrics(resumed)
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    for ma, mb in zip(a, b):
        for k in ma.keys() - TIMING_KEYS:
            assert ma[k] == mb[k], (ma["step"], k, ma[k], mb[k])
    res = tmp_path / "cmp.json"
    run_python([str(REPO / "tests" / "dist" / "compare_ckpts.py"), str(straight / "config.json"),
                str(straight / "checkpoints" / "iter_0000004"), str(resumed / "checkpoints" / "iter_0000004"), str(res)])
    cmp = json.loads(res.read_text())
    assert cmp["keys_match"] and cmp["num_tensors"] > 20
    assert cmp["max_abs_diff"] == 0.0, cmp
    # and training actually moved the weights away from the SFT start (the comparison is not vacuous)
    run_python([str(REPO / "tests" / "dist" / "compare_ckpts.py"), str(straight / "config.json"),
                str(sft_run / "checkpoints" / "iter_0000006"), str(straight / "checkpoints" / "iter_0000004"), str(res)])
    assert json.loads(res.read_text())["max_abs_diff"] > 1e-4


def test_sft_loss_decreases(sft_run):
    losses = [m["loss"] for m in metrics(sft_run)]
    assert losses[-1] < losses[0] - 0.1, losses


def test_demo_configs_sft_then_acpo(tmp_path):
    """The demo's own configs, shortened: SFT lowers its loss; ACPO from it starts at ln 2 and goes below."""
    sft, acpo = tmp_path / "sft", tmp_path / "acpo"
    cfgs = REPO / "launch" / "configs"
    run_torchrun(["-m", "megatron_po.train", "--config", str(cfgs / "demo_sft.yaml"), f"output_dir={sft}",
                  "train.train_steps=12", "train.progress_bar=false"])
    s = [m["loss"] for m in metrics(sft)]
    assert sum(s[-3:]) / 3 < s[0] - 0.2, s
    run_torchrun(["-m", "megatron_po.train", "--config", str(cfgs / "demo_acpo.yaml"), f"output_dir={acpo}",
                  f"checkpoint.init_from={sft / 'checkpoints'}", f"data.tokenizer_path={sft / 'data' / 'tokenizer.model'}",
                  "train.train_steps=12", "train.progress_bar=false"])
    rows = metrics(acpo)
    # held-out evaluation at step 0 (before any update) and at the end: the Δlog p probe starts at 0
    evals = [r for r in rows if "eval/delta_logp" in r]
    assert [r["step"] for r in evals] == [0, 10, 12], [r["step"] for r in evals]
    assert evals[0]["eval/delta_logp"] == 0.0 and evals[-1]["eval/delta_logp"] != 0.0
    assert evals[0]["eval/rewards/margins"] == 0.0 and evals[-1]["eval/rewards/margins"] != 0.0
    for r in evals:
        assert 0.0 <= r["probe/hallucination_rate"] <= 1.0 and 0.0 <= r["probe/accuracy"] <= 1.0
    a = [r for r in rows if "loss" in r]
    assert abs(a[0]["loss"] - math.log(2)) < 1e-6, a[0]["loss"]  # reference == SFT policy at step 0
    assert a[0]["acpo/alpha_hat_mean"] == pytest.approx(0.95)   # sgn(0) := -1 => alpha_hat = hi at step 0
    assert sum(m["loss"] for m in a[-3:]) / 3 < math.log(2) - 0.01, [m["loss"] for m in a]
    assert a[-1]["rewards/margins"] > 0


def test_beta_dpo_ema_state_is_checkpointed(tmp_path, sft_run):
    """beta-DPO's EMA of margin statistics advances once per step and resumes exactly from a checkpoint."""
    init = [f"checkpoint.init_from={sft_run / 'checkpoints'}", f"data.tokenizer_path={sft_run / 'data' / 'tokenizer.model'}",
            "objective.name=beta_dpo", "objective.params.rho=0.5", "train.train_steps=3"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(straight, *init)
    train(resumed, *init, "train.exit_interval=1")
    train(resumed, *init)
    a, b = metrics(straight), metrics(resumed)
    assert [m["step"] for m in b] == [1, 2, 3]
    for ma, mb in zip(a, b):
        for k in ma.keys() - TIMING_KEYS:
            assert ma[k] == mb[k], (ma["step"], k, ma[k], mb[k])
    assert all(m["beta_dpo/frac_kept"] == 0.5 for m in a)  # 2 of the 4 pairs of each step
    state_a = json.loads((straight / "checkpoints" / "iter_0000003" / "trainer_state.json").read_text())
    state_b = json.loads((resumed / "checkpoints" / "iter_0000003" / "trainer_state.json").read_text())
    assert state_a["objective_state"] == state_b["objective_state"]
    assert state_a["objective_state"]["gap_std"] > 0  # the EMA moved away from its initial (0, 0)


P2_KEYS = {"p2/focus_loss", "p2/calib_loss", "p2/robust_loss", "p2/focus_logit_mean", "p2/calib_logit_mean",
           "p2/robust_logit_mean", "p2/focus_accuracy", "p2/robust_accuracy", "p2/calib_gain_policy",
           "p2/w_focus_mean", "p2/w_focus_min", "p2/w_focus_max", "p2/frac_single_branch"}


def test_p2_dpo_demo_config_from_sft(tmp_path, sft_run):
    """P2-DPO through the CLI with its demo config (shortened; TP=2 + SP, 2 micro-batches): the synthetic source
    writes P2 samples, every row kind runs, the §9.6 metrics are logged, and the DPO branches move off ln 2."""
    out = tmp_path / "p2"
    run_torchrun(["-m", "megatron_po.train", "--config", str(REPO / "launch" / "configs" / "demo_p2_dpo.yaml"),
                  f"output_dir={out}", f"checkpoint.init_from={sft_run / 'checkpoints'}",
                  f"data.tokenizer_path={sft_run / 'data' / 'tokenizer.model'}", "data.num_train=32",
                  "train.train_steps=4", "train.global_batch_size=4", "train.micro_batch_size=2", "optim.lr=5e-4",
                  "eval.interval=4", "eval.max_pairs=8", "eval.probe_images=4", "train.progress_bar=false"])
    assert (out / "data" / "p2_train.jsonl").is_file()
    rows = metrics(out)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    # a global batch without any sample of a branch logs no statistic of it (step 2 here: robust-only samples)
    assert P2_KEYS <= set().union(*train_rows), P2_KEYS - set().union(*train_rows)
    assert "p2/focus_loss" not in train_rows[1] and train_rows[1]["p2/frac_focus"] == 0.0
    for r in train_rows:
        assert all(math.isfinite(r[k]) for k in (P2_KEYS & set(r)) | {"loss", "grad_norm", "p2/frac_robust"})
        assert 0.3 <= r.get("p2/w_focus_min", 0.3) <= r.get("p2/w_focus_max", 0.7) <= 0.7
    # step 0: the reference is the SFT policy, so both DPO branches are exactly ln 2 (calibration is not: its
    # reference gain is on y_l^f by default)
    first = train_rows[0]
    assert abs(first["p2/focus_loss"] - math.log(2)) < 1e-6 and abs(first["p2/robust_loss"] - math.log(2)) < 1e-6
    assert first["p2/focus_logit_mean"] == 0.0 and first["p2/robust_logit_mean"] == 0.0
    last = train_rows[-1]
    assert last["p2/focus_loss"] < math.log(2) and last["p2/robust_loss"] < math.log(2), last
    # held-out pairs are scored by the policy (P2-DPO takes no pairs, so no eval/rewards), and the probe runs
    evals = [r for r in rows if "eval/delta_logp" in r]
    assert [r["step"] for r in evals] == [0, 4] and evals[-1]["eval/delta_logp"] != 0.0
    assert not any(k.startswith("eval/rewards") for k in evals[-1])
    assert 0.0 <= evals[-1]["probe/accuracy"] <= 1.0
