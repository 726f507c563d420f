"""P2-DPO records (OBJECTIVES.md §9): the JSONL schema, its validation, and the image conditions.

One JSON object per line; either branch may be absent (``null`` or left out), not both::

    {"id": "p2-00000",
     "image": "images/p2_00000.png",          # I: relative to the JSONL file's directory, or absolute
     "prompt": "What colour is the square?",  # the plain question P
     "focus": {"chosen": "The square is red.",     # y_w^f, generated under [I, I_crop]
               "rejected": "The square is blue.",  # y_l^f, generated under I_deg
               "bbox": [3, 4, 17, 18]},            # I_crop / I_deg box: [left, top, right, bottom] pixels of I,
                                                   # right and bottom exclusive (PIL's crop box)
     "robust": {"chosen": "...", "rejected": "...",    # (y_w^r, y_l^r), both scored under I_noise
                "noise_seed": 7, "noise_step": 600,    # I_noise, see vcd_noise
                "prompt": "..."},                      # optional; default ROBUST_PROMPT around P
     "clip_crop_score": 0.31, "clip_image_score": 0.28,  # CLIPScore(P, I_crop), CLIPScore(P, I) (§9.5)
     "meta": {...}}

Instead of ``bbox`` the focus branch may give ``crop_image`` and ``deg_image`` (paths like ``image``); a ``bbox``
with only one of them derives the other. The CLIP scores are raw cosines in [-1, 1], required when a record has
both branches (the DDW weights of §9.1 only act there). Any problem raises ``RecordError`` naming ``file:line`` and
the field; a bbox outside its image is reported when the dataset is built (the image size is read then).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image

from megatron_po.data.image_ops import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from megatron_po.data.records import (RecordError, check_distinct, image_size, open_rgb, parse_meta, parse_object,
                                      read_jsonl, require_text, resolve_path)

ROBUST_PROMPT = ("Strictly answer the following question according to the facts of the image, and control the "
                 "length of the output. Based on this, answer the question: {question}")
"""The robust pairs' prompt (§9.4, the LLaVA generation script's), around the plain question."""
NOISE_STEPS = 1000
DEFAULT_NOISE_STEP = 600


@dataclass
class FocusPair:
    chosen: str
    rejected: str
    bbox: Optional[tuple[int, int, int, int]] = None
    """[left, top, right, bottom) of the focus region in pixels of the original image."""
    crop_image: Optional[str] = None
    """I_crop as a file (else cut from the image by ``bbox``)."""
    deg_image: Optional[str] = None
    """I_deg as a file (else the image with ``bbox`` filled by its mean colour)."""


@dataclass
class RobustPair:
    chosen: str
    rejected: str
    prompt: str
    """The robust prompt, already around the question."""
    noise_seed: int
    """Seed of the noise ε of I_noise: policy and reference see one tensor, and every epoch the same one."""
    noise_step: int = DEFAULT_NOISE_STEP
    """Diffusion step t of the VCD noise (§9.4: 600)."""


@dataclass
class P2Record:
    """One image–question sample of P2-DPO with a focus pair, a robustness pair, or both."""

    id: str
    image: str
    prompt: str
    focus: Optional[FocusPair]
    robust: Optional[RobustPair]
    clip_crop_score: Optional[float] = None
    clip_image_score: Optional[float] = None
    meta: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    """``file:line`` the record was read from, for errors found later (a bbox outside its image)."""


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _branch(obj: dict, name: str, where: str) -> Optional[dict]:
    branch = obj.get(name)
    if branch is not None and not isinstance(branch, dict):
        raise RecordError(f"{where}: field '{name}' must be an object or null, got {type(branch).__name__}")
    if branch is None:
        return None
    for key in ("chosen", "rejected"):
        require_text(branch, key, where, f"{name}.{key}")
    check_distinct(branch["chosen"], branch["rejected"], where, prefix=f"{name}.")
    return branch


def _parse_focus(f: dict, where: str) -> FocusPair:
    bbox = f.get("bbox")
    if bbox is not None:
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_int(v) for v in bbox)):
            raise RecordError(f"{where}: field 'focus.bbox' must be 4 integers [left, top, right, bottom], "
                              f"got {bbox!r}")
        left, top, right, bottom = bbox
        if not (0 <= left < right and 0 <= top < bottom):
            raise RecordError(f"{where}: field 'focus.bbox' {bbox} is empty or negative (needs 0 <= left < right "
                              "and 0 <= top < bottom)")
    images = {key: require_text(f, key, where, f"focus.{key}") if f.get(key) is not None else None
              for key in ("crop_image", "deg_image")}
    for key, what in (("crop_image", "I_crop (the calibration's second image)"), ("deg_image", "I_deg")):
        if bbox is None and images[key] is None:
            raise RecordError(f"{where}: the focus branch needs {what}: give field 'focus.bbox' or 'focus.{key}'")
    return FocusPair(f["chosen"], f["rejected"], None if bbox is None else tuple(bbox), **images)


def _parse_robust(r: dict, question: str, where: str) -> RobustPair:
    seed, step = r.get("noise_seed"), r.get("noise_step", DEFAULT_NOISE_STEP)
    if not (_int(seed) and seed >= 0):
        raise RecordError(f"{where}: field 'robust.noise_seed' must be an integer >= 0 (I_noise is drawn from it), "
                          f"got {seed!r}")
    if not (_int(step) and 0 <= step < NOISE_STEPS):
        raise RecordError(f"{where}: field 'robust.noise_step' must be an integer in [0, {NOISE_STEPS}), got {step!r}")
    prompt = require_text(r, "prompt", where, "robust.prompt") if r.get("prompt") is not None \
        else ROBUST_PROMPT.format(question=question)
    return RobustPair(r["chosen"], r["rejected"], prompt, seed, step)


def _clip_score(obj: dict, name: str, where: str, required: bool) -> Optional[float]:
    value = obj.get(name)
    if value is None:
        if required:
            raise RecordError(f"{where}: field '{name}' is required when a record has both branches (DDW weighs "
                              "them by CLIPScore(P, I_crop) / CLIPScore(P, I))")
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not -1.0 <= value <= 1.0:
        raise RecordError(f"{where}: field '{name}' must be a CLIP cosine in [-1, 1], got {value!r}")
    return float(value)


def parse_p2_line(line: str, where: str) -> P2Record:
    obj = parse_object(line, where)
    for name in ("id", "image", "prompt"):
        require_text(obj, name, where)
    focus, robust = _branch(obj, "focus", where), _branch(obj, "robust", where)
    if focus is None and robust is None:
        raise RecordError(f"{where}: a P2-DPO record needs field 'focus' or 'robust' (both are absent)")
    both = focus is not None and robust is not None
    return P2Record(
        id=obj["id"], image=obj["image"], prompt=obj["prompt"],
        focus=None if focus is None else _parse_focus(focus, where),
        robust=None if robust is None else _parse_robust(robust, obj["prompt"], where),
        clip_crop_score=_clip_score(obj, "clip_crop_score", where, both),
        clip_image_score=_clip_score(obj, "clip_image_score", where, both),
        meta=parse_meta(obj, where), source=where,
    )


def read_p2_records(path: Path) -> list[P2Record]:
    """Reads and validates a P2-DPO JSONL file (schema in the module docstring).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        RecordError: a malformed record; the message starts with ``{path}:{line}`` and names the field.
    """
    return read_jsonl(path, parse_p2_line)


def iter_p2_texts(records: Iterable[P2Record]) -> Iterator[str]:
    """Every prompt and response of the records: the corpus to train a tokenizer on."""
    for r in records:
        yield r.prompt
        if r.focus is not None:
            yield r.focus.chosen
            yield r.focus.rejected
        if r.robust is not None:
            yield r.robust.prompt
            yield r.robust.chosen
            yield r.robust.rejected


def keep_pair(
    chosen_logp: torch.Tensor,
    rejected_logp: torch.Tensor,
    chosen_ppl: torch.Tensor,
    rejected_ppl: torch.Tensor,
    max_ppl: float = 2.5,
    margin_low: float = -0.174,
    margin_high: float = 0.208,
) -> torch.Tensor:
    """P2-DPO's pair filter (§9.5; code ``Data_gen/p2_pairs/filter_pairs.py`` ``keep_record``).

    Keeps a pair iff ``max(chosen_ppl, rejected_ppl) < max_ppl`` and ``chosen_logp − rejected_logp`` lies in
    ``[margin_low, margin_high]`` (both ends kept, as the code). The log-probs are *mean per-token* values recorded
    at generation time, each under its own generation context (not the training-time sums).

    Args:
        chosen_logp, rejected_logp: [B] mean token log-probs.
        chosen_ppl, rejected_ppl: [B] perplexities ``exp(−mean token log-prob)``.
        max_ppl, margin_low, margin_high: the code's command-line defaults.

    Returns:
        [B] bool, True = keep.
    """
    margin = chosen_logp - rejected_logp
    return (torch.maximum(chosen_ppl, rejected_ppl) < max_ppl) & (margin >= margin_low) & (margin <= margin_high)


# ---------------------------------------------------------------------------------------------- image conditions

@functools.lru_cache(maxsize=None)
def vcd_coefficients(noise_step: int) -> tuple[float, float]:
    """(√ᾱ_t, √(1 − ᾱ_t)) of VCD's 1000-step schedule ``β = sigmoid(linspace(−6, 6))·(5e−3 − 1e−5) + 1e−5``
    (§9.4: 0.7342 / 0.6789 at t = 600)."""
    betas = torch.sigmoid(torch.linspace(-6, 6, NOISE_STEPS, dtype=torch.float64)) * (5e-3 - 1e-5) + 1e-5
    alpha_bar = float(torch.cumprod(1 - betas, 0)[noise_step])
    return math.sqrt(alpha_bar), math.sqrt(1 - alpha_bar)


def vcd_noise(pixels: torch.Tensor, noise_step: int, seed: int) -> torch.Tensor:
    """I_noise: VCD's diffusion forward ``√ᾱ_t·x + √(1 − ᾱ_t)·ε`` on the model's input pixels (§9.4).

    ε ~ N(0, 1) comes from a CPU generator seeded with ``seed``: the same tensor for policy and reference, on
    every epoch and every layout (OBJECTIVES.md §0.1).
    """
    a, b = vcd_coefficients(noise_step)
    eps = torch.randn(pixels.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    return a * pixels.float() + b * eps


def degrade(image: Image.Image, bbox: tuple[int, int, int, int]) -> Image.Image:
    """I_deg: the image with ``bbox`` filled by the per-channel mean colour of the whole image (§9.3 step 4)."""
    array = np.asarray(image, dtype=np.uint8).copy()
    left, top, right, bottom = bbox
    array[top:bottom, left:right] = np.rint(array.reshape(-1, 3).mean(0)).astype(np.uint8)
    return Image.fromarray(array)


def image_files(record: P2Record, root: Path) -> list[Path]:
    files = [resolve_path(record.image, root)]
    if record.focus is not None:
        files += [resolve_path(p, root) for p in (record.focus.crop_image, record.focus.deg_image) if p is not None]
    return files


def check_bbox(record: P2Record, root: Path) -> None:
    """Raises RecordError (at the record's ``file:line``) if its bbox leaves its image; reads the header only."""
    if record.focus is None or record.focus.bbox is None:
        return
    width, height = image_size(resolve_path(record.image, root))
    left, top, right, bottom = record.focus.bbox
    if right > width or bottom > height:
        raise RecordError(f"{record.source or record.id}: field 'focus.bbox' {list(record.focus.bbox)} leaves the "
                          f"{width}x{height} image")


def load_p2_pils(record: P2Record, root: Path) -> dict[str, Image.Image]:
    """The record's decoded image conditions at their own sizes: ``image`` (I), and ``crop`` (I_crop) and ``deg``
    (I_deg) with a focus branch (given files, or made from the bbox)."""
    image = open_rgb(resolve_path(record.image, root))
    out = {"image": image}
    f = record.focus
    if f is not None:
        out["crop"] = open_rgb(resolve_path(f.crop_image, root)) if f.crop_image else image.crop(f.bbox)
        out["deg"] = open_rgb(resolve_path(f.deg_image, root)) if f.deg_image else degrade(image, f.bbox)
    return out


def condition_tokens(record: P2Record, root: Path, images) -> dict[str, int]:
    """Image slots of each condition the record's rows show, as the image handler `images` counts them (an HF
    family's from file headers and the bbox; a fixed-size handler's without reading anything)."""
    image = images.num_tokens(resolve_path(record.image, root))
    out = {"image": image}
    f = record.focus
    if f is not None:
        if f.crop_image:
            out["crop"] = images.num_tokens(resolve_path(f.crop_image, root))
        else:
            left, top, right, bottom = f.bbox
            out["crop"] = images.num_tokens_of_size(right - left, bottom - top)
        # I_deg made from the bbox keeps the image's size
        out["deg"] = images.num_tokens(resolve_path(f.deg_image, root)) if f.deg_image else image
    if record.robust is not None:
        out["noise"] = image
    return out


def noised_pixels(image: torch.Tensor, noise_step: int, seed: int) -> torch.Tensor:
    """tiny_vlm's I_noise: ``[..., 3, H, W]`` pixels in [0, 1] whose normalised tensor carries the VCD noise.

    The tower normalises pixels with CLIP's statistics, so the noise goes onto the normalised tensor, as VCD
    noises the vision tower's input (and as for the HF families), and comes back in pixel units. The trainer
    (data/fixed_images.FixedSizeImages.noised) and the pair generator (p2_pairs.py) both call this: the robust pair
    is scored under the tensor it was made under. ε depends on the number of elements only, so ``[3, H, W]`` and
    ``[1, 3, H, W]`` get the same noise.
    """
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD))
    return vcd_noise((image - mean) / std, noise_step, seed) * std + mean
