"""Building a model whose weights a checkpoint will overwrite: allocated on the device, never initialised.

Megatron's layers take a no-op init method and allocate on the device (`use_cpu_initialization=False`; models/
specs.py reads `model.init_weights`). The families' torch modules (the HF vision towers: InternViT-6B in
InternVL3-78B, replicated on every TP rank) would still run torch's default init on the host and be copied over;
building them under `uninitialised` allocates them on the device and turns torch.nn.init's functions into no-ops,
as transformers' `no_init_weights` does for from_pretrained. Computed buffers (rotary frequencies) are still
computed.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                   "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_",
                   "sparse_")


@contextlib.contextmanager
def uninitialised(device: torch.device) -> Iterator[None]:
    """Modules built inside allocate their parameters on `device` and skip torch.nn.init (main thread only)."""
    saved = {name: getattr(torch.nn.init, name) for name in _INIT_FUNCTIONS if hasattr(torch.nn.init, name)}

    def skip(tensor, *args, **kwargs):
        return tensor

    try:
        for name in saved:
            setattr(torch.nn.init, name, skip)
        with torch.device(device):
            yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)
