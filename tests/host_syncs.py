"""Counting the calls that make the host wait for the device, on any device (the CPU included).

On a GPU, every call that needs a device tensor's *value* on the host (`.item()`, `int(t)`, `bool(t)`,
`.tolist()`, `.nonzero()`, boolean-mask indexing, `masked_select`, `torch.unique`, ...) blocks the CPU until the
GPU has caught up with everything queued before it: the next kernels are not launched in the meantime, and the
GPU idles. On the CPU these calls cost nothing, which is why they creep in; this module finds them on the CPU, so
CI can keep the per-micro-batch path free of them before any GPU runs it.

    from host_syncs import count_host_syncs, assert_no_host_syncs

    with assert_no_host_syncs():          # raises listing each call and where it was made
        logps = response_token_logps(...)

    with count_host_syncs() as syncs:     # or just collect them
        ...
    assert [s.op for s in syncs] == [...]

A `TorchFunctionMode` sees every torch function and Tensor method called from Python (in this thread, custom
autograd Functions' backward included), whatever the tensor's device. What it cannot see: calls made inside C++
(autograd's own derivative formulas: e.g. the backward of `masked_scatter` with respect to its source is a
`masked_select`), pageable host-to-device copies (a `.to("cuda", non_blocking=True)` from unpinned memory is
synchronous but looks like any `.to`), and ops whose *output shape* depends on data reached through an op not
listed here. The lists below are the Python-level entry points known to synchronise on CUDA. On the CPU every
tensor is a host tensor, so a read of one that stays on the host on a GPU too counts; `HOST_ONLY` names the call
sites known to be of that kind.
"""

from __future__ import annotations

import contextlib
import os
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack

# the value of a tensor read on the host
_READS: dict[Callable, str] = {
    torch.Tensor.item: "item",
    torch.Tensor.tolist: "tolist",
    torch.Tensor.__bool__: "__bool__",
    torch.Tensor.__int__: "__int__",
    torch.Tensor.__float__: "__float__",
    torch.Tensor.__index__: "__index__",
    torch.Tensor.__complex__: "__complex__",
    torch.Tensor.numpy: "numpy",
    torch.Tensor.cpu: "cpu",
    torch.is_nonzero: "is_nonzero",
    torch.equal: "equal",
    torch.allclose: "allclose",
    torch.Tensor.allclose: "allclose",
    torch.Tensor.equal: "equal",
}

# an output whose shape depends on the values: the host waits to learn it
_DATA_DEPENDENT: dict[Callable, str] = {
    torch.Tensor.nonzero: "nonzero",
    torch.nonzero: "nonzero",
    torch.argwhere: "argwhere",
    torch.Tensor.argwhere: "argwhere",
    torch.masked_select: "masked_select",
    torch.Tensor.masked_select: "masked_select",
    torch.unique: "unique",
    torch.Tensor.unique: "unique",
    torch.unique_consecutive: "unique_consecutive",
    torch.Tensor.unique_consecutive: "unique_consecutive",
    torch.bincount: "bincount",
    torch.Tensor.bincount: "bincount",
}


def _has_bool_index(index: Any) -> bool:
    """A boolean (or uint8) tensor anywhere in an indexing expression: indexing or assigning through it needs
    its True count on the host (`x[mask]`, `x[mask] = v`, `x[:, mask]`)."""
    items = index if isinstance(index, (tuple, list)) else (index,)
    return any(torch.is_tensor(i) and i.dtype in (torch.bool, torch.uint8) for i in items)


