"""Context parallelism's reductions, on CPU (tests/dist/cp_worker.py): two gloo ranks each hold half of every
row's tokens; sums, losses, α̂, gradients and the loss normaliser equal the whole rows'. The attention across CP
ranks is TE's and needs GPUs; the trainer refuses cp > 1 on the CPU backend."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import REPO, run_torchrun
from megatron_po.config import ConfigError, ParallelConfig, load_config
from megatron_po.parallel.context import cp_positions


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("cp")
    run_torchrun([str(REPO / "tests" / "dist" / "cp_worker.py"), str(out)], nproc=2)
    return json.loads((out / "cp.json").read_text())


@pytest.mark.multirank
def test_cp_sums_losses_and_gradients_equal_whole_rows(report):
    assert set(report) == {"dpo", "aspo", "acpo"}
    for name, ranks in report.items():
        for r in ranks:
            for key in ("seq_rel", "segments_rel", "loss_rel", "grad_rel", "decoder_input_rel", "alpha_rel"):
                assert r.get(key, 0.0) <= 1e-12, (name, key, r)
            assert r["count"] == r["num_samples"], (name, r)  # counted once per CP group, summed over it
            assert r["megatron_split"], name


@pytest.mark.multirank
def test_each_rank_holds_image_slots_of_its_own(report):
    ranks = report["dpo"]
    assert sum(r["image_slots_here"] for r in ranks) == ranks[0]["image_slots_total"]
    assert all(0 < r["image_slots_here"] < r["image_slots_total"] for r in ranks)


@pytest.mark.pure
@pytest.mark.parametrize("cp", [1, 2, 4])
def test_positions_partition_each_row_in_balanced_chunks(cp):
    seq = 8 * cp
    parts = [cp_positions(seq, cp, r) for r in range(cp)]
    assert torch.equal(torch.sort(torch.cat(parts)).values, torch.arange(seq))
    # causal work per rank (sum of positions + 1) is equal: chunks r and 2cp-1-r
    work = {int((p + 1).sum()) for p in parts}
    assert len(work) == 1
    if cp > 1:
        with pytest.raises(ValueError, match="2 x cp"):
            cp_positions(seq + 2, cp, 0)


@pytest.mark.pure
def test_cpu_backend_refuses_cp():
    from megatron_po.parallel.groups import init_parallel

    with pytest.raises(ValueError, match="needs Transformer-Engine attention"):
        init_parallel(ParallelConfig(cp=2, backend="gloo"), seed=0)


@pytest.mark.pure
def test_packing_with_cp_is_refused():
    with pytest.raises(ConfigError, match="data.packing with parallel.cp"):
        load_config(None, ["data.packing=true", "parallel.cp=2"])
