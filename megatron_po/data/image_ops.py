"""The pixel steps transformers 5's image processors share (Qwen2VL's, GotOcr2's), without transformers.

transformers 5 has two backends per image processor, and their numbers differ (resampling kernel, rounding, the
order of rescale and normalise), so a backend is named wherever pixels are made:
- "torchvision" (`Qwen2VLImageProcessor`, `GotOcr2ImageProcessor`): what `AutoProcessor` / `AutoImageProcessor`
  give whenever torchvision is installed, as on GPU machines (the NGC images of docker/ ship it). It resizes the
  uint8 CHW tensor with torchvision's antialiased `resize` on the CPU, which is torch's own `F.interpolate` (the
  same call is made here, so no torchvision is needed), then rescales and normalises in one float32 step:
  (x - mean / rescale_factor) / (std / rescale_factor).
- "pil" (`...ImageProcessorPil`): the fallback transformers takes without torchvision. PIL resize of the uint8
  image, rescale in float64 then float32, then (x - mean) / std in float32 (transformers 4.x's slow processors).
The default is "torchvision": the numbers the users' (GPU) transformers gives, which the model was checked against.

Both backends convert to RGB alike, compositing transparency onto white (transformers 4.x dropped the alpha).
"""

from __future__ import annotations

import platform
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
"""CLIP's pixel statistics: Qwen2-VL's and InternVL's processors normalise with them, and so does tiny_vlm."""

BACKENDS = ("torchvision", "pil")
DEFAULT_BACKEND = "torchvision"

# PIL resample codes -> the torch modes transformers maps them to (its pil_torch_interpolation_mapping)
_TORCH_MODES = {0: "nearest-exact", 2: "bilinear", 3: "bicubic"}


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"image backend {backend!r} unknown (known: {', '.join(BACKENDS)})")
    return backend


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB with transparency composited onto white, as transformers 5 converts (PIL's convert drops the alpha)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("RGB")


def rgb_pixels(image: Image.Image, do_convert_rgb: bool = True) -> torch.Tensor:
    """A PIL image -> uint8 [C, H, W]; RGB with transparency composited onto white when `do_convert_rgb`."""
    if do_convert_rgb:
        image = to_rgb(image)
    x = np.array(image)
    x = x[..., None] if x.ndim == 2 else x
    return torch.from_numpy(x).permute(2, 0, 1).contiguous()


def _native_uint8(mode: str) -> bool:
    # torchvision's rule for which modes torch resizes in uint8 on the CPU (else: float32, round, cast back)
    if mode == "bilinear":
        return (torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
                or platform.machine() in ("aarch64", "arm64"))
    return True


def resize(x: torch.Tensor, height: int, width: int, resample: int, backend: str) -> torch.Tensor:
    """uint8 [C, H, W] -> uint8 [C, height, width] as the backend's processor resizes it."""
    if check_backend(backend) == "pil":
        arr = x.permute(1, 2, 0).numpy()
        im = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
        # transformers hands PIL the uint8 image with reducing_gap=None; PIL copies when the size is equal
        out = np.array(im.resize((width, height), resample=Image.Resampling(resample)))
        out = out[..., None] if out.ndim == 2 else out
        return torch.from_numpy(out).permute(2, 0, 1).contiguous()
    if tuple(x.shape[-2:]) == (height, width):
        return x  # torchvision returns the image untouched
    mode = _TORCH_MODES.get(int(resample))
    if mode is None:
        raise ValueError(f"resample {resample}: only 0 (nearest), 2 (bilinear) and 3 (bicubic) are supported")
    smooth = mode != "nearest-exact"
    kw = dict(size=(height, width), mode=mode, align_corners=False if smooth else None, antialias=smooth)
    if _native_uint8(mode):
        return F.interpolate(x[None], **kw)[0]
    y = F.interpolate(x[None].float(), **kw)[0]
    return y.clamp_(0, 255).round_().to(torch.uint8)


def rescale_normalize(x: torch.Tensor, do_rescale: bool, rescale_factor: float, do_normalize: bool,
                      mean: Sequence[float], std: Sequence[float], backend: str) -> torch.Tensor:
    """uint8 [C, H, W] -> float32 [C, H, W] in the backend's arithmetic (bit-exact with it)."""
    if check_backend(backend) == "pil":
        y = x.numpy()
        if do_rescale:
            y = (y.astype(np.float64) * rescale_factor).astype(np.float32)
        if do_normalize:
            y = y.astype(np.float32)
            y = (y - np.array(mean, dtype=np.float32)[:, None, None]) / np.array(std, dtype=np.float32)[:, None, None]
        return torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32))
    if do_normalize:
        m, s = torch.tensor(tuple(mean)), torch.tensor(tuple(std))
        if do_rescale:  # fused: the rescale factor folded into mean and std
            m, s = m * (1.0 / rescale_factor), s * (1.0 / rescale_factor)
        return (x.float() - m.view(-1, 1, 1)) / s.view(-1, 1, 1)
    return x * rescale_factor if do_rescale else x.float()
