"""P2-DPO samples of the embedded shapes task (data/synthetic.py), in the schema of data/p2_records.py.

Each sample asks about one drawn object: its colour (when its shape is drawn once) or whether it is there (yes/no,
always present, so there is an object to focus on). The focus pair is the task's grounded answer against its
hallucinated twin; ``bbox`` is a box around the object (2-px margin), so I_crop shows the object and I_deg erases
it with the image's mean colour — the condition under which P2-DPO's y_l^f is generated. The robustness pair
answers the same question again (colour questions: against a freshly drawn wrong colour) and is scored under
I_noise (a seed per sample). The CLIP scores are synthetic and deterministic: ``clip_image_score = 0.25 + 0.5 *
share`` with ``share`` the object's share of the image area, against ``clip_crop_score = 0.3``: a small object
makes the crop match the question better than the whole image (ratio > 1, DDW shifts weight to the focus branch),
a large one the opposite (ratio ∈ [0.9, 1.1] for the 32-px task). :data:`FOCUS_ONLY` and :data:`ROBUST_ONLY` of
the samples lack the other branch.

``generate_p2_dataset`` also writes the pair task's ``eval.jsonl`` (the same split as
``generate_synthetic_dataset`` with the same seed), so held-out metrics compare across objectives.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from megatron_po.data.p2_records import DEFAULT_NOISE_STEP
from megatron_po.data.synthetic import _check_image_size, _colour_pair, _write_scenes, _write_split, _yesno_pair

FOCUS_ONLY = 0.15
ROBUST_ONLY = 0.15
CROP_MARGIN = 2


def _asked_object(rng: random.Random, objects: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(question + focus pair, the object it asks about)."""
    counts = {o["shape"]: sum(p["shape"] == o["shape"] for p in objects) for o in objects}
    unique = [o for o in objects if counts[o["shape"]] == 1]
    if unique and rng.random() < 0.5:
        target = rng.choice(unique)
        # "the square" is only well defined when exactly one square is drawn
        return {**_colour_pair(rng, objects, target["shape"]), "kind": "colour"}, target
    pair = {**_yesno_pair(rng, objects, present=True), "kind": "yesno"}
    query = pair["query"]
    return pair, next(o for o in objects if (o["colour"], o["shape"]) == (query["colour"], query["shape"]))


def focus_box(drawn: list[int], image_size: int) -> tuple[list[int], float]:
    """(the crop box around an object drawn in the inclusive box `drawn`, with a CROP_MARGIN; the object's share of
    the image area)."""
    x0, y0, x1, y1 = drawn
    bbox = [max(0, x0 - CROP_MARGIN), max(0, y0 - CROP_MARGIN), min(image_size, x1 + 1 + CROP_MARGIN),
            min(image_size, y1 + 1 + CROP_MARGIN)]
    return bbox, (x1 - x0 + 1) * (y1 - y0 + 1) / image_size**2


def box_clip_scores(share: float) -> tuple[float, float]:
    """(clip_crop_score, clip_image_score) standing in for a CLIP model: the crop matches the question as 0.3,
    the whole image as 0.25 + 0.5·share (a small object: ratio > 1, DDW favours the focus branch)."""
    return 0.3, round(0.25 + 0.5 * share, 4)


def _p2_record(rng: random.Random, record_id: str, rel_path: str, objects: list[dict[str, Any]],
               image_size: int) -> dict[str, Any]:
    pair, target = _asked_object(rng, objects)
    bbox, share = focus_box(target["bbox"], image_size)
    # a colour question gets a freshly drawn wrong colour; a yes/no question has only one wrong answer
    robust = _colour_pair(rng, objects, target["shape"]) if pair["kind"] == "colour" else pair
    draw = rng.random()
    record = {
        "id": record_id, "image": rel_path, "prompt": pair["prompt"],
        "focus": None if draw < ROBUST_ONLY else {"chosen": pair["chosen"], "rejected": pair["rejected"],
                                                   "bbox": bbox},
        "robust": None if ROBUST_ONLY <= draw < ROBUST_ONLY + FOCUS_ONLY else {
            "chosen": robust["chosen"], "rejected": robust["rejected"],
            "noise_seed": rng.randrange(2**31), "noise_step": DEFAULT_NOISE_STEP},
        **dict(zip(("clip_crop_score", "clip_image_score"), box_clip_scores(share))),
        "meta": {"kind": pair["kind"], "objects": objects, "target": {**pair["target"], "bbox": target["bbox"]}},
    }
    return record


def generate_p2_questions(out_dir: Path, num_images: int, seed: int, image_size: int = 32) -> Path:
    """Writes ``p2q.jsonl``: the input of P2-DPO's pair generator (p2_pairs.py), one question per image
    about one drawn object, with the object's crop box: ``{"id", "image", "prompt", "bbox", "meta"}`` (images
    ``images/p2q_NNNNN.png``, their own random stream). The answers are left to the model.
    """
    _check_image_size(image_size)

    def question(rng, i, rel_path, objects):
        pair, target = _asked_object(rng, objects)
        bbox, share = focus_box(target["bbox"], image_size)
        return [json.dumps({"id": f"p2q-{i:05d}", "image": rel_path, "prompt": pair["prompt"], "bbox": bbox,
                            "meta": {"kind": pair["kind"], "objects": objects, "share": share}}, sort_keys=True)]

    return _write_scenes(out_dir, "p2q", num_images, seed, image_size, question)


def generate_p2_dataset(out_dir: Path, num_train: int, num_eval: int, seed: int,
                        image_size: int = 32) -> dict[str, int]:
    """Writes ``p2_train.jsonl`` (P2-DPO samples, images ``images/p2_train_NNNNN.png``) and the pair task's
    ``eval.jsonl``; the same seed writes byte-identical files.

    Returns:
        ``{"p2_train": num_train, "eval": num_eval}``.
    """
    _check_image_size(image_size)
    if num_train < 1 or num_eval < 0:
        raise ValueError(f"num_train must be >= 1 and num_eval >= 0, got {num_train} and {num_eval}")
    _write_scenes(out_dir, "p2_train", num_train, seed, image_size,
                  lambda rng, i, rel_path, objects: [json.dumps(_p2_record(rng, f"p2-{i:05d}", rel_path, objects,
                                                                           image_size), sort_keys=True)])
    _write_split(out_dir, "eval", num_eval, seed, image_size)
    return {"p2_train": num_train, "eval": num_eval}
