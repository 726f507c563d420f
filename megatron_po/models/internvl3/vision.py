"""InternViT (the vision tower of InternVL3) as a plain torch module, replicated on every TP rank.

Why not megatron's TransformerBlock: an InternViT layer scales each residual branch by a learned per-channel
vector (layer scale, `lambda_1` / `lambda_2`), and the 6B tower normalises q and k over the *whole* hidden size
(RMSNorm before the head split). Megatron's TransformerLayer has neither; its qk-norm is per head. The scales
could be folded into the output projections (attention `projection_layer`, `mlp.fc2`) but a folded weight is a
product, and HF -> megatron -> HF would no longer be bit-identical. The tower is frozen by default, and small
next to the LLM (InternViT-300M for InternVL3-1B..14B; the 5.9B tower of the 38B/78B models is 12 GB in bf16
on every rank, next to the 78B model's ~18 GB LLM shard at TP=8), so replicating it costs memory but no
communication, and its math stays the HF code's own: per-layer operations in the same order, the same pixel
shuffle, the same bicubic position-embedding interpolation. With it trainable, its gradients are the same on every TP rank (the
projector's column-parallel input all-reduces them), so replicas stay in step.

Parameter names are HF's (`embeddings.*`, `encoder.layer.{i}.*`, `layernorm.*`) except that q, k and v are one
fused `attention.qkv` (HF's three projections concatenated; the original OpenGVLab layout stores exactly that).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,  # transformers' GELUActivation: the exact erf form
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r} unsupported (known: {sorted(ACTIVATIONS)})")
    return ACTIVATIONS[name]


def _pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (list, tuple)) else (int(v), int(v))


@dataclass(frozen=True)
class InternViTShape:
    """The fields of an HF `InternVLVisionConfig` (defaults are transformers', i.e. InternViT-300M's)."""

    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    intermediate_size: int = 4096
    attention_bias: bool = False
    use_qk_norm: bool = False
    hidden_act: str = "gelu"
    norm_type: str = "layer_norm"
    layer_norm_eps: float = 1e-6
    image_size: tuple[int, int] = (448, 448)
    patch_size: tuple[int, int] = (14, 14)
    num_channels: int = 3
    use_mask_token: bool = False
    use_absolute_position_embeddings: bool = True
    use_mean_pooling: bool = True
    """True: no final LayerNorm (HF's `layernorm` is an Identity)."""
    layer_scale_init_value: float = 0.1

    @classmethod
    def from_hf(cls, v: dict) -> "InternViTShape":
        d = cls()
        shape = cls(
            hidden_size=v.get("hidden_size", d.hidden_size),
            num_layers=v.get("num_hidden_layers", d.num_layers),
            num_heads=v.get("num_attention_heads", d.num_heads),
            intermediate_size=v.get("intermediate_size", d.intermediate_size),
            attention_bias=bool(v.get("attention_bias", d.attention_bias)),
            use_qk_norm=bool(v.get("use_qk_norm", d.use_qk_norm)),
            hidden_act=v.get("hidden_act", d.hidden_act),
            norm_type=v.get("norm_type", d.norm_type),
            layer_norm_eps=float(v.get("layer_norm_eps", d.layer_norm_eps)),
            image_size=_pair(v.get("image_size", d.image_size)),
            patch_size=_pair(v.get("patch_size", d.patch_size)),
            num_channels=v.get("num_channels", d.num_channels),
            use_mask_token=bool(v.get("use_mask_token", d.use_mask_token)),
            use_absolute_position_embeddings=bool(
                v.get("use_absolute_position_embeddings", d.use_absolute_position_embeddings)),
            use_mean_pooling=bool(v.get("use_mean_pooling", d.use_mean_pooling)),
            layer_scale_init_value=float(v.get("layer_scale_init_value", d.layer_scale_init_value)),
        )
        if shape.hidden_size % shape.num_heads:
            raise ValueError(f"vision hidden_size {shape.hidden_size} is not a multiple of {shape.num_heads} heads")
        if shape.norm_type not in ("layer_norm", "rms_norm"):
            raise ValueError(f"vision norm_type {shape.norm_type!r} unsupported (layer_norm | rms_norm)")
        activation(shape.hidden_act)
        return shape

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid(self) -> tuple[int, int]:
        return self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1]


