"""GPU-only checks (NCCL backend, Transformer-Engine spec). CI has no GPU: these skip there."""

import json

import pytest
import torch

from conftest import run_torchrun

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (NCCL / TE path)")


def test_cpu_backend_refuses_to_run_on_gpu():
    from megatron_po.parallel.cpu import enable_cpu_backend

    with pytest.raises(RuntimeError, match="CUDA"):
        enable_cpu_backend()


@pytest.mark.parametrize("spec", ["local", "auto"])
def test_nccl_preference_steps(tmp_path, spec):
    nproc = min(2, torch.cuda.device_count())
    run_torchrun(["-m", "megatron_po.train", f"output_dir={tmp_path}", f"parallel.tp={nproc}",
                  f"parallel.sp={'true' if nproc > 1 else 'false'}", "objective.name=dpo", "train.train_steps=3",
                  f"model.spec={spec}", "train.progress_bar=false", "data.num_train=64"], nproc=nproc)
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert abs(rows[0]["loss"] - 0.6931472) < 1e-5
    assert all(r["grad_norm"] > 0 for r in rows)
