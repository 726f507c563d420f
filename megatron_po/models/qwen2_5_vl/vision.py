"""Qwen2.5-VL's vision tower and patch merger, as plain torch modules replicated on every TP rank.

Why not megatron's TransformerBlock: the tower alternates windowed and full attention per layer (a different
block-diagonal structure per layer, given by `cu_seqlens`), and applies a 2-D rotary embedding on (row, col) of
every patch after a window reordering. Megatron's block passes one attention mask to all layers and its local
attention would need [s, s] masks (65k x 65k for one large image) or TE's packed-sequence attention (GPU only),
and its TP split of a 32-layer, 1280-wide tower buys little: the tower is frozen by default and small next to the
LLM (0.67B of 8.3B parameters for Qwen2.5-VL-7B). So it is a plain module whose math mirrors HF's line by line
(fp32 RMSNorm and rotary, attention per window), with two changes that do not alter the result beyond rounding:
the Conv3d patch embedding is the equivalent Linear over the flattened patch, and the windows of one length are
attended as one batch (`segment_attention`) instead of one call per window. Being replicated and fed the same
pixels on every TP rank, its gradients (when trained) are identical on all TP ranks and need no reduction.

The merger (the "projector") acts on groups of `spatial_merge_size**2` consecutive patches, so it commutes with
the window permutation: the tower undoes the permutation and the merger runs on the original patch order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Qwen2_5_VLVisionConfig's defaults (transformers 4.57.1), for keys a config.json may leave out
VISION_DEFAULTS = {
    "depth": 32, "hidden_size": 3584, "hidden_act": "silu", "intermediate_size": 3420, "num_heads": 16,
    "in_channels": 3, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "tokens_per_second": 4,
    "window_size": 112, "out_hidden_size": 3584, "fullatt_block_indexes": [7, 15, 23, 31],
}
ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}
NORM_EPS = 1e-6  # hard-coded in HF's vision blocks and merger
ROPE_THETA = 10000.0


@dataclass(frozen=True)
class VisionShape:
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    hidden_act: str
    in_channels: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    window_size: int
    fullatt_block_indexes: tuple[int, ...]
    out_hidden_size: int

    @classmethod
    def from_hf(cls, vision_config: dict) -> "VisionShape":
        v = {**VISION_DEFAULTS, **{k: x for k, x in vision_config.items() if x is not None}}
        if v["hidden_act"] not in ACTIVATIONS:
            raise ValueError(f"vision_config.hidden_act {v['hidden_act']!r} unsupported (known: {sorted(ACTIVATIONS)})")
        if v["hidden_size"] % v["num_heads"] or (v["hidden_size"] // v["num_heads"]) % 4:
            raise ValueError("vision head_dim must be a multiple of 4 (2-D rotary over half of it)")
        if v["window_size"] < v["patch_size"] * v["spatial_merge_size"]:
            raise ValueError(f"vision window_size {v['window_size']} is smaller than one merged patch")
        return cls(v["depth"], v["hidden_size"], v["intermediate_size"], v["num_heads"], v["hidden_act"],
                   v["in_channels"], v["patch_size"], v["temporal_patch_size"], v["spatial_merge_size"],
                   v["window_size"], tuple(v["fullatt_block_indexes"]), v["out_hidden_size"])

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size**2


class RMSNorm(nn.Module):
    """Qwen2RMSNorm: statistics in fp32, the weight applied in the input dtype."""

    def __init__(self, size: int, eps: float = NORM_EPS, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: list[int]) -> torch.Tensor:
    """Bidirectional attention within each segment [cu[i], cu[i+1]) of q, k, v [S, H, D] -> [S, H, D].

    Segments of equal length are stacked and attended in one call (most windows are full-size), which is the
    same math as HF's loop over segments without a Python call per window.
    """
    device = q.device
    starts = torch.tensor(cu_seqlens[:-1], dtype=torch.long)
    lengths = torch.tensor(cu_seqlens[1:], dtype=torch.long) - starts
    out = torch.empty_like(q)
    for length in sorted(set(lengths.tolist()) - {0}):
        idx = (starts[lengths == length][:, None] + torch.arange(length)).to(device)  # [n, L]
        qs, ks, vs = (t[idx].transpose(1, 2) for t in (q, k, v))  # [n, H, L, D]
        o = F.scaled_dot_product_attention(qs, ks, vs)  # scale defaults to D**-0.5, as HF's
        out[idx] = o.transpose(1, 2)
    return out


class VisionAttention(nn.Module):
    def __init__(self, shape: VisionShape, dtype=None):
        super().__init__()
        self.num_heads = shape.num_heads
        self.qkv = nn.Linear(shape.hidden_size, 3 * shape.hidden_size, bias=True, dtype=dtype)
        self.proj = nn.Linear(shape.hidden_size, shape.hidden_size, bias=True, dtype=dtype)

    def forward(self, x: torch.Tensor, cu_seqlens: list[int], cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        s = x.shape[0]
        q, k, v = self.qkv(x).reshape(s, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)  # [S, H, D]
        dtype = q.dtype
        # rotary in fp32 as HF's apply_rotary_pos_emb_vision
        qf, kf = q.float(), k.float()
        cos, sin = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
        q = (qf * cos + rotate_half(qf) * sin).to(dtype)
        k = (kf * cos + rotate_half(kf) * sin).to(dtype)
        out = segment_attention(q, k, v, cu_seqlens)
        return self.proj(out.reshape(s, -1))


class VisionMLP(nn.Module):
    """SwiGLU with biases (Qwen2_5_VLMLP(bias=True))."""

    def __init__(self, shape: VisionShape, dtype=None):
        super().__init__()
        h, f = shape.hidden_size, shape.intermediate_size
        self.gate_proj = nn.Linear(h, f, bias=True, dtype=dtype)
        self.up_proj = nn.Linear(h, f, bias=True, dtype=dtype)
        self.down_proj = nn.Linear(f, h, bias=True, dtype=dtype)
        self.act = ACTIVATIONS[shape.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nn.Module):
    def __init__(self, shape: VisionShape, dtype=None):
        super().__init__()
        self.norm1 = RMSNorm(shape.hidden_size, dtype=dtype)
        self.norm2 = RMSNorm(shape.hidden_size, dtype=dtype)
        self.attn = VisionAttention(shape, dtype)
        self.mlp = VisionMLP(shape, dtype)

    def forward(self, x, cu_seqlens, cos, sin):
        x = x + self.attn(self.norm1(x), cu_seqlens, cos, sin)
        return x + self.mlp(self.norm2(x))


def rotary_positions(grid_thw: list[list[int]], merge: int) -> torch.Tensor:
    """(row, col) of every patch [N, 2], patches in the processor's order (merge windows contiguous)."""
    pos = []
    for t, h, w in grid_thw:
        hpos = torch.arange(h).unsqueeze(1).expand(-1, w)
        wpos = torch.arange(w).unsqueeze(0).expand(h, -1)
        hw = [p.reshape(h // merge, merge, w // merge, merge).permute(0, 2, 1, 3).flatten() for p in (hpos, wpos)]
        pos.append(torch.stack(hw, dim=-1).repeat(t, 1))
    return torch.cat(pos)


def window_index(grid_thw: list[list[int]], shape: VisionShape) -> tuple[torch.Tensor, list[int]]:
    """HF's get_window_index: merge-unit permutation that makes windows contiguous, and window boundaries.

    Windows are `window_size` pixels square (window_size / patch_size / merge merge-units); units are visited
    window by window (row-major over windows, then within a window), the grid padded at the bottom/right edge.

    Returns:
        index [N / merge_unit]: unit order; cu_seqlens: window boundaries in patches, zero-length windows removed.
    """
    merge, unit = shape.spatial_merge_size, shape.merge_unit
    win = shape.window_size // merge // shape.patch_size
    index, cu, offset = [], [0], 0
    for t, h, w in grid_thw:
        lh, lw = h // merge, w // merge
        idx = torch.arange(t * lh * lw).reshape(t, lh, lw)
        ph, pw = win - lh % win, win - lw % win
        nh, nw = (lh + ph) // win, (lw + pw) // win
        padded = F.pad(idx, (0, pw, 0, ph), "constant", -100)
        padded = padded.reshape(t, nh, win, nw, win).permute(0, 1, 3, 2, 4).reshape(t, nh * nw, win, win)
        seqlens = (padded != -100).sum([2, 3]).reshape(-1)
        flat = padded.reshape(-1)
        index.append(flat[flat != -100] + offset)
        cu.extend((seqlens.cumsum(0) * unit + cu[-1]).tolist())
        offset += t * lh * lw
    bounds = [cu[0]] + [b for a, b in zip(cu, cu[1:]) if b != a]  # unique_consecutive
    return torch.cat(index), bounds


class VisionTower(nn.Module):
    """Patch embedding + window/full-attention blocks. `forward` returns patch features in the input order."""

    def __init__(self, shape: VisionShape, dtype=None):
        super().__init__()
        self.shape = shape
        # HF: Conv3d(in, hidden, kernel=stride=(T, P, P), bias=False) == Linear over the (C, T, P, P) patch
        self.patch_embed = nn.Linear(shape.patch_dim, shape.hidden_size, bias=False, dtype=dtype)
        self.blocks = nn.ModuleList(VisionBlock(shape, dtype) for _ in range(shape.depth))

    def rotary(self, grid_thw: list[list[int]], device) -> torch.Tensor:
        """[N, head_dim / 2] angles: half the rotary dims from the patch row, half from the column."""
        dim = self.shape.head_dim // 2
        inv_freq = 1.0 / (ROPE_THETA ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        size = max(max(h, w) for _, h, w in grid_thw)
        freqs = torch.outer(torch.arange(size, dtype=inv_freq.dtype), inv_freq)
        return freqs[rotary_positions(grid_thw, self.shape.spatial_merge_size)].flatten(1).to(device)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, C*T*P*P], grid_thw [n, 3] -> features [N, hidden] (N patches, input order)."""
        grids = [[int(x) for x in g] for g in grid_thw.tolist()]
        n, unit = pixel_values.shape[0], self.shape.merge_unit
        if n != sum(t * h * w for t, h, w in grids):
            raise ValueError(f"pixel_values has {n} patches, image_grid_thw implies {sum(t*h*w for t, h, w in grids)}")
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))
        order, cu_window = window_index(grids, self.shape)
        order = order.to(x.device)
        x = x.reshape(n // unit, unit, -1)[order].reshape(n, -1)
        rot = self.rotary(grids, x.device)
        rot = rot.reshape(n // unit, unit, -1)[order].reshape(n, -1)
        emb = torch.cat((rot, rot), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        cu_full = [0]
        for t, h, w in grids:
            cu_full += [cu_full[-1] + h * w] * t
        full = set(self.shape.fullatt_block_indexes)
        for i, block in enumerate(self.blocks):
            x = block(x, cu_full if i in full else cu_window, cos, sin)
        return x.reshape(n // unit, unit, -1)[torch.argsort(order)].reshape(n, -1)


class PatchMerger(nn.Module):
    """ln_q (RMSNorm per patch) + MLP over each group of merge_unit patches -> LLM hidden size."""

    def __init__(self, shape: VisionShape, dtype=None):
        super().__init__()
        self.unit = shape.merge_unit
        width = shape.hidden_size * shape.merge_unit
        self.ln_q = RMSNorm(shape.hidden_size, dtype=dtype)
        self.linear_fc1 = nn.Linear(width, width, bias=True, dtype=dtype)
        self.linear_fc2 = nn.Linear(width, shape.out_hidden_size, bias=True, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N / merge_unit, out_hidden]."""
        x = self.ln_q(x).reshape(-1, self.linear_fc1.in_features)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))
