"""Layer specs and TransformerConfigs for the VLM, on megatron-core building blocks.

Two backends share one assembly: the Transformer-Engine spec (GPU, when TE is installed) and megatron's local
spec. The local spec's norm (`WrappedTorchNorm`) refuses sequence parallelism, so on the local path we use
`SPNorm`, a torch norm whose weight is tagged `sequence_parallel` — megatron's `finalize_model_grads` then
all-reduces its gradient over TP exactly as it does for TE's norms.
"""

from __future__ import annotations

import copy
import importlib.util
from dataclasses import dataclass

import torch
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, get_transformer_layer_offset
from megatron.core.utils import get_pg_rank

from megatron_po.config import ModelConfig, ParallelConfig
from megatron_po.models.attention import FlatRowRotarySelfAttention


class SPNorm(torch.nn.Module):
    """RMSNorm / LayerNorm computed in fp32, usable under sequence parallelism."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.rms = config.normalization == "RMSNorm"
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.bias = None if self.rms else torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
        for p in self.parameters():
            # replicated over TP but fed different sequence shards: grads must be summed over TP
            setattr(p, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        if self.rms:
            y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()
        else:
            y = torch.nn.functional.layer_norm(
                xf, (xf.shape[-1],), self.weight.float(), self.bias.float(), self.eps
            )
        return y.to(x.dtype)


def have_te() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def use_te_spec(model: ModelConfig) -> bool:
    if model.spec == "te":
        if not (have_te() and torch.cuda.is_available()):
            raise RuntimeError("model.spec='te' needs transformer-engine and a CUDA device")
        return True
    return model.spec == "auto" and have_te() and torch.cuda.is_available()


def _dtype(model: ModelConfig) -> torch.dtype:
    return torch.bfloat16 if model.params_dtype == "bf16" else torch.float32


@dataclass(frozen=True)
class LMShape:
    """The shape of a Qwen2/Qwen2.5 decoder (the LLM of every family we build)."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    norm_epsilon: float
    rotary_base: float
    vocab_size: int
    """Real vocabulary (the HF config's); the embedding is padded beyond it (see padded_vocab_size)."""
    tie_embeddings: bool = False
    init_method_std: float = 0.02

    @property
    def kv_channels(self) -> int:
        return self.hidden_size // self.num_attention_heads


def lm_shape_of(model: ModelConfig, vocab_size: int) -> LMShape:
    """The tiny_vlm decoder's shape, from the flat model config."""
    return LMShape(model.num_layers, model.hidden_size, model.ffn_hidden_size, model.num_attention_heads,
                   model.num_query_groups, model.norm_epsilon, model.rotary_base, vocab_size,
                   init_method_std=model.init_method_std)


def build_lm_config(model: ModelConfig, par: ParallelConfig, shape: LMShape | None = None) -> TransformerConfig:
    """Qwen2.5-shaped decoder: RMSNorm, SwiGLU, RoPE, GQA, qkv bias, no other biases.

    `shape` defaults to the tiny_vlm fields of `model`; HF families pass the shape read from their config.
    """
    dtype = _dtype(model)
    shape = shape or lm_shape_of(model, vocab_size=0)
    par.stage_layers(shape.num_layers)  # a split megatron would assert on is named here
    cfg = TransformerConfig(
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        ffn_hidden_size=shape.ffn_hidden_size,
        num_attention_heads=shape.num_attention_heads,
        num_query_groups=shape.num_query_groups,
        kv_channels=shape.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=shape.norm_epsilon,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=shape.init_method_std,
        tensor_model_parallel_size=par.tp,
        pipeline_model_parallel_size=par.pp,
        num_layers_in_first_pipeline_stage=par.pp_layers_first or None,
        num_layers_in_last_pipeline_stage=par.pp_layers_last or None,
        context_parallel_size=par.cp,
        sequence_parallel=par.sp,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        pipeline_dtype=dtype,
        # the full master weight is drawn on the CPU then sliced, so every TP layout starts from the same weights.
        # Weights a checkpoint overwrites are allocated on the device and "initialised" by a no-op: megatron's init
        # path must still run, since it is what tags sharded weights as tensor-parallel (perform_initialization=False
        # leaves them untagged, and the gradient norm then drops the other TP ranks' shards: measured)
        use_cpu_initialization=model.init_weights,
        **({} if model.init_weights else
           {"init_method": skip_init, "output_layer_init_method": skip_init, "embedding_init_method": skip_init}),
        # the unfused softmax: TE's attention has its own, and the local spec's fused one needs apex
        masked_softmax_fusion=False,
        # TE's fused RoPE does not take M-RoPE (every family's positions are M-RoPE's, see models/lm.py)
        apply_rope_fusion=False,
        **fusion_settings(model),
        **recompute_settings(model),
    )
    # the micro-batches of a step differ in rows (P2-DPO's branches) and length (each is padded to its own longest
    # row): pipeline stages exchange each activation's shape first (megatron's variable_seq_lengths). Set after
    # construction: TransformerConfig rejects the flag with its default MoE dispatcher even in a dense model.
    cfg.variable_seq_lengths = par.pp > 1
    return cfg