class RMSNorm(nn.Module):
    """transformers' InternVLVisionRMSNorm: normalise in fp32, cast back, then scale in the input dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, dtype: torch.dtype | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.float32)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def _norm(shape: InternViTShape, dtype: torch.dtype) -> nn.Module:
    if shape.norm_type == "rms_norm":
        return RMSNorm(shape.hidden_size, eps=shape.layer_norm_eps, dtype=dtype)
    return nn.LayerNorm(shape.hidden_size, eps=shape.layer_norm_eps, dtype=dtype)


class PatchEmbeddings(nn.Module):
    def __init__(self, shape: InternViTShape, dtype: torch.dtype):
        super().__init__()
        self.projection = nn.Conv2d(shape.num_channels, shape.hidden_size, kernel_size=shape.patch_size,
                                    stride=shape.patch_size, dtype=dtype)


class Embeddings(nn.Module):
    """Class token + conv patch embedding + absolute positions (bicubic-interpolated for other tile sizes)."""

    def __init__(self, shape: InternViTShape, dtype: torch.dtype):
        super().__init__()
        self.shape = shape
        d = shape.hidden_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d, dtype=dtype))
        # never used in the forward (HF's masked-image-modelling input); kept so conversions round-trip
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d, dtype=dtype)) if shape.use_mask_token else None
        self.patch_embeddings = PatchEmbeddings(shape, dtype)
        gh, gw = shape.grid
        self.position_embeddings = (nn.Parameter(torch.zeros(1, gh * gw + 1, d, dtype=dtype))
                                    if shape.use_absolute_position_embeddings else None)

    def positions(self, num_patches: int, height: int, width: int) -> torch.Tensor:
        """HF's interpolate_pos_encoding (not traced): identity for the trained square grid, else bicubic."""
        pos = self.position_embeddings
        num_positions = pos.shape[1] - 1
        if num_patches == num_positions and height == width:
            return pos
        dim = pos.shape[-1]
        side = int(math.sqrt(num_positions))  # HF's torch_int(num_positions ** 0.5)
        patch_pos = pos[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
        size = (height // self.shape.patch_size[0], width // self.shape.patch_size[1])
        patch_pos = F.interpolate(patch_pos, size=size, mode="bicubic", align_corners=False)
        patch_pos = patch_pos.permute(0, 2, 3, 1).view(1, -1, dim)
        return torch.cat((pos[:, :1], patch_pos), dim=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        _, _, height, width = pixel_values.shape
        x = self.patch_embeddings.projection(pixel_values).flatten(2).transpose(1, 2)  # [n, p, d]
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        if self.position_embeddings is not None:
            x = x + self.positions(x.shape[1] - 1, height, width)
        return x


class Attention(nn.Module):
    def __init__(self, shape: InternViTShape, dtype: torch.dtype):
        super().__init__()
        d = shape.hidden_size
        self.num_heads, self.head_dim = shape.num_heads, shape.head_dim
        self.qkv = nn.Linear(d, 3 * d, bias=shape.attention_bias, dtype=dtype)
        # over the whole hidden size, before the head split (InternViT-6B); default eps, not layer_norm_eps
        self.q_norm = RMSNorm(d, dtype=dtype) if shape.use_qk_norm else None
        self.k_norm = RMSNorm(d, dtype=dtype) if shape.use_qk_norm else None
        self.projection_layer = nn.Linear(d, d, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, s, d = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.reshape(n, s, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5)  # bidirectional
        return self.projection_layer(out.transpose(1, 2).reshape(n, s, d))


class MLP(nn.Module):
    def __init__(self, shape: InternViTShape, dtype: torch.dtype):
        super().__init__()
        self.act = activation(shape.hidden_act)
        self.fc1 = nn.Linear(shape.hidden_size, shape.intermediate_size, dtype=dtype)
        self.fc2 = nn.Linear(shape.intermediate_size, shape.hidden_size, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Layer(nn.Module):
    """Pre-norm block with layer scale: x + l1 * attn(norm(x)), then h + l2 * mlp(norm(h))."""

    def __init__(self, shape: InternViTShape, dtype: torch.dtype):
        super().__init__()
        self.attention = Attention(shape, dtype)
        self.mlp = MLP(shape, dtype)
        self.layernorm_before = _norm(shape, dtype)
        self.layernorm_after = _norm(shape, dtype)
        self.lambda_1 = nn.Parameter(torch.full((shape.hidden_size,), shape.layer_scale_init_value, dtype=dtype))
        self.lambda_2 = nn.Parameter(torch.full((shape.hidden_size,), shape.layer_scale_init_value, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.lambda_1 * self.attention(self.layernorm_before(x)) + x
        return self.lambda_2 * self.mlp(self.layernorm_after(x)) + x


class Encoder(nn.Module):
    def __init__(self, shape: InternViTShape, dtype: torch.dtype):
        super().__init__()
        self.layer = nn.ModuleList(Layer(shape, dtype) for _ in range(shape.num_layers))


class InternViT(nn.Module):
    """pixel_values [n, 3, H, W] -> last hidden states [n, 1 + (H/p)(W/p), d] (class token first)."""

    def __init__(self, shape: InternViTShape, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.shape = shape
        self.embeddings = Embeddings(shape, dtype)
        self.encoder = Encoder(shape, dtype)
        self.layernorm = None if shape.use_mean_pooling else nn.LayerNorm(shape.hidden_size, eps=shape.layer_norm_eps,
                                                                           dtype=dtype)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixel_values)
        for layer in self.encoder.layer:
            x = layer(x)
        return x if self.layernorm is None else self.layernorm(x)


def pixel_shuffle(features: torch.Tensor, scale: float) -> torch.Tensor:
    """HF InternVLModel.pixel_shuffle, operation for operation: [n, w, h, c] -> [n, w*s, h*s, c/s^2].

    The channel order of the merged tokens is what the projector was trained on; any other (e.g. torch's
    pixel_unshuffle) feeds it permuted channels.
    """
    n, w, h, c = features.shape
    if h % (1 / scale) or w % (1 / scale):
        raise ValueError(f"feature grid {w}x{h} is not divisible by 1/downsample_ratio = {1 / scale}")
    x = features.view(n, w, int(h * scale), int(c / scale))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * scale), int(w * scale), int(c / (scale**2)))
    return x.permute(0, 2, 1, 3).contiguous()


def image_features(vit: InternViT, pixel_values: torch.Tensor, downsample_ratio: float) -> torch.Tensor:
    """Tower output without the class token, pixel-shuffled: [n, tokens per tile, d / ratio^2]."""
    x = vit(pixel_values)[:, 1:, :]
    side = int(x.shape[1] ** 0.5)
    if side * side != x.shape[1]:
        raise ValueError(f"{x.shape[1]} patches per tile is not a square grid (InternVL tiles are square)")
    x = pixel_shuffle(x.reshape(x.shape[0], side, side, -1), downsample_ratio)
    return x.reshape(x.shape[0], -1, x.shape[-1])
