"""InternVL3's image tiling and chat layout, reimplemented with PIL / torch (no transformers import).

Images: `GotOcr2ImageProcessor` of transformers 5.x as `InternVLProcessor` calls it, bit for bit, in either of its
backends (data/image_ops.py; by default the torchvision one, which transformers 5 picks whenever torchvision is
installed):
    1. convert to RGB (transparency composited onto white), a uint8 image;
    2. `crop_to_patches` (the processor's default, even when preprocessor_config.json says false): choose the tile
       grid whose aspect ratio is closest to the image's among all grids with min_patches..max_patches tiles
       (ties go to the later grid in area order while the image covers more than half of it), resize the whole
       image to that grid with `resample`, cut it row-major into tiles and append a thumbnail (the whole image
       resized to one tile) when there is more than one tile;
    3. resize every tile to `size` with `resample` (a no-op for tiles, which already have that size);
    4. rescale and normalise in the backend's arithmetic, channels first.
transformers 4.57.1 differed in steps 1 (it dropped the alpha channel) and 2 (the crop resized with bicubic
whatever `resample` said), and its default processor was the PIL one.

Chat layout: the template of the `-hf` InternVL3 checkpoints (`CHAT_TEMPLATE`, the Qwen2 ChatML layout) has no
default system prompt; each image of a user turn is written `<IMG_CONTEXT>\\n` before the text, and the
processor expands every `<IMG_CONTEXT>` into `<img>` + image_seq_length x tiles `<IMG_CONTEXT>` + `</img>`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import torch
from PIL import Image

from megatron_po.data import image_ops

IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
RESPONSE_SUFFIX = IM_END + "\n"
"""What the template writes after an assistant response; supervised with it (the end-of-turn token ends the
answer, as TRL's chat-formatted DPO data has it)."""

# the chat_template.json of OpenGVLab/InternVL3-*-hf (transformers' convert_internvl_weights_to_hf.py)
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "{{ '<IMG_CONTEXT>\n' }}{% elif content['type'] == 'video' %}{{ '<video>\n' }}{% elif content['type'] == 'text' %}"
    "{{ content['text'] }}{% endif %}{% endfor %}{% endif %}{{'<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)
ORIGINAL_SYSTEM_PROMPT = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)
"""The system message of the original (remote-code) InternVL3 chat template `internvl2_5`; the `-hf` template
has none. Pass it as `system=` to reproduce the original model's prompts."""

DEFAULT_IMAGE_SEQ_LENGTH = 256  # InternVLProcessor's default, used when neither caller nor config says otherwise


@dataclass(frozen=True)
class TilingConfig:
    """The fields of preprocessor_config.json that the InternVL processor reads (GotOcr2ImageProcessor's)."""

    height: int = 384
    width: int = 384
    crop_to_patches: bool = True
    min_patches: int = 1
    max_patches: int = 12
    resample: int = Image.Resampling.BICUBIC
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = image_ops.OPENAI_CLIP_MEAN  # the class defaults
    image_std: tuple[float, ...] = image_ops.OPENAI_CLIP_STD
    do_convert_rgb: bool = True

    @classmethod
    def from_preprocessor_config(cls, cfg: dict, crop_to_patches: bool | None = True) -> "TilingConfig":
        """Reads preprocessor_config.json.

        Args:
            crop_to_patches: True (default) is what `InternVLProcessor` does whatever the file says (its
                images_kwargs default overrides the image processor's own); None takes the file's value.
        """
        size = cfg.get("size", {"height": 384, "width": 384})
        if "height" not in size or "width" not in size:
            raise ValueError(f"preprocessor_config size {size}: InternVL needs {{'height', 'width'}}")
        d = cls()

        def mean_std(key, default):
            v = cfg.get(key)
            if v is None:
                return default
            return tuple(float(x) for x in v) if isinstance(v, (list, tuple)) else (float(v),) * 3

        return cls(
            height=int(size["height"]), width=int(size["width"]),
            crop_to_patches=bool(cfg.get("crop_to_patches", False)) if crop_to_patches is None else crop_to_patches,
            min_patches=int(cfg.get("min_patches", d.min_patches)),
            max_patches=int(cfg.get("max_patches", d.max_patches)),
            resample=int(cfg.get("resample", d.resample)),
            do_resize=bool(cfg.get("do_resize", True)),
            do_rescale=bool(cfg.get("do_rescale", True)),
            rescale_factor=float(cfg.get("rescale_factor", d.rescale_factor)),
            do_normalize=bool(cfg.get("do_normalize", True)),
            image_mean=mean_std("image_mean", d.image_mean),
            image_std=mean_std("image_std", d.image_std),
            do_convert_rgb=bool(cfg.get("do_convert_rgb", True)),
        )


