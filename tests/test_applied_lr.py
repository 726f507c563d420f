"""The learning rate each optimizer step applies, measured inside the inner torch optimizer's step() of a real run,
against transformers' schedule (TRL's default: linear decay to 0 after a linear warm-up).

tests/test_config.py checks megatron's scheduler alone against transformers'; this checks the trainer drives it in
the right order. A scheduler stepped before the optimizer shifts every rate one step early (the first update is
then not 0 during warm-up): logged metrics may not show it, and only a "weights moved" margin caught it before.
"""

from __future__ import annotations

import json

import pytest

from conftest import REPO, run_python

pytestmark = pytest.mark.e2e

LR, WARMUP, STEPS = 1e-3, 3, 8


def test_each_step_applies_the_transformers_linear_schedule(tmp_path):
    transformers = pytest.importorskip("transformers")
    import torch

    out = tmp_path / "lr.json"
    run_python([str(REPO / "tests" / "dist" / "applied_lr.py"), str(out), f"output_dir={tmp_path / 'run'}",
                "objective.name=sft", "data.num_train=8", "data.num_eval=2", "train.global_batch_size=2",
                "train.micro_batch_size=2", f"train.train_steps={STEPS}", f"optim.lr={LR}", "optim.min_lr=0",
                "optim.lr_schedule=linear", f"optim.warmup_steps={WARMUP}", "train.progress_bar=false",
                "checkpoint.save=false"])
    got = json.loads(out.read_text())
    reference_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    schedule = transformers.get_linear_schedule_with_warmup(reference_opt, WARMUP, STEPS)
    expected = []
    for _ in range(STEPS):  # the rate transformers' Trainer applies at each step: optimizer.step(), then the schedule
        expected.append(reference_opt.param_groups[0]["lr"])
        reference_opt.step()
        schedule.step()
    assert expected[:WARMUP + 1] == pytest.approx([0.0, LR / 3, 2 * LR / 3, LR])  # what is compared: warm-up, peak
    assert len(got["applied"]) == STEPS, got["applied"]  # one inner step per optimizer step
    assert all(len(rates) == 1 for rates in got["applied"]), got["applied"]  # every param group alike
    assert [rates[0] for rates in got["applied"]] == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert got["logged"] == pytest.approx(expected, rel=1e-12, abs=1e-15)  # and the log says what was applied
