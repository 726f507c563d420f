"""Shared helpers: launching multi-rank gloo jobs with torchrun's own rendezvous (no port hunting), and the
single-process gloo groups of in-process model tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def subprocess_env(gpu: bool = False) -> dict:
    """The environment of a test's subprocess: one thread per process, and no CUDA device unless `gpu` (a CPU
    test then takes the gloo path with `parallel.backend=auto` on a GPU host too, as it does in CI)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    if not gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def run_torchrun(args: list[str], nproc: int = 2, timeout: int = 600, cwd: Path | None = None,
                 gpu: bool = False) -> str:
    """Runs `torchrun --standalone --nproc_per_node nproc ARGS`; returns combined output, fails with its tail.

    Args:
        gpu: let the ranks see the machine's CUDA devices (`subprocess_env`).
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    proc = subprocess.run(cmd, cwd=cwd or REPO, env=subprocess_env(gpu), capture_output=True, text=True,
                          timeout=timeout)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        pytest.fail(f"torchrun {' '.join(args)} exited {proc.returncode}:\n{out[-6000:]}")
    return out


def run_python(args: list[str], timeout: int = 300, gpu: bool = False) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=subprocess_env(gpu), capture_output=True,
                          text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        pytest.fail(f"python {' '.join(args)} exited {proc.returncode}:\n{out[-6000:]}")
    return out


TIMING_PREFIXES = ("time/", "throughput/", "flops/", "memory/")
"""Metrics that depend on the machine's speed or memory (train/costs.py): never compared between runs."""


def timing_keys(metrics: dict) -> set:
    """The keys of `metrics` that depend on the machine's speed or memory."""
    return {k for k in metrics if k == "mfu" or k.startswith(TIMING_PREFIXES)}


def read_metrics(out: Path) -> list[dict]:
    """A run's metrics.jsonl, one dict per logged step."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_metrics_equal(a: list[dict], b: list[dict]) -> None:
    """Same steps, same keys, bit-identical values (timings aside): a resumed run against a straight one."""
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for ma, mb in zip(a, b):
        assert ma.keys() == mb.keys(), (ma["step"], ma.keys() ^ mb.keys())
        for k in ma.keys() - timing_keys(ma):
            assert ma[k] == mb[k], (ma["step"], k, ma[k], mb[k])


@pytest.fixture(scope="module")
def groups():
    """One-process gloo parallel groups (TP = PP = DP = 1) for the tests of a module that build models in-process;
    torn down after the module, so the next one may start its own."""
    from megatron_po.config import ParallelConfig
    from megatron_po.parallel.groups import init_parallel, teardown

    g = init_parallel(ParallelConfig(backend="gloo"), seed=0)
    yield g
    teardown()
