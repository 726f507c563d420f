"""Per-step cost metrics (train/costs.py): every figure in metrics.jsonl of a CPU run, logged at log_interval only,
and the pieces they come from (the device peak table, the resident-memory high-water mark)."""

from __future__ import annotations

import json

import pytest

from conftest import run_torchrun

COST_KEYS = {"time/step", "time/data_wait", "time/reference", "time/statistics", "time/policy", "time/optimizer",
             "tokens/real", "tokens/processed", "throughput/tokens_per_s", "throughput/tokens_per_s_per_device",
             "flops/step_tflop", "flops/tflops_per_device", "mfu", "memory/peak_rss_gib", "memory/baseline_rss_gib",
             "memory/planned_gib"}


@pytest.mark.pure
@pytest.mark.parametrize("name,peak", [("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0),
                                       ("NVIDIA H100 NVL", 835.0), ("NVIDIA H200", 989.4), ("NVIDIA GH200 480GB", 989.4),
                                       ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA B200", 2250.0),
                                       ("Tesla V100-SXM2-32GB", None)])
def test_device_peak_table(name, peak):
    from megatron_po.flops import device_peak_tflops

    assert device_peak_tflops(name) == peak


@pytest.mark.pure
def test_peak_rss_is_reset_per_step():
    """The CPU meter's peak is this step's: an earlier, larger allocation does not show in a later step."""
    import torch

    from megatron_po.train.costs import MemoryMeter

    meter = MemoryMeter(torch.device("cpu"))
    if not meter.resettable:
        pytest.skip("no /proc/self/clear_refs here")
    meter.start()
    big = torch.ones(64 * 2**20 // 4 * 4)  # 256 MiB, touched
    first = meter.peaks()["memory/peak_rss_gib"]
    del big
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    meter.start()
    second = meter.peaks()["memory/peak_rss_gib"]
    assert first - second > 0.2, (first, second)


RUN = ["train.train_steps=4", "train.log_interval=2", "eval.interval=2", "eval.max_pairs=4", "data.num_train=32",
       "data.num_eval=4", "train.global_batch_size=4", "train.micro_batch_size=2", "train.peak_tflops=0.5",
       "train.progress_bar=false", "checkpoint.save=false"]


def _logged_steps(out, *layout: str) -> list[dict]:
    run_torchrun(["-m", "megatron_po.train", f"output_dir={out}", *RUN, *layout], nproc=2)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


@pytest.mark.e2e
def test_every_cost_figure_is_in_metrics_jsonl_of_a_cpu_run(tmp_path):
    steps = _logged_steps(tmp_path / "tp2", "parallel.tp=2", "parallel.sp=true")
    assert [r["step"] for r in steps] == [2, 4]  # log_interval: the other steps are not written
    for r in steps:
        assert COST_KEYS <= r.keys(), COST_KEYS - r.keys()
        assert "time/eval" in r  # an evaluation ran after steps 2 and 4
        phases = sum(r[f"time/{p}"] for p in ("data_wait", "reference", "statistics", "policy", "optimizer"))
        assert 0 < phases <= r["time/step"] * 1.001
        assert r["mfu"] == pytest.approx(r["flops/tflops_per_device"] / 0.5)
        assert r["flops/tflops_per_device"] == pytest.approx(r["flops/step_tflop"] / r["time/step"] / 2)
        assert r["tokens/real"] <= r["tokens/processed"]
        assert r["memory/peak_rss_gib"] > r["memory/baseline_rss_gib"] > 0 and r["memory/planned_gib"] > 0
    # the model FLOPs of a step follow its sequences, not the layout: DP2 with packed rows (other rows, other
    # padding, other ranks' shares) counts the same FLOPs for the same global batches
    packed = _logged_steps(tmp_path / "dp2_packed", "data.packing=true")
    for a, b in zip(steps, packed):
        assert a["tokens/real"] == b["tokens/real"] and a["tokens/processed"] != b["tokens/processed"]
        assert a["flops/step_tflop"] == pytest.approx(b["flops/step_tflop"], rel=1e-12)
