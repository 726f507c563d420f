"""Qwen2.5-VL inputs without transformers: image patches, M-RoPE position ids and the chat prompt.

Each function reproduces what transformers 5.x computes (checked for exact equality in
tests/test_hf_qwen2_5_vl.py):
- `preprocess_images` = `Qwen2VLImageProcessor`, in either of its backends (data/image_ops.py; by default the
  torchvision one that transformers 5 picks whenever torchvision is installed): RGB conversion (transparency onto
  white), `smart_resize` to multiples of patch_size * merge_size within [min_pixels, max_pixels], the backend's
  bicubic resize, rescale and normalisation, the frame repeated to `temporal_patch_size`, and the patch flatten
  order the vision tower's Conv3d expects;
- `position_ids` = `Qwen2_5_VLModel.get_rope_index` for rows with images (no videos);
- `format_prompt` = the Qwen2.5-VL chat template + processor for one user turn (images first, then the text)
  followed by the generation prompt, with every `<|image_pad|>` already expanded to the image's token count.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from megatron_po.data import image_ops

IMAGE_PAD = "<|image_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
DEFAULT_SYSTEM = "You are a helpful assistant."
RESPONSE_SUFFIX = "<|im_end|>\n"
"""What the template writes after an assistant message; supervised with the response, as Qwen's own fine-tuning
code and LLaMA-Factory's qwen2_vl template do (TRL supervises `<|im_end|>` plus an extra eos)."""

# Qwen2VLImageProcessor's defaults (transformers 4.57.1 and 5.x), for keys a preprocessor_config.json may leave out
PROCESSOR_DEFAULTS = {
    "min_pixels": 56 * 56,
    "max_pixels": 28 * 28 * 1280,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "rescale_factor": 1 / 255,
    "image_mean": image_ops.OPENAI_CLIP_MEAN,
    "image_std": image_ops.OPENAI_CLIP_STD,
    "do_resize": True,
    "do_rescale": True,
    "do_normalize": True,
    "do_convert_rgb": True,
    "resample": 3,  # PIL bicubic
}


def processor_settings(preprocessor_config: dict) -> dict:
    """The image processor's effective settings from a preprocessor_config.json dict.

    `min_pixels` / `max_pixels` decide the size bounds when the file has them (transformers 4.x writes them);
    transformers 5.x writes the bounds as `size: {shortest_edge, longest_edge}` (in pixels) only, and those are
    then read: a bound the file sets never falls back to the default.
    """
    s = dict(PROCESSOR_DEFAULTS)
    s.update({k: v for k, v in preprocessor_config.items() if k in PROCESSOR_DEFAULTS and v is not None})
    size = preprocessor_config.get("size") or {}
    for key, edge in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
        if preprocessor_config.get(key) is None and size.get(edge) is not None:
            s[key] = int(size[edge])
    return s


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 14 * 14 * 4 * 1280) -> tuple[int, int]:
    """Height and width divisible by `factor`, with area within [min_pixels, max_pixels], aspect ratio kept."""
    if max(height, width) / min(height, width) > 200:
        ratio = max(height, width) / min(height, width)
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {ratio}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _patchify(image, s: dict, backend: str) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """One PIL image -> ([grid_t * grid_h * grid_w, C * T * P * P] float32, (grid_t, grid_h, grid_w))."""
    x = image_ops.rgb_pixels(image, s["do_convert_rgb"])  # uint8 [C, H, W]
    p, m, tp = s["patch_size"], s["merge_size"], s["temporal_patch_size"]
    height, width = x.shape[-2:]
    if s["do_resize"]:
        height, width = smart_resize(height, width, p * m, s["min_pixels"], s["max_pixels"])
        x = image_ops.resize(x, height, width, s["resample"], backend)
    x = image_ops.rescale_normalize(x, s["do_rescale"], s["rescale_factor"], s["do_normalize"], s["image_mean"],
                                    s["image_std"], backend).float()
    # a still image is its own second frame: the Conv3d patch spans temporal_patch_size frames
    x = x[None].expand(tp, -1, -1, -1)
    c = x.shape[1]
    gt, gh, gw = 1, height // p, width // p
    x = x.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
    # rows: merge windows (m x m patches) contiguous, row-major over the grid; columns: (C, T, P, P)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, c * tp * p * p), (gt, gh, gw)


