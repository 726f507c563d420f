"""Self-attention that rotates a packed THD row in one pass, without host syncs (context-parallel size 1).

On the Transformer-Engine spec a packed micro-batch is one THD row (`PackedSeqParams(qkv_format="thd")`) and
its rotary table comes from `position_ids` (M-RoPE for every family, positions restarting per sequence), so the
table already holds one entry per token of the row. megatron's unfused THD rotary
(`rope_utils._apply_rotary_pos_emb_thd`) nevertheless walks the row sequence by sequence: one `.tolist()` of the
lengths, one `freqs.size(0) == cu_seqlens[-1]` test and one `.item()` per sequence, for q and for k in every
layer — about 2·L·(n_seq + 2) device-to-host syncs per forward, each of which drains the CUDA stream. With CP = 1
that walk slices the table into consecutive pieces `freqs[cu[i]:cu[i+1]]` and concatenates them again: the result
is the table itself, so applying the bshd rotary to the whole row once gives the same numbers with no syncs.
(TE's fused rotary would not sync either, but it takes no M-RoPE table.)
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
    _yarn_get_concentration_factor_from_config,
)
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.attention import SelfAttention


class FlatRowRotarySelfAttention(SelfAttention):
    """megatron's `SelfAttention`, except that a packed THD row at CP = 1 gets its rotary in one bshd pass.

    Equal to megatron's THD path whenever the rotary table covers the row (`freqs.size(0) == T`, megatron's own
    "exact mapping" case), which is always the case for this project's M-RoPE tables built from `position_ids`.
    Every other call (no packing, bshd, CP > 1, inference, fused RoPE, a table that does not cover the row,
    layers without RoPE) goes to megatron's forward untouched.

    The hook: `forward` decides, then calls megatron's forward with `rotary_pos_emb=None` (so megatron's own
    rotary step is skipped) and the table parked on the module; `get_query_key_value_tensors` rotates q and k
    as it returns them. That method is the abstract contract every megatron attention implements ("derive q, k,
    v from the hidden states"), runs exactly once per forward, and its outputs go straight to the (now skipped)
    rotary step and the core attention. Its [s, b, np, hn] layout is bshd with b = 1 for a THD row, i.e. the
    `_apply_rotary_pos_emb_bshd(t.unsqueeze(1), freqs)` megatron's THD path ends in. Re-implementing
    `Attention.forward` (300 lines that change every release) or wrapping the core attention (TE's module; it
    also sits inside selective recompute) would be more fragile.
    """

    _flat_row_freqs: Optional[tuple[torch.Tensor, torch.Tensor]] = None
    """(q table, k table) [T, 1, 1, d] while a flat-row forward is in flight; None otherwise."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor],
                key_value_states: Optional[torch.Tensor] = None, inference_context: Any = None,
                rotary_pos_emb: Optional[torch.Tensor | tuple[torch.Tensor, torch.Tensor]] = None,
                **kwargs: Any) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """megatron's `Attention.forward` (same arguments; everything after `rotary_pos_emb` by keyword, as
        `TransformerLayer` passes it).

        Args:
            hidden_states: [s, b, h] (a THD row: [T(/tp under SP), 1, h]).
            rotary_pos_emb: the rotary table [T, 1, 1, d], or a (q, k) pair of them.

        Returns:
            megatron's (output [s, b, h], bias).
        """
        freqs = self._flat_row_tables(hidden_states, key_value_states, inference_context, rotary_pos_emb,
                                      kwargs)
        if freqs is None:
            return super().forward(hidden_states, attention_mask, key_value_states, inference_context,
                                   rotary_pos_emb, **kwargs)
        self._flat_row_freqs = freqs
        try:
            return super().forward(hidden_states, attention_mask, key_value_states, inference_context, None,
                                   **kwargs)
        finally:
            # a later call (the reference model's, an unpacked micro-batch) must never see this row's table
            self._flat_row_freqs = None

    def _flat_row_tables(self, hidden_states: torch.Tensor, key_value_states: Optional[torch.Tensor],
                         inference_context: Any, rotary_pos_emb: Any,
                         kwargs: dict) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """The (q, k) rotary tables when this call is a THD row megatron would rotate by exact mapping at CP = 1;
        None when megatron's forward must handle it. Reads shapes and config only: no host sync."""
        packed: Optional[PackedSeqParams] = kwargs.get("packed_seq_params")
        if packed is None or packed.qkv_format != "thd" or rotary_pos_emb is None:
            return None
        if key_value_states is not None or inference_context is not None or kwargs.get("inference_params"):
            return None
        # the fused kernels and per-layer no-RoPE are megatron's decisions: leave them to it
        if self.config.apply_rope_fusion or self.config.no_rope_freq or self.config.flash_decode:
            return None
        if self.pg_collection.cp.size() != 1:
            # under CP each rank holds chunks r and 2cp-1-r of every sequence: the per-sequence walk is needed
            return None
        q_freqs, k_freqs = rotary_pos_emb if isinstance(rotary_pos_emb, tuple) else (rotary_pos_emb,) * 2
        if q_freqs is None or k_freqs is None:
            return None
        # the row as q and k will have it: linear_qkv gathers the sequence-parallel shards
        tokens = hidden_states.size(0) * (self.pg_collection.tp.size() if self.config.sequence_parallel else 1)
        if q_freqs.size(0) != tokens or k_freqs.size(0) != tokens:
            # a table of max_seqlen positions (plain "rope"): megatron restarts it per sequence itself
            return None
        return q_freqs, k_freqs

    def get_query_key_value_tensors(self, hidden_states: torch.Tensor, key_value_states: Optional[torch.Tensor] = None,
                                    output_gate: bool = False, split_qkv: bool = True):
        """megatron's q, k, v (and gate); during a flat-row forward q and k come back rotated ([T, 1, np|ng, hn])."""
        out = super().get_query_key_value_tensors(hidden_states, key_value_states, output_gate=output_gate,
                                                  split_qkv=split_qkv)
        if self._flat_row_freqs is None:
            return out
        if not split_qkv:
            # megatron asks for the fused mixed qkv only without packed_seq_params; never on this path
            raise RuntimeError("flat-row rotary needs split q/k/v")
        q_freqs, k_freqs = self._flat_row_freqs
        query, key, *rest = out
        if query.size(0) != q_freqs.size(0) or key.size(0) != k_freqs.size(0):
            raise RuntimeError(f"rotary table of {q_freqs.size(0)} positions for a row of {query.size(0)} tokens")
        mscale = _yarn_get_concentration_factor_from_config(self.config)
        # cu_seqlens=None: megatron's unfused bshd rotary, the function its THD path applies to the gathered table
        query = apply_rotary_pos_emb(query, q_freqs, config=self.config, mscale=mscale, cp_group=self.pg_collection.cp)
        key = apply_rotary_pos_emb(key, k_freqs, config=self.config, mscale=mscale, cp_group=self.pg_collection.cp)
        return (query, key, *rest)
