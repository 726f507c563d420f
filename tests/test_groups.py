"""Process groups (parallel/groups.py): megatron's gloo twins of the data-parallel groups are not created, and the
one megatron component that could read them, the distributed optimizer, trains without them."""

from __future__ import annotations

import json

import pytest
from megatron.core import parallel_state

from conftest import run_torchrun


@pytest.mark.pure
def test_no_gloo_twins_of_the_data_parallel_groups(groups):
    for with_cp in (False, True):
        with pytest.raises(AssertionError, match="not initialized"):
            parallel_state.get_data_parallel_group_gloo(with_context_parallel=with_cp)
    with pytest.raises(AssertionError, match="not initialized"):
        parallel_state.get_expert_data_parallel_group_gloo()


@pytest.mark.e2e
@pytest.mark.slow
def test_distributed_optimizer_trains_without_gloo_groups(tmp_path):
    """DP=2 with the distributed optimizer (its checkpoints are refused on the CPU, see train/loop.py) takes the
    same steps as the replicated Adam."""
    common = ["-m", "megatron_po.train", "objective.name=dpo", "train.train_steps=2", "train.progress_bar=false",
              "data.num_train=32", "checkpoint.save=false", "optim.adam_eps=1e-3"]
    runs = {}
    for distributed in ("false", "true"):
        out = tmp_path / f"distopt_{distributed}"
        run_torchrun([*common, f"output_dir={out}", f"parallel.use_distributed_optimizer={distributed}"], nproc=2)
        runs[distributed] = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(runs["true"]) == 2
    for a, b in zip(runs["false"], runs["true"]):
        for key in ("loss", "grad_norm"):
            assert abs(a[key] - b[key]) < 1e-5 * max(1.0, abs(a[key])), (key, a, b)
