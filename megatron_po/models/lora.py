"""LoRA adapters on megatron's parallel linears (model.lora), and the switch that turns them all off.

Each adapted linear W gets W x + (α/r)·B A x, with A [r, in] and B [out, r]; B starts at zero, so the adapted
model starts equal to its base bit for bit. The base weights are frozen; DDP and the optimizer see the adapters only.
Tensor parallelism follows megatron's convention for the layer an adapter sits on:

    column-parallel (linear_qkv, linear_fc1)   A replicated, B split like the layer's output rows
    row-parallel    (linear_proj, linear_fc2)  A split like the layer's input columns, B replicated

and the collectives between A and B are the ones megatron puts between the halves of its own MLP:

    column, TP only: h = A x on every rank; copy_to (backward: all-reduce of dh, since each rank's B-shard
                     contributes to it), then B_k h
    column, SP:      h = A x on the rank's sequence shard; all-gather over the sequence (backward: reduce-scatter);
                     A's gradient is a sum over sequence shards: tagged `sequence_parallel`, as norms are, so
                     megatron's finalize_model_grads all-reduces it over TP
    row, TP only:    h = all-reduce(A_k x_k); B h, the same on every rank
    row, SP:         h = reduce-scatter(A_k x_k) to the sequence shards; B h; B tagged `sequence_parallel`

Why not peft's `LoraParallelLinear` (peft 0.22): it leaves the replicated half untagged under sequence
parallelism (A of a column layer, B of a row layer: their gradients would stay per-shard partial sums), it matches
megatron's own ColumnParallelLinear / RowParallelLinear only (not Transformer-Engine's LayerNorm-fused linear that
the GPU spec puts on qkv and fc1), it sets `params_dtype` on the megatron config it is handed (ours is the model's),
and its wrapper renames every base weight (`base_layer.weight`), which our checkpoints, the HF conversion rules and
the reference cache key on. Megatron-Bridge's PEFT needs Transformer-Engine, which CPU runs cannot have.

The adapter of `<parent>.<linear>` is the module `<parent>.<linear>_lora` (parameters `lora_a`, `lora_b`), and a
forward hook on the linear adds its output; the base linear's own names, sharded keys and code stay as they were.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    get_cuda_rng_tracker,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

DECODER_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
"""The decoder's linears an adapter may sit on (megatron's names; HF: q/k/v_proj, o_proj, gate/up_proj, down_proj)."""
TARGETS = DECODER_TARGETS + ("projector",)
"""model.lora.target_modules' vocabulary: 'projector' adapts both linears of the vision-to-LLM projector."""
SUFFIX = "_lora"


@dataclass(frozen=True)
class AdapterShape:
    kind: str
    """'column', 'row' or 'replicated' (a plain torch Linear: the Qwen2.5-VL patch merger)."""
    in_features: int
    """A's full input width (a row-parallel layer's, over all TP ranks)."""
    out_features: int
    """B's rows on this rank."""
    tp: int
    tp_rank: int
    sequence_parallel: bool
    glu: bool = False
    """B's rows are SwiGLU's [gate; up] of this rank (linear_fc1 of a gated MLP): sharded like megatron's fc1."""


def linear_kind(linear: torch.nn.Module) -> str:
    """'column' | 'row' | 'replicated' for megatron's, Transformer-Engine's and torch's linears."""
    if isinstance(linear, ColumnParallelLinear):
        return "column"
    if isinstance(linear, RowParallelLinear):
        return "row"
    mode = getattr(linear, "parallel_mode", None)  # Transformer-Engine's linears (TELinear, TELayerNormLinear)
    if mode in ("column", "row"):
        return mode
    if isinstance(linear, torch.nn.Linear) or mode == "duplicated":
        return "replicated"
    raise TypeError(f"LoRA cannot adapt {type(linear).__name__}")