@lru_cache(maxsize=16)
def supported_grids(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
    """All (columns, rows) grids with min_tiles..max_tiles tiles, in the order the tie-breaking depends on:
    enumerated by columns then rows, stably sorted by tile count."""
    grids = [(w, h) for w in range(1, max_tiles + 1) for h in range(1, max_tiles + 1)
             if min_tiles <= w * h <= max_tiles]
    return tuple(sorted(grids, key=lambda g: g[0] * g[1]))


def best_grid(height: int, width: int, tile_h: int, tile_w: int, min_tiles: int, max_tiles: int) -> tuple[int, int]:
    """(columns, rows) of the grid with the aspect ratio closest to width / height.

    On an exact tie, the later grid (more tiles) wins while the image area exceeds half the area of that grid
    at tile resolution (GotOcr2's rule; the original InternVL code has the same rule over a set-ordered list).
    """
    aspect = width / height
    area = width * height
    best_diff, best = float("inf"), (1, 1)
    for grid in supported_grids(min_tiles, max_tiles):
        diff = abs(aspect - grid[0] / grid[1])
        if diff < best_diff:
            best_diff, best = diff, grid
        elif diff == best_diff and area > 0.5 * tile_h * tile_w * grid[0] * grid[1]:
            best = grid
    return best


def num_tiles(height: int, width: int, cfg: TilingConfig) -> int:
    """Tiles (including the thumbnail) an image of this size becomes."""
    if not (cfg.crop_to_patches and cfg.max_patches > 1):
        return 1
    cols, rows = best_grid(height, width, cfg.height, cfg.width, cfg.min_patches, cfg.max_patches)
    return 1 if cols * rows == 1 else cols * rows + 1


def tile_image(x: torch.Tensor, cfg: TilingConfig, backend: str) -> list[torch.Tensor]:
    """uint8 [C, H, W] -> its tiles (row-major) plus the thumbnail when there is more than one, each
    [C, tile_h, tile_w]."""
    # the PIL backend skips the crop when max_patches is 1; the torchvision one crops to a single tile
    if not (cfg.crop_to_patches and (cfg.max_patches > 1 or backend == "torchvision")):
        return [x]
    h, w = cfg.height, cfg.width
    cols, rows = best_grid(x.shape[-2], x.shape[-1], h, w, cfg.min_patches, cfg.max_patches)
    canvas = image_ops.resize(x, h * rows, w * cols, cfg.resample, backend)
    tiles = [canvas[:, r * h:(r + 1) * h, c * w:(c + 1) * w] for r in range(rows) for c in range(cols)]
    if len(tiles) != 1:
        tiles.append(image_ops.resize(x, h, w, cfg.resample, backend))
    return tiles


def _to_pixels(tile: torch.Tensor, cfg: TilingConfig, backend: str) -> torch.Tensor:
    if cfg.do_resize:
        tile = image_ops.resize(tile, cfg.height, cfg.width, cfg.resample, backend)
    return image_ops.rescale_normalize(tile, cfg.do_rescale, cfg.rescale_factor, cfg.do_normalize, cfg.image_mean,
                                       cfg.image_std, backend).float()


def preprocess(
    images: Sequence[Image.Image], cfg: TilingConfig, image_seq_length: int = DEFAULT_IMAGE_SEQ_LENGTH,
    backend: str = image_ops.DEFAULT_BACKEND,
) -> dict[str, torch.Tensor]:
    """PIL images -> the model's inputs, equal to `InternVLProcessor(images=...)`'s.

    Args:
        backend: which of transformers 5's processors to equal, "torchvision" (`GotOcr2ImageProcessor`, what
            transformers gives when torchvision is installed) or "pil" (`GotOcr2ImageProcessorPil`, without it).
    Returns:
        pixel_values: [sum(num_patches), 3, height, width] float32, every image's tiles in image order.
        num_patches: [n] tiles per image (thumbnail included).
        num_tokens: [n] `<IMG_CONTEXT>` tokens per image: image_seq_length x num_patches.
    """
    pixels, counts = [], []
    for im in images:
        if im.mode != "RGB" and not cfg.do_convert_rgb:
            raise ValueError(f"image mode {im.mode!r} with do_convert_rgb=false: only RGB images are supported")
        tiles = tile_image(image_ops.rgb_pixels(im, cfg.do_convert_rgb), cfg, backend)
        pixels += [_to_pixels(t, cfg, backend) for t in tiles]
        counts.append(len(tiles))
    num_patches = torch.tensor(counts, dtype=torch.long)
    return {
        "pixel_values": torch.stack(pixels) if pixels else torch.empty(0, 3, cfg.height, cfg.width),
        "num_patches": num_patches,
        "num_tokens": num_patches * image_seq_length,
    }


def image_placeholder(num_tokens: int) -> str:
    """What the processor writes for one image: `<img>` + num_tokens x `<IMG_CONTEXT>` + `</img>`."""
    return IMG_START + IMG_CONTEXT * num_tokens + IMG_END


def image_span(num_tokens: int) -> str:
    """One image in a user turn as the template (`<IMG_CONTEXT>\\n` per image part) and the processor's
    expansion write it."""
    return image_placeholder(int(num_tokens)) + "\n"


def format_prompt(question: str, images_num_tokens: Sequence[int], system: str | None = None) -> str:
    """One user turn (images first, then the question) and the generation prompt, images already expanded.

    Equals `processor.apply_chat_template([{"role": "user", "content": [image..., text]}],
    add_generation_prompt=True)` followed by the processor's `<IMG_CONTEXT>` expansion (with a leading system
    message when `system` is given; the -hf template adds none by itself).
    """
    out = f"{IM_START}system\n{system}{IM_END}\n" if system is not None else ""
    out += f"{IM_START}user\n"
    out += "".join(image_span(n) for n in images_num_tokens)
    return out + f"{question}{IM_END}\n{IM_START}assistant\n"