def preprocess_images(images: Sequence, preprocessor_config: dict,
                      backend: str = image_ops.DEFAULT_BACKEND) -> dict:
    """PIL images -> the vision tower's inputs, exactly as Qwen2VLImageProcessor computes them.

    Args:
        backend: which of transformers 5's processors to equal, "torchvision" (`Qwen2VLImageProcessor`, what
            transformers gives when torchvision is installed) or "pil" (`Qwen2VLImageProcessorPil`, without it).
    Returns:
        dict with `pixel_values` [sum of patches, C*T*P*P] float32 (images concatenated in order),
        `image_grid_thw` [n, 3] long (patch grid per image) and `num_tokens` [n] long (LLM tokens per image:
        t*h*w / merge_size^2).
    """
    s = processor_settings(preprocessor_config)
    patches, grids = [], []
    for image in images:
        x, grid = _patchify(image, s, backend)
        patches.append(x)
        grids.append(grid)
    grid = torch.tensor(grids, dtype=torch.long).reshape(-1, 3)
    return {
        "pixel_values": torch.cat(patches) if patches else torch.zeros(0, 0),
        "image_grid_thw": grid,
        "num_tokens": grid.prod(-1) // s["merge_size"] ** 2,
    }


def collate_images(parts: Sequence[dict]) -> dict:
    """Concatenates `preprocess_images` outputs (image order = the order of `parts`, then within each)."""
    return {
        "pixel_values": torch.cat([p["pixel_values"] for p in parts]),
        "image_grid_thw": torch.cat([p["image_grid_thw"] for p in parts]),
        "num_tokens": torch.cat([p["num_tokens"] for p in parts]),
    }


def rope_position_ids(
    input_ids: torch.Tensor,
    image_grid_thw: torch.Tensor,
    row_images: Sequence[Sequence[int]],
    image_token_id: int,
    spatial_merge_size: int,
    attention_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """M-RoPE positions [3, b, s] (temporal, height, width) of rows whose images are given per row.

    Text tokens count up on all three axes; an image's tokens sit at (t, row, col) of its merged grid offset by
    the position after the preceding text, and the text after it resumes at 1 + the largest position used
    (HF `get_rope_index`, images only: an image's temporal index is 0).

    Args:
        input_ids: [b, s].
        image_grid_thw: [n, 3] patch grids of all images of the batch.
        row_images: row_images[r] = indices into image_grid_thw of the images whose token spans appear in row r,
            in order (rows may share images, e.g. the chosen and rejected rows of a pair).
        attention_mask: optional [b, s] (1 = token, 0 = padding): as in HF, padding is skipped and gets position 0
            (transformers 5; 4.x gave it 1). Padding is never attended to, so only the numbers differ.
    """
    b, s = input_ids.shape
    if len(row_images) != b:
        raise ValueError(f"row_images has {len(row_images)} rows, input_ids has {b}")
    out = torch.zeros(3, b, s, dtype=torch.long)
    grids = image_grid_thw.tolist()
    for r in range(b):
        keep = attention_mask[r].bool().cpu() if attention_mask is not None else torch.ones(s, dtype=torch.bool)
        tokens = input_ids[r].cpu()[keep].tolist()
        parts, st, nxt = [], 0, 0
        for img in row_images[r]:
            try:
                ed = tokens.index(image_token_id, st)
            except ValueError:
                raise ValueError(f"row {r}: no image tokens left for image {img} after position {st}") from None
            gt, gh, gw = grids[img]
            gh, gw = gh // spatial_merge_size, gw // spatial_merge_size
            n = gt * gh * gw
            span_end = ed + n
            if tokens[ed:span_end] != [image_token_id] * n or tokens[span_end:span_end + 1] == [image_token_id]:
                raise ValueError(f"row {r}: image {img} needs exactly {n} consecutive image tokens at {ed}")
            text = torch.arange(ed - st).expand(3, -1) + nxt
            t_idx = torch.zeros(gt, gh * gw, dtype=torch.long).flatten()  # images: temporal index 0
            h_idx = torch.arange(gh).view(1, -1, 1).expand(gt, -1, gw).flatten()
            w_idx = torch.arange(gw).view(1, 1, -1).expand(gt, gh, -1).flatten()
            grid = torch.stack([t_idx, h_idx, w_idx]) + (ed - st) + nxt
            parts += [text, grid]
            nxt = int(grid.max()) + 1
            st = ed + n
        if image_token_id in tokens[st:]:
            raise ValueError(f"row {r}: more image tokens than its images {list(row_images[r])} account for")
        parts.append(torch.arange(len(tokens) - st).expand(3, -1) + nxt)
        out[:, r, keep] = torch.cat(parts, dim=1)
    return out.to(input_ids.device)


def image_span(num_tokens: int) -> str:
    """One image in a user turn, its pads expanded (what the chat template writes for an image part)."""
    return f"{VISION_START}{IMAGE_PAD * int(num_tokens)}{VISION_END}"


def format_prompt(question: str, images_num_tokens: Sequence[int], system: Optional[str] = None) -> str:
    """One user turn (the images, then `question`) and the generation prompt, image pads expanded.

    `system=None` gives the template's default system prompt, as when the conversation has no system message.
    """
    sys_text = DEFAULT_SYSTEM if system is None else system
    images = "".join(image_span(n) for n in images_num_tokens)
    return (f"<|im_start|>system\n{sys_text}<|im_end|>\n<|im_start|>user\n{images}{question}<|im_end|>\n"
            f"<|im_start|>assistant\n")