class LoraAdapter(torch.nn.Module):
    """B A x · α/r for one linear, split over TP like that linear (module docstring)."""

    def __init__(self, shape: AdapterShape, rank: int, alpha: float, dropout: float, tp_group,
                 dtype: torch.dtype, device, init_name: str, seed: int):
        super().__init__()
        self.shape, self.rank, self.scale, self.dropout, self.tp_group = shape, rank, alpha / rank, dropout, tp_group
        self.enabled = True
        self.normalize: Optional[callable] = None
        """Set for Transformer-Engine's LayerNorm-fused linears, whose hook sees the input before its norm."""
        a_full = init_a(rank, shape.in_features, init_name, seed)
        if shape.kind == "row":  # A split like the layer's input columns (contiguous, as megatron's weight)
            a_full = a_full.chunk(shape.tp, dim=1)[shape.tp_rank]
        self.lora_a = torch.nn.Parameter(a_full.to(device=device, dtype=dtype).contiguous())
        self.lora_b = torch.nn.Parameter(torch.zeros(shape.out_features, rank, device=device, dtype=dtype))
        tp_split = shape.tp > 1
        if shape.kind == "column" and tp_split:  # fc1's B strided like its weight: [gate_r; up_r] on rank r
            set_tensor_model_parallel_attributes(self.lora_b, True, 0, 2 if shape.glu else 1)
        if shape.kind == "row" and tp_split:
            set_tensor_model_parallel_attributes(self.lora_a, True, 1, 1)
        replicated_half = self.lora_a if shape.kind == "column" else self.lora_b
        # fed a sequence shard, replicated over TP: its gradient is summed over TP by finalize_model_grads
        setattr(replicated_half, "sequence_parallel", shape.sequence_parallel and shape.kind != "replicated")

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's addition to the linear's output for the linear's input `x`."""
        s = self.shape
        if self.normalize is not None:
            x = self.normalize(x)
        x = x.to(self.lora_a.dtype)
        if self.dropout and self.training:
            # a row layer's input is split over TP: each shard its own mask (megatron's TP RNG); a column layer's
            # is the same on every TP rank: one mask from the default generator, as megatron's hidden dropout
            fork = get_cuda_rng_tracker().fork() if s.kind == "row" and s.tp > 1 else contextlib.nullcontext()
            with fork:
                x = F.dropout(x, self.dropout, training=True)
        h = F.linear(x, self.lora_a)
        if s.kind == "column" and s.tp > 1:
            h = (gather_from_sequence_parallel_region(h, group=self.tp_group) if s.sequence_parallel
                 else copy_to_tensor_model_parallel_region(h, group=self.tp_group))
        elif s.kind == "row" and s.tp > 1:
            h = (reduce_scatter_to_sequence_parallel_region(h, group=self.tp_group) if s.sequence_parallel
                 else reduce_from_tensor_model_parallel_region(h, group=self.tp_group))
        return F.linear(h, self.lora_b) * self.scale

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
        """A and B as sharded tensors: the split half along its TP axis (fc1's B as SwiGLU's two halves, like the
        fc1 weight), the other one replicated; checkpoints reshard to any TP layout."""
        axis = {"column": {"lora_b": 0}, "row": {"lora_a": 1}, "replicated": {}}[self.shape.kind]
        state = self.state_dict(prefix="", keep_vars=True)
        out = make_sharded_tensors_for_checkpoint(state, prefix, axis, sharded_offsets, tp_group=self.tp_group,
                                                  dp_cp_group=(metadata or {}).get("dp_cp_group"))
        if self.shape.glu:
            out[f"{prefix}lora_b"] = apply_swiglu_sharded_factory(out[f"{prefix}lora_b"], sharded_offsets)
        return out


