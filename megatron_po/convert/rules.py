"""Tensor-name and layout rules between Hugging Face checkpoints and our megatron modules.

A `Rule` says how one tensor of a megatron module's TP=1 `state_dict()` is made from HF tensors and back. The two
directions must be exact inverses (pure reshuffles, concatenations, paddings), so HF -> megatron -> HF is
bit-identical. Megatron's sharded checkpoints are TP/PP-agnostic: a tensor written at its full TP=1 shape is
sliced on load for any layout, so the rules never see TP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor


def _one(*ts: Tensor) -> Tensor:
    return ts[0]


def _as_tuple(t: Tensor) -> tuple[Tensor, ...]:
    return (t,)


@dataclass(frozen=True)
class Rule:
    megatron: str
    """Name in the module's TP=1 state_dict()."""
    hf: tuple[str, ...]
    """HF safetensors names it is made of, in the order `to_megatron` takes them."""
    to_megatron: Callable[..., Tensor] = _one
    to_hf: Callable[[Tensor], tuple[Tensor, ...]] = _as_tuple


def copy_rule(megatron: str, hf: str) -> Rule:
    return Rule(megatron, (hf,))


def cat_rule(megatron: str, hf: tuple[str, ...], dim: int = 0) -> Rule:
    """Megatron fuses `hf` tensors by concatenation along `dim` (e.g. SwiGLU's [gate; up] in linear_fc1)."""

    def to_hf(t: Tensor) -> tuple[Tensor, ...]:
        return tuple(c.contiguous() for c in t.chunk(len(hf), dim=dim))

    return Rule(megatron, hf, lambda *ts: torch.cat(ts, dim=dim), to_hf)


def qkv_rule(megatron: str, hf: tuple[str, str, str], heads: int, groups: int, head_dim: int) -> Rule:
    """Megatron's fused QKV: per query group g, [q heads of g; k_g; v_g] (weights [.., in] or biases [..]).

    This interleaving is what lets megatron split linear_qkv's rows over TP by query group.
    """
    per = heads // groups

    def to_megatron(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        rest = q.shape[1:]
        q = q.reshape(groups, per * head_dim, *rest)
        k = k.reshape(groups, head_dim, *rest)
        v = v.reshape(groups, head_dim, *rest)
        return torch.cat([q, k, v], dim=1).reshape(-1, *rest)

    def to_hf(t: Tensor) -> tuple[Tensor, ...]:
        rest = t.shape[1:]
        t = t.reshape(groups, (per + 2) * head_dim, *rest)
        q, k, v = t.split([per * head_dim, head_dim, head_dim], dim=1)
        return tuple(x.reshape(-1, *rest).contiguous() for x in (q, k, v))

    return Rule(megatron, hf, to_megatron, to_hf)


def padded_rows_rule(megatron: str, hf: str, rows: int, padded_rows: int) -> Rule:
    """Vocabulary tensors: megatron's embedding/output layer has `padded_rows` >= the HF vocabulary's `rows`.

    Padded rows are zero; they never reach the log-probs (logprobs masks ids >= the real vocabulary).
    """

    def to_megatron(t: Tensor) -> Tensor:
        if t.shape[0] != rows:
            raise ValueError(f"{hf}: {t.shape[0]} rows, the config's vocab_size is {rows}")
        return torch.cat([t, t.new_zeros(padded_rows - rows, *t.shape[1:])]) if padded_rows > rows else t

    return Rule(megatron, (hf,), to_megatron, lambda t: (t[:rows].contiguous(),))


def qwen2_lm_rules(shape, hf_prefix: str, lm_head: str, padded_vocab: int, prefix: str = "language_model.") -> list[Rule]:
    """Rules for a Qwen2/Qwen2.5 decoder (HF `Qwen2Model` + lm_head) <-> megatron GPTModel (local spec names).

    Args:
        shape: models.specs.LMShape of the decoder.
        hf_prefix: HF name of the decoder module, e.g. "model.language_model." or "model.".
        lm_head: HF name of the output projection weight (ignored when embeddings are tied).
        padded_vocab: megatron's padded vocabulary rows.
        prefix: where the GPTModel sits in our VLM module.
    """
    p, h = prefix, hf_prefix
    v = shape.vocab_size
    rules = [padded_rows_rule(f"{p}embedding.word_embeddings.weight", f"{h}embed_tokens.weight", v, padded_vocab),
             copy_rule(f"{p}decoder.final_layernorm.weight", f"{h}norm.weight")]
    if not shape.tie_embeddings:
        rules.append(padded_rows_rule(f"{p}output_layer.weight", lm_head, v, padded_vocab))
    for i in range(shape.num_layers):
        m, a = f"{p}decoder.layers.{i}.", f"{h}layers.{i}."
        qkv = tuple(f"{a}self_attn.{x}_proj" for x in "qkv")
        args = (shape.num_attention_heads, shape.num_query_groups, shape.kv_channels)
        rules += [
            copy_rule(f"{m}input_layernorm.weight", f"{a}input_layernorm.weight"),
            qkv_rule(f"{m}self_attention.linear_qkv.weight", tuple(f"{x}.weight" for x in qkv), *args),
            qkv_rule(f"{m}self_attention.linear_qkv.bias", tuple(f"{x}.bias" for x in qkv), *args),
            copy_rule(f"{m}self_attention.linear_proj.weight", f"{a}self_attn.o_proj.weight"),
            copy_rule(f"{m}pre_mlp_layernorm.weight", f"{a}post_attention_layernorm.weight"),
            cat_rule(f"{m}mlp.linear_fc1.weight", (f"{a}mlp.gate_proj.weight", f"{a}mlp.up_proj.weight")),
            copy_rule(f"{m}mlp.linear_fc2.weight", f"{a}mlp.down_proj.weight"),
        ]
    return rules