def skip_init(tensor: torch.Tensor) -> torch.Tensor:
    """The init method of weights a checkpoint will overwrite (model.init_weights=false)."""
    return tensor


def have_apex_wgrad() -> bool:
    """apex's fused weight-gradient kernel, which megatron's own linear layers (the output layer, the local spec)
    need for gradient_accumulation_fusion; TE's layers bring theirs."""
    return importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None


def fusion_settings(model: ModelConfig) -> dict:
    """megatron's kernel fusions for `model.fusions` (auto: on with the TE spec, whose image brings the kernels).

    bias + SwiGLU and bias-dropout-add are megatron's jit-fused functions; persist_layer_norm is TE's / apex's
    norm; gradient-accumulation fusion (weight gradients GEMM-accumulated straight into DDP's fp32 main_grad, no
    bf16 weight-gradient tensor) needs TE's linears and, for the output layer megatron builds itself, apex.
    """
    te = use_te_spec(model)
    on = model.fusions == "on" or (model.fusions == "auto" and te)
    wgrad = on and te and have_apex_wgrad()
    if on and model.fusions == "on" and not wgrad:
        # explicit 'on' without the kernels: keep the fusions that exist and say which one is missing
        import warnings

        warnings.warn("model.fusions=on: gradient-accumulation fusion needs the TE spec and apex's "
                      "fused_weight_gradient_mlp_cuda; it stays off")
    return {"bias_activation_fusion": on, "bias_dropout_fusion": on, "persist_layer_norm": on and te,
            "gradient_accumulation_fusion": wgrad}


def recompute_settings(model: ModelConfig) -> dict:
    """megatron's recompute fields for `model.recompute` (it validates them against the stage's layers)."""
    if model.recompute == "none":
        return {}
    if model.recompute == "selective":
        modules = model.recompute_modules.split(",")
        if "layernorm" in modules and not use_te_spec(model):
            # megatron checkpoints the norm through TE's FP8 state: on the local spec it fails mid-forward
            raise ValueError("model.recompute_modules=layernorm needs the Transformer-Engine spec (GPU); "
                             "use core_attn and/or mlp with the local spec")
        return {"recompute_granularity": "selective", "recompute_modules": modules}
    return {"recompute_granularity": "full", "recompute_method": model.recompute_method,
            "recompute_num_layers": model.recompute_num_layers}


def build_vision_config(model: ModelConfig, lm: TransformerConfig) -> TransformerConfig:
    """ViT: LayerNorm, GELU MLP with biases, bidirectional attention; TP-sharded, never sequence parallel."""
    v = model.vision
    cfg = copy.deepcopy(lm)
    cfg.num_layers = v.num_layers
    cfg.hidden_size = v.hidden_size
    cfg.ffn_hidden_size = v.ffn_hidden_size
    cfg.num_attention_heads = v.num_attention_heads
    cfg.num_query_groups = v.num_attention_heads
    cfg.kv_channels = v.hidden_size // v.num_attention_heads
    cfg.normalization = "LayerNorm"
    cfg.layernorm_epsilon = 1e-6
    cfg.gated_linear_unit = False
    cfg.activation_func = torch.nn.functional.gelu
    cfg.add_bias_linear = True
    cfg.add_qkv_bias = True
    # the vision sequence is short: SP would only add collectives; the tower also sits outside the PP split
    cfg.sequence_parallel = False
    cfg.pipeline_model_parallel_size = 1
    cfg.num_layers_in_first_pipeline_stage = cfg.num_layers_in_last_pipeline_stage = None
    # recompute is the decoder's: a frozen tower runs without autograd, a trainable one is short
    cfg.recompute_granularity = cfg.recompute_method = cfg.recompute_num_layers = None
    return cfg


