"""Tiny end-to-end runs of the real driver under torchrun: resume exactness (also across TP/PP layouts), metrics
that are global over DP, and the demo stages."""

import json
import math
import shutil
from pathlib import Path

import pytest

from conftest import REPO, timing_keys, assert_metrics_equal, read_metrics, run_python, run_torchrun
from megatron_po.objectives.beta_dpo import initial_state as beta_dpo_initial_state

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# padding differs by layout (sequence parallelism pads rows to a multiple of the TP size), so does this
LAYOUT_KEYS = {"data/padding_efficiency", "tokens/processed"}
COMMON = ["parallel.tp=2", "parallel.sp=true", "train.progress_bar=false", "data.num_train=64",
          "train.global_batch_size=4", "train.micro_batch_size=2", "optim.lr=5e-3", "optim.adam_eps=1e-3"]
# the other layouts of the same 2 processes (COMMON's TP=2 + SP is the reference layout)
PP2 = ["parallel.tp=1", "parallel.sp=false", "parallel.pp=2"]
DP2 = ["parallel.tp=1", "parallel.sp=false"]
# fp32 across layouts: reductions run in another order (measured: at most ~0.3 of this tolerance, on margins, which
# are differences of log-probs ~50 in size)
REL_TOL, ABS_TOL = 1e-5, 1e-6
LAYOUT_WEIGHT_TOL = 1e-4  # max |w_a - w_b| after 4 steps across layouts (measured 1.2e-7; movement from init ~1e-2)


metrics = read_metrics


def train(out: Path, *overrides: str) -> str:
    return run_torchrun(["-m", "megatron_po.train", f"output_dir={out}", *COMMON, *overrides])


def assert_metrics_close(a: list[dict], b: list[dict]) -> float:
    """Same steps, same keys, values within REL_TOL / ABS_TOL (non-numbers, e.g. "nan", equal); returns the largest
    |difference| / tolerance seen."""
    assert [m["step"] for m in a] == [m["step"] for m in b]
    worst = 0.0
    for ma, mb in zip(a, b):
        assert ma.keys() == mb.keys(), (ma["step"], ma.keys() ^ mb.keys())
        for k in sorted(ma.keys() - timing_keys(ma) - LAYOUT_KEYS):
            x, y = ma[k], mb[k]
            if not (isinstance(x, (int, float)) and isinstance(y, (int, float))):
                assert x == y, (ma["step"], k, x, y)
                continue
            assert math.isclose(x, y, rel_tol=REL_TOL, abs_tol=ABS_TOL), (ma["step"], k, x, y)
            worst = max(worst, abs(x - y) / max(REL_TOL * max(abs(x), abs(y)), ABS_TOL))
    return worst


def compare_ckpts(cfg_json: Path, ref: Path, *others: Path, out: Path) -> dict:
    """tests/dist/compare_ckpts.py: every checkpoint of `others` vs `ref`, all loaded into one TP=1, PP=1 model."""
    run_python([str(REPO / "tests" / "dist" / "compare_ckpts.py"), str(cfg_json), str(ref), *map(str, others),
                str(out)])
    cmp = json.loads(out.read_text())
    assert cmp["keys_match"] and cmp["num_tensors"] > 20, cmp
    return cmp


