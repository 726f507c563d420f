"""Flat-row rotary (models/attention.py): a packed THD row at CP = 1 gets megatron's THD rotary without host syncs.

TE is absent on CPU, so the attention is built from megatron's local pieces with a core attention that records the
q, k, v it is handed (what TE's attention would receive) instead of attending. megatron's own THD rotary runs on
the CPU with the 1-rank gloo CP group, so its q and k are the reference.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import MultimodalRotaryEmbedding
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig
from torch.overrides import TorchFunctionMode

from megatron_po.models.attention import FlatRowRotarySelfAttention

pytestmark = pytest.mark.pure

HEAD_DIM = 16
MROPE_SECTION = [2, 3, 3]  # t, h, w frequencies; sums to HEAD_DIM / 2
LENGTHS = [5, 9, 3, 6]  # four packed sequences ...
PAD = 4  # ... and the row's padding, a run of its own (train/rows.py thd_params)


class RecordingCoreAttention(torch.nn.Module):
    """Stands in for TE's attention: keeps the q, k, v it is given and returns a context that depends on all three
    (so gradients reach every projection through them)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__()
        self.seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        self.seen.append((query.detach().clone(), key.detach().clone(), value.detach().clone()))
        groups = query.size(-2) // key.size(-2)
        context = query + 2 * key.repeat_interleave(groups, dim=-2) + 3 * value.repeat_interleave(groups, dim=-2)
        # THD: [T, np, hn] -> [T, np*hn]; bshd: [s, b, np, hn] -> [s, b, np*hn]
        return context.reshape(*context.shape[:-2], -1)


class SyncCounter(TorchFunctionMode):
    """Counts the tensor calls that copy a value to the host (each one drains the CUDA stream on a GPU)."""

    SYNCS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "__complex__", "nonzero",
             "argwhere", "masked_select", "unique", "unique_consecutive", "cpu", "numpy"}

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.SYNCS:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def _config(**overrides: Any) -> TransformerConfig:
    cfg = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                            kv_channels=HEAD_DIM, add_bias_linear=False, add_qkv_bias=True, hidden_dropout=0.0,
                            attention_dropout=0.0, use_cpu_initialization=True, apply_rope_fusion=False,
                            bias_activation_fusion=False, masked_softmax_fusion=False, bias_dropout_fusion=False,
                            gradient_accumulation_fusion=False, **overrides)
    cfg.mrope_section = list(MROPE_SECTION)
    return cfg


def _pair(groups, cfg: TransformerConfig | None = None) -> tuple[SelfAttention, FlatRowRotarySelfAttention]:
    """megatron's SelfAttention and ours with the same weights, both on the recording core attention."""
    cfg = cfg or _config()
    local = get_gpt_layer_local_spec().submodules.self_attention.submodules
    subs = dataclasses.replace(local, core_attention=RecordingCoreAttention)
    built = []
    for cls in (SelfAttention, FlatRowRotarySelfAttention):
        torch.manual_seed(0)
        built.append(cls(cfg, subs, layer_number=1, attn_mask_type=AttnMaskType.causal,
                         pg_collection=groups.pg_collection))
    megatron, ours = built
    ours.load_state_dict(megatron.state_dict())  # same weights, same names: only the class differs
    return megatron, ours


def _packed_row() -> tuple[torch.Tensor, PackedSeqParams]:
    """M-RoPE positions [3, 1, T] restarting per sequence (one sequence holds a 2x3 image grid) and the row's
    THD params as the trainer builds them."""
    from megatron_po.train.rows import thd_params

    axes, ids = [], []
    for i, n in enumerate(LENGTHS):
        pos = torch.arange(n).expand(3, n).clone()
        if i == 1:
            # an image of 2x3 merged patches at tokens 2..7: t fixed, h and w walk the grid; text resumes after it
            pos[:, 2:8] = 2
            pos[1, 2:8] += torch.tensor([0, 0, 0, 1, 1, 1])
            pos[2, 2:8] += torch.tensor([0, 1, 2, 0, 1, 2])
            pos[:, 8:] = 5 + torch.arange(n - 8)
        axes.append(pos)
        ids += [i] * n
    axes.append(torch.arange(PAD).expand(3, PAD))
    ids += [-1] * PAD
    position_ids = torch.cat(axes, dim=1).unsqueeze(1)
    return position_ids, thd_params(torch.tensor(ids).unsqueeze(0))


def _freqs(position_ids: torch.Tensor) -> torch.Tensor:
    return MultimodalRotaryEmbedding(kv_channels=HEAD_DIM, rotary_percent=1.0)(position_ids, MROPE_SECTION)


def _run(attention: SelfAttention, hidden: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, ...]:
    attention.core_attention.seen.clear()
    out, _ = attention(hidden, attention_mask=None, **kwargs)
    (q, k, v), = attention.core_attention.seen
    return q, k, v, out


def test_packed_row_equals_megatrons_thd_rotary(groups):
    megatron, ours = _pair(groups)
    position_ids, packed = _packed_row()
    freqs = _freqs(position_ids)
    tokens = sum(LENGTHS) + PAD
    assert freqs.shape == (tokens, 1, 1, HEAD_DIM)  # the table covers the row: megatron's exact-mapping case
    hidden = torch.randn(tokens, 1, 64)
    want = _run(megatron, hidden, rotary_pos_emb=freqs, packed_seq_params=packed)
    got = _run(ours, hidden, rotary_pos_emb=freqs, packed_seq_params=packed)
    for name, a, b in zip(("q", "k", "v", "output"), want, got):
        assert a.shape == b.shape, name
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
    # the rotary did act, per sequence: without it q differs, and a position table that does not restart (the
    # row's index instead of each sequence's positions) gives other q and k
    plain = _run(megatron, hidden, packed_seq_params=packed)
    assert not torch.allclose(plain[0], want[0]) and not torch.allclose(plain[1], want[1])
    flat = _run(ours, hidden, rotary_pos_emb=_freqs(torch.arange(tokens).expand(3, 1, tokens)),
                packed_seq_params=packed)
    assert not torch.allclose(flat[0], want[0]) and not torch.allclose(flat[1], want[1])


