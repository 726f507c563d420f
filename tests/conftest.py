"""Shared helpers: launching multi-rank gloo jobs with torchrun's own rendezvous (no port hunting), and the
single-process gloo groups of in-process model tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_torchrun(args: list[str], nproc: int = 2, timeout: int = 600, cwd: Path | None = None) -> str:
    """Runs `torchrun --standalone --nproc_per_node nproc ARGS`; returns combined output, fails with its tail."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, cwd=cwd or REPO, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        pytest.fail(f"torchrun {' '.join(args)} exited {proc.returncode}:\n{out[-6000:]}")
    return out


def run_python(args: list[str], timeout: int = 300) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        pytest.fail(f"python {' '.join(args)} exited {proc.returncode}:\n{out[-6000:]}")
    return out


@pytest.fixture(scope="module")
def groups():
    """One-process gloo parallel groups (TP = PP = DP = 1) for the tests of a module that build models in-process;
    torn down after the module, so the next one may start its own."""
    from megatron_po.config import ParallelConfig
    from megatron_po.parallel.groups import init_parallel, teardown

    g = init_parallel(ParallelConfig(backend="gloo"), seed=0)
    yield g
    teardown()