def _sync_name(func: Callable, args: tuple, kwargs: dict) -> str | None:
    name = _READS.get(func) or _DATA_DEPENDENT.get(func)
    if name is not None:
        return name
    if func is torch.Tensor.__getitem__ and len(args) > 1 and _has_bool_index(args[1]):
        return "__getitem__[bool]"
    if func is torch.Tensor.__setitem__ and len(args) > 1 and _has_bool_index(args[1]):
        return "__setitem__[bool]"
    if func in (torch.Tensor.index_put_, torch.Tensor.index_put, torch.index_put) and len(args) > 1 \
            and _has_bool_index(args[1]):
        return "index_put[bool]"
    if func in (torch.masked_scatter, torch.Tensor.masked_scatter, torch.Tensor.masked_scatter_) \
            and torch.is_grad_enabled() and len(args) > 2 and torch.is_tensor(args[2]) and args[2].requires_grad:
        # no sync in forward (a prefix sum on CUDA), but the source's gradient is a masked_select, in C++ where
        # the mode cannot see it
        return "masked_scatter (backward: masked_select)"
    if func in (torch.where, torch.Tensor.where) and len(args) + len(kwargs) == 1:  # torch.where(cond) = nonzero
        return "where(cond)"
    if func in (torch.repeat_interleave, torch.Tensor.repeat_interleave) and "output_size" not in kwargs \
            and len(args) > 1 and torch.is_tensor(args[1]):  # the output length is the sum of the repeats
        return "repeat_interleave"
    return None


_HERE = os.path.abspath(__file__)
_SKIPPED = (os.path.dirname(os.path.abspath(torch.__file__)), os.path.dirname(os.path.abspath(contextlib.__file__)))

HOST_ONLY: tuple[tuple[str, str], ...] = (
    # megatron's RNG tracker compares the CPU generator's state (torch.get_rng_state(), a CPU tensor on a GPU too)
    # around every forked region (the local spec's attention dropout): host memory, nothing to wait for
    ("megatron/core/tensor_parallel/random.py", "fork"),
)
"""(path suffix, function) of call sites known to read host tensors only: never counted."""


def _call_site() -> tuple[str, str, str]:
    """(path, function, "file:line in function: source") of the innermost frame outside torch, the standard
    library's contextlib and this module: the line that asked for the sync."""
    for frame in reversed(traceback.extract_stack()):
        path = os.path.abspath(frame.filename)
        if path != _HERE and not path.startswith(_SKIPPED):
            where = f"{os.path.relpath(path)}:{frame.lineno} in {frame.name}: {(frame.line or '').strip()}"
            return path, frame.name, where
    return "", "", "<unknown>"


@dataclass(frozen=True)
class HostSync:
    op: str
    """What synchronised: e.g. ``item``, ``__bool__``, ``nonzero``, ``__getitem__[bool]``."""
    where: str
    """file:line in function: source of the call that asked for it."""

    def __str__(self) -> str:
        return f"{self.op} at {self.where}"


class HostSyncCounter(TorchFunctionMode):
    """Records every host-synchronising tensor call made while active (this thread only); calls still run."""

    def __init__(self, host_only: tuple[tuple[str, str], ...] = HOST_ONLY) -> None:
        super().__init__()
        self.syncs: list[HostSync] = []
        self.host_only = host_only

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _sync_name(func, args, kwargs)
        if name is not None:
            path, function, where = _call_site()
            if not any(path.endswith(p) and function == f for p, f in self.host_only):
                self.syncs.append(HostSync(name, where))
        return func(*args, **kwargs)


@contextlib.contextmanager
def count_host_syncs(host_only: tuple[tuple[str, str], ...] = HOST_ONLY) -> Iterator[list[HostSync]]:
    """Collects the host syncs of the block into the yielded list (filled as they happen), except those made by
    the `host_only` call sites (path suffix, function). Custom autograd Functions' Python `backward` is watched
    too (autograd runs it with the mode stack cleared: the mode is pushed again around each one)."""
    mode = HostSyncCounter(host_only)
    backward_apply = torch.autograd.function.BackwardCFunction.apply

    def watched_backward(ctx, *args):
        if mode in _get_current_function_mode_stack():
            return backward_apply(ctx, *args)
        with mode:
            return backward_apply(ctx, *args)

    torch.autograd.function.BackwardCFunction.apply = watched_backward
    try:
        with mode:
            yield mode.syncs
    finally:
        torch.autograd.function.BackwardCFunction.apply = backward_apply


@contextlib.contextmanager
def assert_no_host_syncs(what: str = "block", host_only: tuple[tuple[str, str], ...] = HOST_ONLY
                         ) -> Iterator[None]:
    """Raises AssertionError after the block if anything in it synchronised the host with the device."""
    with count_host_syncs(host_only) as syncs:
        yield
    if syncs:
        lines = "\n  ".join(map(str, syncs))
        raise AssertionError(f"{what}: {len(syncs)} host sync(s):\n  {lines}")