def _with_norms(spec: ModuleSpec, attn_mask_type: AttnMaskType) -> ModuleSpec:
    spec = copy.deepcopy(spec)
    spec.submodules.input_layernorm = SPNorm
    spec.submodules.pre_mlp_layernorm = SPNorm
    spec.submodules.self_attention.params = dict(spec.submodules.self_attention.params, attn_mask_type=attn_mask_type)
    return spec


class SeededLayer(TransformerLayer):
    """A decoder layer whose initial weights depend only on (seed, its global layer number).

    Weights are drawn at full size on the CPU in construction order (use_cpu_initialization). A pipeline stage
    builds only its own layers, so without a reseed the draws of stage k would depend on what the stages before
    it hold; reseeding per global layer makes every (TP, PP) layout start from the same weights. The modules built
    after the last layer (final norm, output layer) continue its stream, the same in every layout too.
    """

    def __init__(self, config: TransformerConfig, submodules, layer_number: int = 1, *, init_seed: int,
                 pg_collection=None, vp_stage=None, **kwargs):
        pp_rank = get_pg_rank(pg_collection.pp) if pg_collection is not None else None
        global_number = layer_number + get_transformer_layer_offset(config, vp_stage, pp_rank)
        torch.default_generator.manual_seed(init_seed * 1_000_003 + global_number)
        super().__init__(config, submodules, layer_number, pg_collection=pg_collection, vp_stage=vp_stage, **kwargs)


def _seeded(layer: ModuleSpec, init_seed: int | None) -> ModuleSpec:
    if init_seed is None:
        return layer
    return ModuleSpec(module=SeededLayer, params={**layer.params, "init_seed": init_seed},
                      submodules=layer.submodules)


def _with_self_attention(layer: ModuleSpec, module: type[SelfAttention]) -> ModuleSpec:
    """`layer` with its self-attention built as `module` (same submodules, params and weights' names)."""
    attention = layer.submodules.self_attention
    if attention.module is not SelfAttention:
        raise TypeError(f"expected megatron's SelfAttention in the layer spec, got {attention.module!r}")
    layer = copy.deepcopy(layer)
    layer.submodules.self_attention = ModuleSpec(module=module, params=dict(attention.params),
                                                 submodules=attention.submodules)
    return layer


def build_decoder_spec(model: ModelConfig, lm: TransformerConfig, pp_rank: int,
                       init_seed: int | None = None) -> TransformerBlockSubmodules | ModuleSpec:
    """The decoder layers of pipeline stage `pp_rank` (TE: a layer spec megatron repeats per stage itself).

    `init_seed`: draw each layer's initial weights from (seed, global layer number), layout-independent (models
    trained from random weights: tiny_vlm); None for models whose weights come from a checkpoint.
    """
    if use_te_spec(model):
        layer = get_gpt_layer_with_transformer_engine_spec()
        if lm.context_parallel_size == 1:
            # packed micro-batches are THD rows here: rotate each row in one pass, not megatron's per-sequence
            # walk with its host syncs (models/attention.py); under CP megatron's walk is the right one
            layer = _with_self_attention(layer, FlatRowRotarySelfAttention)
        return _seeded(layer, init_seed)
    layer = _seeded(_with_norms(get_gpt_layer_local_spec(normalization="RMSNorm"), AttnMaskType.causal), init_seed)
    n = get_num_layers_to_build(lm, vp_stage=None, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=[layer] * n, layer_norm=SPNorm)


def build_vision_spec(vision: TransformerConfig) -> TransformerBlockSubmodules:
    # megatron's local layer pieces with our norm; no_mask = bidirectional attention over patches
    layer = _with_norms(get_gpt_layer_local_spec(normalization="LayerNorm"), AttnMaskType.no_mask)
    return TransformerBlockSubmodules(layer_specs=[layer] * vision.num_layers, layer_norm=SPNorm)


def padded_vocab_size(vocab_size: int, tp: int, multiple: int = 128) -> int:
    """Pads the vocabulary to a multiple of `multiple`, independent of the TP size.

    Megatron-LM pads to `multiple * tp`; we do not, because padded entries take part in the softmax and in the
    initial weights: a TP-dependent vocabulary would make log-probs depend on the layout.
    """
    padded = ((vocab_size + multiple - 1) // multiple) * multiple
    if padded % tp:
        raise ValueError(f"padded vocabulary {padded} is not divisible by parallel.tp={tp}")
    return padded
