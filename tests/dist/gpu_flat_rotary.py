"""GPU check of the flat-row rotary (models/attention.py) on the Transformer-Engine spec; one rank under torchrun.

Builds one attention of Qwen2.5-7B's shape from `build_decoder_spec` (TE spec, CP = 1: our
`FlatRowRotarySelfAttention`) and megatron's `SelfAttention` from the same submodules and weights, runs a packed THD
row of 12,288 tokens in 48 sequences with restarting M-RoPE positions (bf16, TE's THD attention), and prints one
line `FLAT_ROTARY {json}`: forward / input-gradient differences, the synchronising CUDA calls of one forward of each
(torch.cuda.set_sync_debug_mode), and ms per forward + backward of each.

    torchrun --nproc_per_node 1 tests/dist/gpu_flat_rotary.py
"""

from __future__ import annotations

import json
import warnings

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import MultimodalRotaryEmbedding
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from megatron_po.config import ModelConfig, ParallelConfig
from megatron_po.models.attention import FlatRowRotarySelfAttention
from megatron_po.models.specs import LMShape, build_decoder_spec, build_lm_config
from megatron_po.parallel.groups import init_parallel, teardown
from megatron_po.train.rows import thd_params

SHAPE = LMShape(num_layers=1, hidden_size=3584, ffn_hidden_size=18944, num_attention_heads=28, num_query_groups=4,
                norm_epsilon=1e-6, rotary_base=1e6, vocab_size=152064)
MROPE_SECTION = [16, 24, 24]  # Qwen2.5-VL's
TOKENS, SEQUENCES, PAD = 12288, 48, 37


def packed_row(device: torch.device) -> tuple[torch.Tensor, object, int]:
    """M-RoPE positions [3, 1, T] restarting per sequence (each sequence opens with a 4x6 image grid) and the
    row's THD params; returns (positions, params, runs)."""
    gen = torch.Generator().manual_seed(0)
    cuts = torch.randperm(TOKENS - PAD - 1, generator=gen)[: SEQUENCES - 1].add(1).sort().values.tolist()
    lengths = [b - a for a, b in zip([0, *cuts], [*cuts, TOKENS - PAD])]
    axes, ids = [], []
    for i, n in enumerate(lengths):
        pos = torch.arange(n).expand(3, n).clone()
        if n > 30:
            grid = torch.arange(24)
            pos[:, 1:25] = 1
            pos[1, 1:25] += grid // 6
            pos[2, 1:25] += grid % 6
            pos[:, 25:] = 7 + torch.arange(n - 25)
        axes.append(pos)
        ids += [i] * n
    axes.append(torch.arange(PAD).expand(3, PAD))
    ids += [-1] * PAD
    params = thd_params(torch.tensor(ids, device=device).unsqueeze(0))
    return torch.cat(axes, dim=1).unsqueeze(1).to(device), params, len(lengths) + 1


def count_syncs(fn) -> int:
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in seen)


def ms_per_step(fn, steps: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(steps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / steps


def main() -> None:
    groups = init_parallel(ParallelConfig(), seed=0)
    assert groups.device.type == "cuda", groups.device
    model = ModelConfig(spec="te", params_dtype="bf16")
    cfg = build_lm_config(model, ParallelConfig(), SHAPE)
    cfg.mrope_section = list(MROPE_SECTION)
    spec = build_decoder_spec(model, cfg, pp_rank=0).submodules.self_attention
    assert spec.module is FlatRowRotarySelfAttention, spec.module
    megatron_spec = ModuleSpec(module=SelfAttention, params=spec.params, submodules=spec.submodules)
    ours = build_module(spec, config=cfg, layer_number=1, pg_collection=groups.pg_collection).cuda()
    megatron = build_module(megatron_spec, config=cfg, layer_number=1, pg_collection=groups.pg_collection).cuda()
    ours.load_state_dict(megatron.state_dict())

    positions, packed, runs = packed_row(groups.device)
    rope = MultimodalRotaryEmbedding(kv_channels=SHAPE.kv_channels, rotary_percent=1.0,
                                     rotary_base=int(SHAPE.rotary_base)).cuda()
    freqs = rope(positions, MROPE_SECTION)
    hidden = torch.randn(TOKENS, 1, SHAPE.hidden_size, device="cuda", dtype=torch.bfloat16)

    def forward(attention):
        return attention(hidden, attention_mask=None, rotary_pos_emb=freqs, packed_seq_params=packed)[0]

    def step(attention):
        x = hidden.detach().requires_grad_(True)
        out = attention(x, attention_mask=None, rotary_pos_emb=freqs, packed_seq_params=packed)[0]
        out.float().pow(2).mean().backward()
        return out.detach(), x.grad

    out_m, grad_m = step(megatron)
    out_o, grad_o = step(ours)
    with torch.no_grad():
        syncs = {"megatron": count_syncs(lambda: forward(megatron)), "ours": count_syncs(lambda: forward(ours))}
    result = {
        "tokens": TOKENS, "runs": runs,
        "forward_max_abs_diff": (out_o.float() - out_m.float()).abs().max().item(),
        "forward_max_abs": out_m.float().abs().max().item(),
        "grad_max_abs_diff": (grad_o.float() - grad_m.float()).abs().max().item(),
        "grad_max_abs": grad_m.float().abs().max().item(),
        "syncs_per_forward": syncs,
        "ms_fwd_bwd": {"megatron": ms_per_step(lambda: step(megatron)), "ours": ms_per_step(lambda: step(ours))},
    }
    print("FLAT_ROTARY " + json.dumps(result), flush=True)
    teardown()


if __name__ == "__main__":
    main()
