"""Run megatron-core on a CPU under gloo.

megatron-core hard-codes CUDA in a handful of places (see ../shared/MEGATRON_ON_CPU.md). This module redirects
exactly those to the CPU so that TP/SP/DP/PP, the optimizer and dist_checkpointing run unchanged on a laptop and
in CI. It is a no-op when a CUDA device is present: `enable_cpu_backend()` refuses to run there, so a GPU job can
never silently train on the CPU path.
"""

from __future__ import annotations

import threading

import torch
from torch.overrides import TorchFunctionMode

_ENABLED = False
_LOCK = threading.Lock()


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # an int device index means "that CUDA device" to torch factories
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA placements made inside megatron-core into CPU placements.

    Covers `device="cuda"` factory kwargs (optimizer, clip_grads, schedules), `Tensor.cuda()` and the
    `tensor.type() == 'torch.cuda.FloatTensor'` assertions in the optimizer / gradient clipping.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # megatron asserts fp32 params/grads via their CUDA type string
            return func(*args).replace("torch.", "torch.cuda.", 1)
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device="cpu")
        if func is torch.Tensor.to and args and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def _cpu_rng_state(device=None, clone=True, graph_safe=False):
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def enable_cpu_backend() -> None:
    """Patch the CUDA-only calls of megatron-core so it runs on the CPU (idempotent, main thread).

    Must be called before any megatron model, optimizer or schedule is built.
    """
    global _ENABLED
    with _LOCK:
        if _ENABLED:
            return
        if torch.cuda.is_available():
            raise RuntimeError("enable_cpu_backend() called on a machine with CUDA: use the NCCL path instead")
        from megatron.core.tensor_parallel import random as mrandom

        # allocation device for TP gather/scatter buffers
        torch.cuda.current_device = lambda: "cpu"
        # the CUDA RNG tracker forks/restores generator states; on CPU the default generator plays that role
        torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
        torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
        # (torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the CPU generator directly)
        torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
        torch.cuda.manual_seed_all = lambda seed: None
        mrandom._get_cuda_rng_state = _cpu_rng_state
        mrandom._set_cuda_rng_state = _set_cpu_rng_state
        # pipeline p2p synchronises the CUDA stream after batched isend/irecv
        torch.cuda.synchronize = lambda device=None: None
        _CudaToCpuMode().__enter__()
        _ENABLED = True