def test_packed_row_makes_no_host_syncs(groups):
    megatron, ours = _pair(groups)
    position_ids, packed = _packed_row()
    freqs = _freqs(position_ids)
    hidden = torch.randn(freqs.size(0), 1, 64)
    counts = {}
    for name, attention in (("megatron", megatron), ("ours", ours)):
        with SyncCounter() as counter:
            _run(attention, hidden, rotary_pos_emb=freqs, packed_seq_params=packed)
        counts[name] = counter.calls
    # megatron, for q and for k: .tolist() of the lengths, `freqs.size(0) == cu_seqlens[-1]`, .item() per run
    runs = len(LENGTHS) + 1
    assert len(counts["megatron"]) >= 2 * (runs + 2), counts["megatron"]
    assert counts["ours"] == [], counts["ours"]


def test_gradients_equal_megatrons(groups):
    megatron, ours = _pair(groups)
    position_ids, packed = _packed_row()
    freqs = _freqs(position_ids)
    hidden = torch.randn(freqs.size(0), 1, 64)
    grads = []
    for attention in (megatron, ours):
        x = hidden.clone().requires_grad_(True)
        out, _ = attention(x, attention_mask=None, rotary_pos_emb=freqs, packed_seq_params=packed)
        out.pow(2).sum().backward()
        grads.append([x.grad, *(p.grad for p in attention.parameters())])
        attention.zero_grad()
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_table_of_max_seqlen_goes_to_megatron(groups):
    """A table shorter than the row (plain "rope": max_seqlen positions, restarted per sequence by megatron's
    walk) is megatron's case: the same q and k as megatron's."""
    megatron, ours = _pair(groups)
    _, packed = _packed_row()
    longest = max(LENGTHS + [PAD])
    freqs = _freqs(torch.arange(longest).expand(3, 1, longest))
    hidden = torch.randn(sum(LENGTHS) + PAD, 1, 64)
    want = _run(megatron, hidden, rotary_pos_emb=freqs, packed_seq_params=packed)
    got = _run(ours, hidden, rotary_pos_emb=freqs, packed_seq_params=packed)
    for a, b in zip(want, got):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


class _Group:
    def __init__(self, size: int):
        self._size = size

    def size(self) -> int:
        return self._size


def test_every_other_case_is_left_to_megatron(groups, monkeypatch):
    _, ours = _pair(groups)
    position_ids, packed = _packed_row()
    freqs = _freqs(position_ids)
    hidden = torch.randn(freqs.size(0), 1, 64)

    def tables(hidden=hidden, rotary=freqs, **kwargs):
        kv = kwargs.pop("key_value_states", None)
        inference = kwargs.pop("inference_context", None)
        return ours._flat_row_tables(hidden, kv, inference, rotary, {"packed_seq_params": packed, **kwargs})

    assert tables() is not None and tables(rotary=(freqs, freqs)) is not None
    assert tables(packed_seq_params=None) is None  # unpacked rows: bshd, megatron's rotary
    assert tables(packed_seq_params=dataclasses.replace(packed, qkv_format="sbhd")) is None
    assert tables(rotary=None) is None and tables(rotary=(freqs, None)) is None
    assert tables(inference_context=object()) is None and tables(inference_params=object()) is None
    assert tables(rotary=freqs[:-1]) is None  # a table that does not cover the row
    # under sequence parallelism the row is hidden_states' shard times TP: a [T/2] shard at TP=1 is no match
    assert tables(hidden=hidden[: hidden.size(0) // 2]) is None
    monkeypatch.setattr(ours.config, "apply_rope_fusion", True)
    assert tables() is None
    monkeypatch.setattr(ours.config, "apply_rope_fusion", False)
    monkeypatch.setattr(ours.pg_collection, "cp", _Group(2))
    assert tables() is None  # CP > 1: each rank holds chunks r and 2cp-1-r, megatron's walk is needed


@pytest.mark.parametrize("cp", [1, 2])
def test_te_spec_uses_flat_row_attention_at_cp1(cp, monkeypatch):
    """build_decoder_spec's TE branch, with TE's spec stubbed by megatron's local one (TE cannot exist here)."""
    from megatron_po.config import ModelConfig
    from megatron_po.models import specs

    monkeypatch.setattr(specs, "use_te_spec", lambda model: True)
    monkeypatch.setattr(specs, "get_gpt_layer_with_transformer_engine_spec", get_gpt_layer_local_spec)
    lm = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, context_parallel_size=cp)
    want = FlatRowRotarySelfAttention if cp == 1 else SelfAttention
    for seed in (None, 7):
        layer = specs.build_decoder_spec(ModelConfig(), lm, pp_rank=0, init_seed=seed)
        attention = layer.submodules.self_attention
        assert attention.module is want
        assert attention.params["attn_mask_type"] == AttnMaskType.causal
        assert attention.submodules == get_gpt_layer_local_spec().submodules.self_attention.submodules
    # the local spec (CPU, and model.spec=local on GPU) never packs THD rows: megatron's attention
    monkeypatch.setattr(specs, "use_te_spec", lambda model: False)
    local = specs.build_decoder_spec(ModelConfig(), lm, pp_rank=0)
    assert local.layer_specs[0].submodules.self_attention.module is SelfAttention
