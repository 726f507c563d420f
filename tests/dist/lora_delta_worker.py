"""Each adapter adds exactly (α/r)·B A n(x) to its linear's output, on the layer spec the machine runs (one rank
under torchrun; Transformer-Engine on a GPU with TE, the local spec elsewhere).

n is the identity for megatron's linears and the linear's own fused norm for Transformer-Engine's LayerNorm-fused
qkv and fc1 (their forward hook sees the input before that norm: models/lora._te_normalize). For every adapted
linear of a tiny VLM with random B, the output with adapters on minus off is compared with that formula computed
here from the hook's input; prints `LORA_DELTA {json}` with the worst relative error and the specs' linear types.

    torchrun --nproc_per_node 1 tests/dist/lora_delta_worker.py [te|local]
"""

from __future__ import annotations

import json
import sys

import torch

from megatron_po.config import LoraConfig, ModelConfig, ParallelConfig
from megatron_po.models.lora import adapters_off, apply_lora, linear_kind
from megatron_po.models.tiny_vlm.model import build_vlm
from megatron_po.parallel.groups import init_parallel, teardown


def reference_norm(linear, x: torch.Tensor) -> torch.Tensor:
    """The norm a TE LayerNorm-fused linear applies, written from TE's documented RMSNorm (identity elsewhere)."""
    w = getattr(linear, "layer_norm_weight", None)
    if w is None:
        return x
    w = w.float() + (1.0 if getattr(linear, "zero_centered_gamma", False) else 0.0)
    xf = x.float()
    return (xf / xf.pow(2).mean(-1, keepdim=True).add(linear.eps).sqrt() * w).to(x.dtype)


def delta_errors(groups, spec: str) -> dict:
    """Worst relative error of on − off against (α/r)·B A n(x) over the decoder's adapted linears, and their
    types, for a tiny VLM on `spec` (random B)."""
    model = build_vlm(ModelConfig(spec=spec, num_layers=2), ParallelConfig(), 256, groups, seed=1)
    lora = LoraConfig(rank=4, alpha=8.0)
    apply_lora(model, lora, groups.tp, seed=1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.normal_(0, 0.05)
    modules = dict(model.named_modules())
    targets = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
    linears = {name: m for name, m in modules.items() if name.split(".")[-1] in targets and "decoder" in name}
    seen: dict[str, tuple] = {}
    def capture(name):
        def hook(module, args, out) -> None:  # first call only: the adapted forward
            seen.setdefault(name, (args[0].detach(), (out[0] if isinstance(out, tuple) else out).detach()))
        return hook

    for name, m in linears.items():  # registered after the adapter's hook: sees the adapted output
        m.register_forward_hook(capture(name))
    s = 24
    tokens = torch.randint(0, 200, (2, s), device=groups.device)
    pos = torch.arange(s, device=groups.device).expand(2, s)
    mask = torch.ones(1, 1, s, s, dtype=torch.bool, device=groups.device).triu(1)
    worst, kinds = 0.0, {}
    with torch.no_grad():
        model(tokens, pos, mask, None, None)
        with adapters_off(model):  # the same inputs through the bare linears
            offs = {name: linear(seen[name][0]) for name, linear in linears.items()}
    for name, linear in linears.items():
        (x, on), off = seen[name], offs[name]
        off = off[0] if isinstance(off, tuple) else off
        parent, attr = name.rsplit(".", 1)
        adapter = getattr(modules[parent], attr + "_lora")
        want = (reference_norm(linear, x).float() @ adapter.lora_a.float().T @ adapter.lora_b.float().T
                * (lora.alpha / lora.rank))
        worst = max(worst, float(((on - off).float() - want).abs().max() / want.abs().max()))
        kinds[type(linear).__name__] = linear_kind(linear)
    return {"worst_rel": worst, "linears": kinds, "device": str(groups.device)}


def main(spec: str) -> None:
    groups = init_parallel(ParallelConfig(), seed=0)
    print("LORA_DELTA " + json.dumps(delta_errors(groups, spec)), flush=True)
    teardown()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "local")
