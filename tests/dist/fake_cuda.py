"""Runs a script as it would run on a GPU machine, on a CPU one: `torch.cuda.is_available()` answers True from
before megatron_po is imported. Checks the CPU backend's guard before and after the run.

    python fake_cuda.py SCRIPT [ARGS...]
    python fake_cuda.py -m MODULE [ARGS...]

Prints `guard: refused` twice when an unrequested `enable_cpu_backend()` and `parallel.backend=auto` refuse the CPU
path on this "CUDA machine", both before SCRIPT ran and after it (which may have switched this process to the CPU
backend on request), and `cpu process: CUDA hidden` when SCRIPT did switch it and the process no longer sees CUDA.
"""

from __future__ import annotations

import runpy
import sys

import torch

torch.cuda.is_available = lambda: True  # what a GPU machine says; the CPU-only torch cannot do more than say it


def check_guard() -> None:
    from megatron_po.config import ParallelConfig
    from megatron_po.parallel.cpu import enable_cpu_backend
    from megatron_po.parallel.groups import resolve_backend

    try:
        enable_cpu_backend()
    except RuntimeError as e:
        assert "CUDA" in str(e), e
    else:
        raise AssertionError("enable_cpu_backend() without a request ran on a CUDA machine")
    assert resolve_backend(ParallelConfig()) == "nccl", "backend=auto took the CPU path on a CUDA machine"
    print("guard: refused", flush=True)


def check_cpu_process() -> None:
    """After an explicit CPU request the process sees no CUDA: e.g. `model.spec=auto` picks the local spec even
    where Transformer-Engine is installed (the cluster image), instead of TE modules on CPU tensors."""
    from megatron_po.config import ModelConfig
    from megatron_po.models import specs
    from megatron_po.parallel.cpu import cpu_backend_enabled

    if not cpu_backend_enabled():
        return
    specs.have_te = lambda: True
    assert not torch.cuda.is_available() and not specs.use_te_spec(ModelConfig()), "CUDA still visible"
    print("cpu process: CUDA hidden", flush=True)


if __name__ == "__main__":  # dist_checkpointing's async writer re-imports __main__ in its helper process
    check_guard()
    script, *args = sys.argv[1:]
    try:
        if script == "-m":  # python -m MODULE ARGS...
            sys.argv = args
            runpy.run_module(args[0], run_name="__main__", alter_sys=True)
        else:
            sys.argv = [script, *args]
            runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        if e.code:
            raise
    check_guard()
    check_cpu_process()
