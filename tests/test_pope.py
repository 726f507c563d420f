"""The POPE-style probe (data/pope.py): its metrics against a hand-computed confusion matrix, its three sampling
splits draw what they claim, and a training run reports them per split."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from conftest import subprocess_env
from megatron_po.data.pope import SPLITS, ObjectStats, absent_object, generate_pope_set, pope_metrics
from megatron_po.data.records import read_records
from megatron_po.data.synthetic import COLOURS, SHAPES, generate_synthetic_dataset
from megatron_po.train.evaluate import _pope, probe_answers


@pytest.mark.pure
def test_metrics_equal_the_confusion_matrix_by_hand():
    says_yes = [True, True, False, False, True, False, True, False]
    present = [True, False, True, False, True, False, False, False]
    # TP = 2 (0, 4), FP = 2 (1, 6), FN = 1 (2), TN = 3 (3, 5, 7)
    got = pope_metrics(says_yes, present)
    assert got == pytest.approx({"accuracy": 5 / 8, "precision": 2 / 4, "recall": 2 / 3,
                                 "f1": 2 * (1 / 2) * (2 / 3) / (1 / 2 + 2 / 3), "yes_ratio": 4 / 8})
    # a model that says no to everything: precision and F1 are 0, not a division by zero
    assert pope_metrics([False] * 4, [True, False, True, False])["f1"] == 0.0


@pytest.mark.pure
def test_probe_answers_stay_on_the_log_probs_device():
    """The probe's log-probs live on the last stage's device (CUDA in a GPU job): the answers are computed there,
    whatever the device (the meta device stands in for CUDA here; a CPU-built `present` made every GPU evaluation
    with a probe fail with a device mismatch)."""
    chosen, rejected = torch.tensor([-1.0, -2.0, -3.0, -1.0]), torch.tensor([-2.0, -1.0, -3.0, -4.0])
    present, says_yes = probe_answers(chosen, rejected, [True, True, False, False])
    assert says_yes.tolist() == [True, False, False, False]  # a tie is "no"
    assert present.tolist() == [True, True, False, False]
    present, says_yes = probe_answers(chosen.to("meta"), rejected.to("meta"), [True, False, True, False])
    assert present.device.type == says_yes.device.type == "meta"


@pytest.fixture(scope="module")
def pope(tmp_path_factory):
    out = tmp_path_factory.mktemp("pope")
    generate_synthetic_dataset(out, num_train=200, num_eval=2, seed=5)
    train = read_records(out / "train.jsonl")
    path = generate_pope_set(out / "pope", train, num_images=40, seed=9)
    return ObjectStats(train), read_records(path), path, train


@pytest.mark.pure
def test_each_split_is_balanced_and_reproducible(pope, tmp_path):
    _, records, path, train = pope
    for split in SPLITS:
        mine = [r for r in records if r.meta["pope"] == split]
        assert sum(r.meta["present"] for r in mine) == sum(not r.meta["present"] for r in mine) == 40
    assert generate_pope_set(tmp_path, train, num_images=40, seed=9).read_bytes() == path.read_bytes()


@pytest.mark.pure
def test_absent_objects_are_drawn_as_their_split_says(pope):
    stats, records, _, _ = pope
    everything = {(c, s) for c in COLOURS for s in SHAPES}
    random_choices = set()
    for r in records:
        if r.meta["present"]:
            continue
        drawn = {(o["colour"], o["shape"]) for o in r.meta["objects"]}
        asked = (r.meta["query"]["colour"], r.meta["query"]["shape"])
        absent = everything - drawn
        assert asked in absent
        split = r.meta["pope"]
        if split == "popular":
            assert stats.frequency[asked] == max(stats.frequency[o] for o in absent)
        elif split == "adversarial":
            score = lambda o: sum(stats.cooccurrence[d, o] for d in drawn)  # noqa: E731
            assert score(asked) == max(score(o) for o in absent)
        else:
            random_choices.add(asked)
    assert len(random_choices) > 5  # spread over the absent objects, not one favourite
    with pytest.raises(ValueError, match="POPE split 'x' unknown"):
        absent_object("x", set(), stats, None)


@pytest.mark.pure
def test_probe_reports_each_split():
    records = [SimpleNamespace(meta={"pope": s}) for s in ("random", "random", "adversarial", "adversarial")]
    got = _pope("probe", records, [True, True, True, False], [True, False, True, False])
    assert got["probe/random/accuracy"] == 0.5 and got["probe/random/yes_ratio"] == 1.0
    assert got["probe/adversarial/f1"] == 1.0 and "probe/popular/f1" not in got


@pytest.mark.e2e
def test_a_run_logs_pope_metrics(tmp_path):
    run = subprocess.run([sys.executable, "-m", "megatron_po.train", f"output_dir={tmp_path}", "train.train_steps=1",
                          "data.num_train=8", "data.num_eval=4", "train.global_batch_size=2", "eval.max_pairs=2",
                          "train.micro_batch_size=2", "train.progress_bar=false", "checkpoint.save=false",
                          "eval.interval=1", "eval.probe_style=pope", "eval.probe_images=2"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    for split in SPLITS:
        assert {f"probe/{split}/{k}" for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")} <= set(last)


@pytest.mark.e2e
def test_eval_entry_scores_alike_in_any_layout(tmp_path):
    """`megatron-po eval`: the same held-out pairs and POPE probe scored by one process and by TP=2 + SP under
    torchrun (same seed: the same weights) give the same numbers."""
    args = [f"output_dir={tmp_path}", "data.num_train=8", "data.num_eval=4", "eval.max_pairs=4",
            "train.global_batch_size=2", "train.micro_batch_size=2", "eval.probe_style=pope", "eval.probe_images=2"]
    env = subprocess_env()
    one = subprocess.run([sys.executable, "-m", "megatron_po.cli", "eval", *args], capture_output=True, text=True,
                         env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "megatron_po.cli", "eval", *args, "parallel.tp=2", "parallel.sp=true"],
                         capture_output=True, text=True, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (json.loads(run.stdout[run.stdout.index("{"):]) for run in (one, two))
    assert a.keys() == b.keys() and {"probe/adversarial/f1", "eval/chosen_logp_per_token"} <= a.keys()
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6, nan_ok=True), k
