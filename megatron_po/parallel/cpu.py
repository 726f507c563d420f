"""Run megatron-core on a CPU under gloo.

megatron-core hard-codes CUDA in a handful of places (see ../shared/MEGATRON_ON_CPU.md). This module redirects
exactly those to the CPU so that TP/SP/DP/PP, the optimizer and dist_checkpointing run unchanged on a laptop and
in CI.

On a machine with CUDA the CPU path is taken only on request: `parallel.backend=gloo` said by name (the HF
converter's own 1-rank group, the in-process CPU tests) is a request to run on the CPU; `backend=auto` resolves to
NCCL there and an unrequested `enable_cpu_backend()` raises, so a GPU job never silently trains on the CPU.
"""

from __future__ import annotations

import threading

import torch
from torch.overrides import TorchFunctionMode

_ENABLED = False
_LOCK = threading.Lock()
_CUDA_IS_AVAILABLE = torch.cuda.is_available
"""The CUDA query as it was before `enable_cpu_backend` may have hidden the devices from this process."""


def cuda_present() -> bool:
    """Whether this machine has a usable CUDA device, also after the CPU backend hid it from the process."""
    return bool(_CUDA_IS_AVAILABLE())


def cpu_backend_enabled() -> bool:
    """Whether this process runs megatron on the CPU (`enable_cpu_backend` has run): it cannot start NCCL then."""
    return _ENABLED


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


def enable_cpu_backend(*, requested: bool = False) -> None:
    """Patch the CUDA-only calls of megatron-core so it runs on the CPU (idempotent, main thread).

    Must be called before any megatron model, optimizer or schedule is built.

    Args:
        requested: the run asked for the CPU by name (`parallel.backend=gloo`). Only then may a machine with CUDA
            take this path; the process then stops seeing its CUDA devices (`torch.cuda.is_available()` is False
            from here on, as under `CUDA_VISIBLE_DEVICES=""`), so later checks — `model.spec=auto`'s, megatron's
            own — agree that this process runs on the CPU. (`backend=auto` still means NCCL on this machine, and
            NCCL is then refused in this process: `parallel.groups.init_process_group`.)

    Raises:
        RuntimeError: CUDA is present and the CPU was not requested (also when an earlier request enabled it).
    """
    global _ENABLED
    if cuda_present() and not requested:
        # checked before the idempotence shortcut: an earlier explicit request must not let an unrequested call through
        raise RuntimeError("enable_cpu_backend() called on a machine with CUDA without parallel.backend=gloo: "
                           "use the NCCL path, or ask for the CPU by name")
    with _LOCK:
        if _ENABLED:
            return
        from megatron.core.tensor_parallel import random as mrandom

        if cuda_present():
            # half a CUDA process (CPU tensors, gloo, CUDA's RNG and current device redirected, yet TE layers
            # picked because CUDA answers) would fail far from here: hide the devices instead
            torch.cuda.is_available = lambda: False

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