def ckpt(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"iter_{step:07d}"


def copy_run(src: Path, dst: Path) -> Path:
    """A copy of a stopped run's output_dir, to resume it here without touching a shared fixture."""
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    train(out, "objective.name=sft", "train.train_steps=6")
    return out


@pytest.fixture(scope="module")
def acpo_init(sft_run) -> list[str]:
    """ACPO from the SFT checkpoint, 4 steps, held-out evaluation + probe at steps 0, 2 and 4 (8 pairs and 8 probe
    records: a multiple of DP=2 x micro-batch 2, so every layout scores the same ones)."""
    return [f"checkpoint.init_from={sft_run / 'checkpoints'}",
            f"data.tokenizer_path={sft_run / 'data' / 'tokenizer.model'}", "objective.name=acpo",
            "train.train_steps=4", "eval.interval=2", "eval.max_pairs=8", "eval.probe_images=4"]


@pytest.fixture(scope="module")
def acpo_straight(tmp_path_factory, acpo_init):
    """The reference run: 4 steps straight at TP=2 + SP."""
    out = tmp_path_factory.mktemp("acpo_straight")
    train(out, *acpo_init)
    return out


@pytest.fixture(scope="module")
def acpo_half(tmp_path_factory, acpo_init):
    """The same run stopped by exit_interval after step 2 (TP=2 + SP). Never relaunched in place: tests resume a
    copy of it."""
    out = tmp_path_factory.mktemp("acpo_half")
    train(out, *acpo_init, "train.exit_interval=2")
    assert [m["step"] for m in metrics(out)] == [0, 1, 2], "exit_interval did not stop the first launch"
    return out


def test_resume_equals_straight_run(tmp_path, sft_run, acpo_init, acpo_straight, acpo_half):
    """4 steps straight vs 2 steps + exit + relaunch: same weights and the same logged metrics (evaluation too)."""
    resumed = copy_run(acpo_half, tmp_path / "resumed")
    log = train(resumed, *acpo_init)
    assert "resumed from" in log
    assert [m["step"] for m in metrics(resumed)] == [0, 1, 2, 3, 4]
    assert_metrics_equal(metrics(acpo_straight), metrics(resumed))
    cmp = compare_ckpts(acpo_straight / "config.json", ckpt(acpo_straight, 4), ckpt(resumed, 4),
                        ckpt(sft_run, 6), out=tmp_path / "cmp.json")
    assert cmp["max_abs_diffs"][0] == 0.0, cmp
    # and training actually moved the weights away from the SFT start (the comparison is not vacuous)
    assert cmp["max_abs_diffs"][1] > 1e-3, cmp


def test_checkpoints_across_pipeline_layouts(tmp_path, sft_run, acpo_init, acpo_straight, acpo_half):
    """A checkpoint written at PP=2 resumes at TP=2 + SP, and one written at TP=2 + SP resumes at PP=2: both give
    the straight TP=2 run's metrics and weights, to fp32 tolerance (the layouts reduce in other orders)."""
    # (a) steps 1-2 at PP=2, steps 3-4 at TP=2 + SP
    pp_first = tmp_path / "pp_first"
    train(pp_first, *acpo_init, *PP2, "train.exit_interval=2")
    assert [m["step"] for m in metrics(pp_first)] == [0, 1, 2], "exit_interval did not stop the PP=2 launch"
    assert "resumed from" in train(pp_first, *acpo_init)
    worst_a = assert_metrics_close(metrics(acpo_straight), metrics(pp_first))
    # (b) steps 1-2 at TP=2 + SP, steps 3-4 at PP=2 (which writes the final checkpoint)
    tp_first = copy_run(acpo_half, tmp_path / "tp_first")
    assert "resumed from" in train(tp_first, *acpo_init, *PP2)
    worst_b = assert_metrics_close(metrics(acpo_straight), metrics(tp_first))
    # both final checkpoints load into compare_ckpts' TP=1, PP=1 model (the PP=2-written one included)
    cmp = compare_ckpts(acpo_straight / "config.json", ckpt(acpo_straight, 4), ckpt(pp_first, 4), ckpt(tp_first, 4),
                        ckpt(sft_run, 6), out=tmp_path / "cmp.json")
    print(f"metrics |diff|/tol: PP2->TP2 {worst_a:.3f}, TP2->PP2 {worst_b:.3f}; weights vs straight, init: "
          f"{cmp['max_abs_diffs']}")
    pp_to_tp, tp_to_pp, from_init = cmp["max_abs_diffs"]
    assert pp_to_tp < LAYOUT_WEIGHT_TOL and tp_to_pp < LAYOUT_WEIGHT_TOL, cmp
    assert from_init > 100 * LAYOUT_WEIGHT_TOL, cmp  # the weights did move: the comparison is not vacuous


def test_dp2_metrics_are_global(tmp_path, acpo_init, acpo_straight):
    """DP=2 logs what TP=2 (DP=1) logs for the same global batches: training metrics and the held-out
    evaluation and probe are gathered over DP before rank 0 logs them, never rank-local."""
    dp2 = tmp_path / "dp2"
    train(dp2, *acpo_init, *DP2)
    a, b = metrics(acpo_straight), metrics(dp2)
    assert [m["step"] for m in b] == [0, 1, 2, 3, 4]
    assert [m["step"] for m in b if "eval/delta_logp" in m] == [0, 2, 4]
    assert all("probe/accuracy" in m and "eval/rewards/margins" in m for m in b if m["step"] % 2 == 0)
    worst = assert_metrics_close(a, b)
    print(f"metrics |diff|/tol DP2 vs TP2: {worst:.3f}")


def test_sft_loss_decreases(sft_run):
    losses = [m["loss"] for m in metrics(sft_run)]
    assert losses[-1] < losses[0] - 0.1, losses


def test_demo_sft_sees_then_acpo(tmp_path):
    """The demo's own SFT stage, whole (2,400 steps, ~4 min: a shorter schedule decays the LR before the model
    starts to look — 1,600 steps end at accuracy 0.70) learns to look at the image: its POPE probe (384 yes/no
    questions about held-out images, half about absent objects) goes from chance to an accuracy a blind model
    cannot reach — answering from the question alone scores 0.5 ± 0.026 (one s.d.), and a model that ignores the
    pixels gives every image the same answers (measured 0.50 -> 0.89, F1 0.90). ACPO from it starts at ln 2 and
    goes below."""
    sft, acpo = tmp_path / "sft", tmp_path / "acpo"
    cfgs = REPO / "launch" / "configs"
    run_torchrun(["-m", "megatron_po.train", "--config", str(cfgs / "demo_sft.yaml"), f"output_dir={sft}",
                  "eval.interval=2400", "train.progress_bar=false"], timeout=1200)
    rows = metrics(sft)
    s = [m["loss"] for m in rows if "loss" in m]
    assert sum(s[-3:]) / 3 < s[0] - 2.0, s
    probes = [m for m in rows if "probe/accuracy" in m]
    assert [m["step"] for m in probes] == [0, 2400]
    assert abs(probes[0]["probe/accuracy"] - 0.5) < 0.1, probes[0]
    assert probes[-1]["probe/accuracy"] >= 0.8 and probes[-1]["probe/f1"] >= 0.8, probes[-1]
    run_torchrun(["-m", "megatron_po.train", "--config", str(cfgs / "demo_acpo.yaml"), f"output_dir={acpo}",
                  f"checkpoint.init_from={sft / 'checkpoints'}", f"data.tokenizer_path={sft / 'data' / 'tokenizer.model'}",
                  "train.train_steps=12", "eval.interval=10", "train.progress_bar=false"])
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
    """beta-DPO's EMA of margin statistics advances once per step and resumes exactly from a checkpoint taken after
    it moved away from its initial value."""
    init = [f"checkpoint.init_from={sft_run / 'checkpoints'}", f"data.tokenizer_path={sft_run / 'data' / 'tokenizer.model'}",
            "objective.name=beta_dpo", "objective.params.rho=0.5", "train.train_steps=4"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(straight, *init)
    train(resumed, *init, "train.exit_interval=2")
    first = metrics(resumed)
    assert [m["step"] for m in first] == [1, 2], "exit_interval did not stop the first launch"
    saved = json.loads((ckpt(resumed, 2) / "trainer_state.json").read_text())["objective_state"]
    # the state the relaunch must restore has moved: from the initial (0, 0), and from the state after step 1 (the
    # EMA after a step is logged as beta_dpo/gap_*; at step 1 the policy is the reference, so M = 0 and it is still
    # the initial state)
    assert saved != beta_dpo_initial_state() and saved["gap_std"] > 0, saved
    after = {n: [m[f"beta_dpo/{n}"] for m in first] for n in ("gap_mean", "gap_std")}
    for n in ("gap_mean", "gap_std"):
        assert saved[n] == pytest.approx(after[n][1], rel=1e-5), (n, saved, after)  # logged in fp32
        assert saved[n] != pytest.approx(after[n][0], rel=1e-3, abs=1e-6), (n, saved, after)
    assert "resumed from" in train(resumed, *init)
    a, b = metrics(straight), metrics(resumed)
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    assert_metrics_equal(a, b)
    assert all(m["beta_dpo/frac_kept"] == 0.5 for m in a)  # 2 of the 4 pairs of each step
    state_a = json.loads((ckpt(straight, 4) / "trainer_state.json").read_text())["objective_state"]
    state_b = json.loads((ckpt(resumed, 4) / "trainer_state.json").read_text())["objective_state"]
    assert state_a == state_b
    assert state_a != saved  # and it kept moving after the resume


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


def test_resume_in_the_second_epoch_equals_straight_run(tmp_path):
    """train.epochs=2 over 12 pairs (3 global batches of 4 per epoch, 6 steps), stopped by exit_interval after step
    4 (the second epoch's first batch) and relaunched: the same per-step metrics as the 6 steps straight. The
    relaunched sampler starts inside epoch 2 and must take that epoch's permutation for steps 5 and 6."""
    epochs = ["data.num_train=12", "train.epochs=2", "objective.name=acpo"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(straight, *epochs, "checkpoint.save=false")  # nothing to resume from: its saves would only cost time
    assert [m["step"] for m in metrics(straight)] == [1, 2, 3, 4, 5, 6], "train.epochs=2 is not 2 x 3 steps"
    train(resumed, *epochs, "train.exit_interval=4")
    assert [m["step"] for m in metrics(resumed)] == [1, 2, 3, 4], "exit_interval did not stop the first launch"
    saved = json.loads((ckpt(resumed, 4) / "trainer_state.json").read_text())["sampler"]
    assert saved["consumed_samples"] == 16 and saved["num_samples"] == 12, saved
    assert "resumed from" in train(resumed, *epochs)
    assert_metrics_equal(metrics(straight), metrics(resumed))
