"""The trainer's whole step waits for the device a fixed number of times, however many micro-batches it runs:
the reference pass, the policy's forward and backward through megatron's schedule and the loss make no host sync
per micro-batch (tests/host_syncs.py counts them on the CPU); the step's own reads (finiteness and stop flags,
gradient norm, metrics, token counts) happen once."""

from __future__ import annotations

import pytest

from host_syncs import count_host_syncs
from train_state import in_process_run

pytestmark = pytest.mark.pure


def _step_syncs(groups, tmp_path, objective_name: str, micro_batch_size: int, packing: bool) -> tuple[list, list]:
    from megatron_po.train.loop import finish_step, forward_backward, prepare_step

    run = in_process_run(groups, tmp_path, ["data.num_train=16", "train.global_batch_size=8",
                                            f"train.micro_batch_size={micro_batch_size}",
                                            f"objective.name={objective_name}", f"data.packing={str(packing).lower()}"])
    with count_host_syncs() as per_micro_batch:
        prepare_step(run.state, run.batches, 0)
        outputs = forward_backward(run.state, run.batches)
    with count_host_syncs() as per_step:
        finish_step(run.state, outputs)
    return per_micro_batch, per_step


@pytest.mark.parametrize("objective_name,packing", [("acpo", False), ("dpo", True), ("aspo", False)])
def test_no_host_sync_per_micro_batch(groups, tmp_path, objective_name, packing):
    two, fixed_two = _step_syncs(groups, tmp_path / "a", objective_name, 4, packing)
    four, fixed_four = _step_syncs(groups, tmp_path / "b", objective_name, 2, packing)
    # ours: none in the passes; megatron's finalize_model_grads reads the step's pair count once (`if num_tokens
    # > 0`), which is not per micro-batch either
    ours = [str(s) for s in two + four if "megatron_po" in s.where]
    assert ours == [], ours
    assert len(two) == len(four) <= 1, [str(s) for s in two + four]
    # the step's own reads do not grow with the micro-batches either
    assert len(fixed_two) == len(fixed_four), ([str(s) for s in fixed_two], [str(s) for s in fixed_four])