def init_a(rank: int, in_features: int, name: str, seed: int) -> torch.Tensor:
    """A's full [r, in] initial value: Kaiming-uniform (a=√5), torch's Linear default and peft's, drawn on the CPU
    from (seed, the linear's name in the unsplit model) so every TP/PP layout starts from the same adapters."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform_(a=sqrt(5)) on [r, in]: U(-1/sqrt(in), 1/sqrt(in))
    return (torch.rand(rank, in_features, generator=gen, dtype=torch.float64) * 2 - 1).mul_(bound).float()


def _te_normalize(linear) -> Optional[callable]:
    """The norm a Transformer-Engine LayerNorm-fused linear applies to its input before the GEMM (RMSNorm or
    LayerNorm with its own weight), so the adapter sees what the GEMM sees. None for other linears."""
    weight = getattr(linear, "layer_norm_weight", None)
    if weight is None:
        return None
    eps = float(getattr(linear, "eps", 1e-5))
    centered = bool(getattr(linear, "zero_centered_gamma", False))
    rms = getattr(linear, "normalization", "RMSNorm") == "RMSNorm"

    def normalize(x: torch.Tensor) -> torch.Tensor:
        w = linear.layer_norm_weight.float() + (1.0 if centered else 0.0)
        xf = x.float()
        if rms:
            y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w
        else:
            bias = getattr(linear, "layer_norm_bias", None)
            y = F.layer_norm(xf, (xf.shape[-1],), w, None if bias is None else bias.float(), eps)
        return y.to(x.dtype)

    return normalize


def _hook(adapter: LoraAdapter):
    def add_delta(module, args, output):
        if not adapter.enabled:
            return None
        if isinstance(output, tuple):  # megatron's linears return (output, bias)
            out, *rest = output
            return (out + adapter.delta(args[0]).to(out.dtype), *rest)
        return output + adapter.delta(args[0]).to(output.dtype)

    return add_delta


def _targets(model, targets: set[str]) -> Iterator[tuple[str, torch.nn.Module, str, bool]]:
    """(global name, parent module, attribute, glu) of every linear of this stage that `targets` adapt."""
    lm = model.language_model
    decoder = [t for t in DECODER_TARGETS if t in targets]
    for layer in lm.decoder.layers:
        base = f"language_model.decoder.layers.{layer.layer_number - 1}."  # global number: same on every PP split
        for parent_name, parent in (("self_attention", layer.self_attention), ("mlp", layer.mlp)):
            for attr in decoder:
                if isinstance(getattr(parent, attr, None), torch.nn.Module):
                    yield f"{base}{parent_name}.{attr}", parent, attr, _glu(parent, attr)
    if "projector" in targets and getattr(model, "projector", None) is not None:
        for name, parent in model.projector.named_modules():
            for attr in ("linear_fc1", "linear_fc2"):
                if isinstance(getattr(parent, attr, None), torch.nn.Module):
                    full = f"projector.{name}.{attr}" if name else f"projector.{attr}"
                    yield full, parent, attr, _glu(parent, attr)


def _glu(parent, attr: str) -> bool:
    """fc1 of a gated MLP (megatron's MLP with gated_linear_unit: the decoder's SwiGLU, tiny_vlm's projector): its
    rows on a TP rank are [gate_r; up_r], and B's with them."""
    config = getattr(parent, "config", None)
    return attr == "linear_fc1" and bool(getattr(config, "gated_linear_unit", False))


def apply_lora(model, lora, tp_group, seed: int) -> list[str]:
    """Freezes every weight of `model` (this rank's stage) and adds a trainable adapter to each target linear.

    Args:
        lora: config.LoraConfig (rank, alpha, dropout, target_modules).
        seed: A's initial values come from (seed, the linear's global name): the same in every layout.
    Returns:
        the global names of the adapted linears on this stage.
    """
    model.requires_grad_(False)
    tp = torch.distributed.get_world_size(tp_group)
    tp_rank = torch.distributed.get_rank(tp_group)
    names = []
    for name, parent, attr, glu in _targets(model, set(lora.targets)):
        linear = getattr(parent, attr)
        kind = linear_kind(linear)
        weight = linear.weight
        out_local, in_local = weight.shape
        sp = bool(getattr(linear, "sequence_parallel", False)) and tp > 1
        if kind == "column" and getattr(linear, "gather_output", False):
            raise ValueError(f"LoRA on {name}: a column-parallel linear that gathers its output is not supported")
        if kind == "row" and not getattr(linear, "input_is_parallel", True):
            raise ValueError(f"LoRA on {name}: a row-parallel linear with an unsplit input is not supported")
        shape = AdapterShape(kind, in_local * (tp if kind == "row" else 1), out_local, tp if kind != "replicated"
                             else 1, tp_rank, sp and kind != "replicated", glu)
        adapter = LoraAdapter(shape, lora.rank, lora.alpha, lora.dropout, tp_group, weight.dtype, weight.device,
                              name, seed)
        adapter.normalize = _te_normalize(linear)
        parent.add_module(attr + SUFFIX, adapter)
        linear.register_forward_hook(_hook(adapter))
        names.append(name)
    embedding = getattr(model.language_model, "embedding", None)  # first pipeline stage only
    if embedding is not None and getattr(model.language_model.config, "recompute_granularity", None):
        embedding.register_forward_hook(_input_requires_grad)
    return names


def _input_requires_grad(module, args, output):
    """Makes the frozen embedding's output require grad in a training forward. Megatron's recompute runs each
    checkpointed unit as an autograd function whose output needs a grad-requiring *input*: with the base frozen,
    the decoder's input has none, so the first unit's adapters, and every later one's, would get no gradient at
    all (measured: full recompute left the loss at ln 2 step after step). HF's enable_input_require_grads, for
    the same reason."""
    if torch.is_grad_enabled() and not output.requires_grad:
        return output.requires_grad_()
    return None


def adapters(model) -> list[LoraAdapter]:
    return [m for m in model.modules() if isinstance(m, LoraAdapter)]


def has_adapters(model) -> bool:
    return any(isinstance(m, LoraAdapter) for m in model.modules())


@contextlib.contextmanager
def adapters_off(model):
    """Runs `model` as its base: every adapter of this rank's stage disabled (the reference pass under LoRA).

    Every rank of a pass must hold it for the whole pass (the loop enters it around the reference's schedule)."""
    mods = adapters(model)
    before = [m.enabled for m in mods]
    for m in mods:
        m.enabled = False
    try:
        yield
    finally:
        for m, b in zip(mods, before):
            m.enabled = b


def is_adapter_param(name: str) -> bool:
    """A parameter / state-dict name of an adapter (`..._lora.lora_a` / `..._lora.lora_b`)."""
    return name.endswith((f"{SUFFIX}.lora_a", f"{SUFFIX}.lora_b"))


def base_name(adapter_key: str) -> str:
    """The adapted linear's weight key for an adapter's key: 'x.linear_qkv_lora.lora_a' -> 'x.linear_qkv.weight'."""
    stem = adapter_key.rsplit(".", 1)[0]
    return stem.removesuffix(SUFFIX) + ".weight"
