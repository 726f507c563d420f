"""P2-DPO's pair generation (OBJECTIVES.md §9.3-9.5) with our megatron VLM: questions about images with an object
box in, P2-DPO records (data/p2_records.py) out, in any TP layout (`megatron-po generate-p2`).

Per question P about image I with box b:
- focus pair (§9.3): I_crop = I cropped to b, I_deg = I with b filled by its mean colour (the box is given, where
  the paper finds it from an attention map); y_w^f = greedy answer under [I, I_crop] and the "enhance" prompt,
  y_l^f = greedy answer under I_deg and P. Each records its mean token log-prob and perplexity.
- robustness pair (§9.4): I_noise = VCD noise at `noise_step` on the tower's normalised input (seeded per record,
  the tensor the trainer rebuilds); y_l^r = greedy answer under I_noise, y_w^r = contrastive decoding (expert I,
  amateur I_noise), both with the robust prompt. Greedy where the paper samples at temperature 0.2: the pairs
  are reproducible and identical in every layout.
- CLIP scores (§9.5): raw cosines CLIP(P, I_crop) and CLIP(P, I) from a CLIP model given by path
  (transformers' CLIPModel, local files only), or `box`: a stand-in from the box's share of the image
  (data/synthetic_p2.box_clip_scores) when no CLIP model is at hand.
- filter (§9.5): a focus pair is kept iff both perplexities are below `max_ppl` and the mean-log-prob margin lies
  in [margin_low, margin_high] (`keep_pair`); a robust pair carries no generation metrics in the paper's code and is
  kept. Either pair is dropped when its two answers are equal or empty (nothing to prefer); a record with no pair
  left is dropped. The yield (pairs kept / generated) is returned with the records.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Protocol, Sequence

import torch
from PIL import Image

from megatron_po.data.p2_records import DEFAULT_NOISE_STEP, ROBUST_PROMPT, degrade, keep_pair, noised_pixels
from megatron_po.data.records import (RecordError, open_rgb, parse_object, read_jsonl, require_text, resolve_path,
                                      to_tensor)
from megatron_po.generation import Prompts, greedy_generate

ENHANCE_PROMPT = ("Answer the question mainly based on the first image, refer to the cropping details of the second "
                  "image if necessary, answer this question: {question}")
"""§9.3 step 4: the prompt of y_w^f, shown [I, I_crop]."""


@dataclass(frozen=True)
class P2GenConfig:
    max_new_tokens: int = 32
    noise_step: int = DEFAULT_NOISE_STEP
    cd_alpha: float = 0.1
    cd_beta: float = 0.1
    max_ppl: float = 2.5
    margin_low: float = -0.174
    margin_high: float = 0.208
    batch_size: int = 16
    seed: int = 0
    """Base of the per-record noise seeds (with a hash of the record id: stable under reordering)."""


@dataclass
class Question:
    id: str
    image: str
    prompt: str
    bbox: Optional[tuple[int, int, int, int]]
    meta: dict


def parse_question(line: str, where: str) -> Question:
    obj = parse_object(line, where)
    for name in ("id", "image", "prompt"):
        require_text(obj, name, where)
    bbox = obj.get("bbox")
    if bbox is not None and not (isinstance(bbox, list) and len(bbox) == 4
                                 and all(isinstance(v, int) and not isinstance(v, bool) for v in bbox)
                                 and 0 <= bbox[0] < bbox[2] and 0 <= bbox[1] < bbox[3]):
        raise RecordError(f"{where}: field 'bbox' must be [left, top, right, bottom] integers with left < right and "
                          f"top < bottom, got {bbox!r}")
    meta = obj.get("meta", {})
    return Question(obj["id"], obj["image"], obj["prompt"], None if bbox is None else tuple(bbox),
                    meta if isinstance(meta, dict) else {})


def read_questions(path: Path) -> list[Question]:
    """``{"id", "image", "prompt", "bbox"?}`` per line (a question without a box gets a robust pair only)."""
    return read_jsonl(path, parse_question)


class ClipScores(Protocol):
    def __call__(self, prompt: str, image: Image.Image, crop: Image.Image, box_share: float) -> tuple[float, float]:
        """(CLIP(P, I_crop), CLIP(P, I)) as raw cosines."""


class HFClip:
    """CLIP cosines from a transformers CLIP checkpoint directory (safetensors, local files only, no remote code)."""

    def __init__(self, path: str):
        from transformers import AutoProcessor, CLIPModel

        self.model = CLIPModel.from_pretrained(path, local_files_only=True).eval()
        self.processor = AutoProcessor.from_pretrained(path, local_files_only=True)

    @torch.no_grad()
    def __call__(self, prompt, image, crop, box_share):
        inputs = self.processor(text=[prompt], images=[crop, image], return_tensors="pt", padding=True,
                                truncation=True)
        text = self.model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        pixels = self.model.get_image_features(pixel_values=inputs["pixel_values"])
        text, pixels = (t.pooler_output if hasattr(t, "pooler_output") else t for t in (text, pixels))
        cos = torch.nn.functional.cosine_similarity(text, pixels)
        return float(cos[0]), float(cos[1])


def box_clip(prompt, image, crop, box_share):
    from megatron_po.data.synthetic_p2 import box_clip_scores

    return box_clip_scores(box_share)


def clip_scorer(spec: str) -> ClipScores:
    """`box` (the stand-in, no model) or a CLIP checkpoint directory."""
    return box_clip if spec == "box" else HFClip(spec)


def noise_seed(record_id: str, base: int) -> int:
    return (zlib.crc32(record_id.encode()) + base) % 2**31


def generate_p2_records(model, tokenizer, groups, questions: Sequence[Question], root: Path, image_size: int,
                        num_image_tokens: int, clip: ClipScores, cfg: P2GenConfig = P2GenConfig(),
                        tp_pad: int = 1) -> tuple[list[dict], dict]:
    """P2 records for `questions` (images resolved against `root`) and the generation's statistics:
    ``{"questions", "pairs_generated", "pairs_kept", "yield", "focus_kept", "robust_kept", ...}``."""
    records, stats = [], {"questions": len(questions), "focus_generated": 0, "focus_kept": 0, "robust_generated": 0,
                          "robust_kept": 0, "dropped_identical": 0, "dropped_filter": 0}
    for start in range(0, len(questions), cfg.batch_size):
        batch = list(questions[start:start + cfg.batch_size])
        records += _generate_batch(model, tokenizer, groups, batch, root, image_size, num_image_tokens, clip, cfg,
                                   tp_pad, stats)
    generated = stats["focus_generated"] + stats["robust_generated"]
    kept = stats["focus_kept"] + stats["robust_kept"]
    stats.update(pairs_generated=generated, pairs_kept=kept, records=len(records),
                 **{"yield": kept / generated if generated else 0.0})
    return records, stats


def _prompts(tokenizer, texts: list[str], images: list[list[torch.Tensor]], n: int) -> Prompts:
    flat, row_images = [], []
    for row in images:
        row_images.append(list(range(len(flat), len(flat) + len(row))))
        flat += row
    return Prompts([tokenizer.prompt_ids(t, [n] * len(row)) for t, row in zip(texts, images)], torch.stack(flat),
                   row_images)


def _generate_batch(model, tokenizer, groups, batch, root, image_size, n, clip, cfg, tp_pad, stats) -> list[dict]:
    gen = dict(max_new_tokens=cfg.max_new_tokens, pad_to_multiple_of=tp_pad)
    pils = [open_rgb(resolve_path(q.image, root)) for q in batch]
    clean = [to_tensor(p, image_size) for p in pils]
    seeds = [noise_seed(q.id, cfg.seed) for q in batch]
    noisy = [noised_pixels(x, cfg.noise_step, s) for x, s in zip(clean, seeds)]
    robust_text = [ROBUST_PROMPT.format(question=q.prompt) for q in batch]
    rob_l = greedy_generate(model, tokenizer, _prompts(tokenizer, robust_text, [[x] for x in noisy], n), groups, **gen)
    rob_w = greedy_generate(model, tokenizer, _prompts(tokenizer, robust_text, [[x] for x in clean], n), groups,
                            amateur=_prompts(tokenizer, robust_text, [[x] for x in noisy], n), cd_alpha=cfg.cd_alpha,
                            cd_beta=cfg.cd_beta, **gen)
    boxed = [i for i, q in enumerate(batch) if q.bbox is not None]
    crops = {i: pils[i].crop(batch[i].bbox) for i in boxed}
    foc_w = greedy_generate(model, tokenizer, _prompts(
        tokenizer, [ENHANCE_PROMPT.format(question=batch[i].prompt) for i in boxed],
        [[clean[i], to_tensor(crops[i], image_size)] for i in boxed], n), groups, **gen) if boxed else []
    foc_l = greedy_generate(model, tokenizer, _prompts(
        tokenizer, [batch[i].prompt for i in boxed],
        [[to_tensor(degrade(pils[i], batch[i].bbox), image_size)] for i in boxed], n), groups, **gen) if boxed else []
    focus = {i: (w, l) for i, w, l in zip(boxed, foc_w, foc_l)}

    out = []
    for i, q in enumerate(batch):
        record = {"id": q.id, "image": q.image, "prompt": q.prompt, "focus": None, "robust": None, "meta": q.meta}
        stats["robust_generated"] += 1
        w, l = (tokenizer.decode(g.ids).strip() for g in (rob_w[i], rob_l[i]))
        if w and l and w != l:
            record["robust"] = {"chosen": w, "rejected": l, "noise_seed": seeds[i], "noise_step": cfg.noise_step,
                                "prompt": robust_text[i], "cd_alpha": cfg.cd_alpha, "cd_beta": cfg.cd_beta}
            stats["robust_kept"] += 1
        else:
            stats["dropped_identical"] += 1
        if i in focus:
            stats["focus_generated"] += 1
            gw, gl = focus[i]
            w, l = tokenizer.decode(gw.ids).strip(), tokenizer.decode(gl.ids).strip()
            keep = bool(keep_pair(*(torch.tensor([v]) for v in (gw.mean_logp, gl.mean_logp, gw.ppl, gl.ppl)),
                                  max_ppl=cfg.max_ppl, margin_low=cfg.margin_low, margin_high=cfg.margin_high))
            if not (w and l and w != l):
                stats["dropped_identical"] += 1
            elif not keep:
                stats["dropped_filter"] += 1
            else:
                record["focus"] = {"chosen": w, "rejected": l, "bbox": list(q.bbox), "chosen_logp": gw.mean_logp,
                                   "rejected_logp": gl.mean_logp, "chosen_ppl": gw.ppl, "rejected_ppl": gl.ppl}
                stats["focus_kept"] += 1
        if record["focus"] is None and record["robust"] is None:
            continue
        if record["focus"] is not None and record["robust"] is not None:
            share = (q.bbox[2] - q.bbox[0]) * (q.bbox[3] - q.bbox[1]) / (pils[i].width * pils[i].height)
            record["clip_crop_score"], record["clip_image_score"] = clip(q.prompt, pils[i], crops[i],
                                                                         q.meta.get("share", share))
        out.append(record)
    return out


def write_records(records: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records), encoding="utf-8")
    return path
