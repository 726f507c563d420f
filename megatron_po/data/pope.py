"""A POPE-style hallucination probe (Li et al., 2023, "Evaluating Object Hallucination in Large Vision-Language
Models", §4.1) on held-out synthetic scenes, and its metrics.

Every held-out image gets, per sampling split, one question about an object that is drawn and one about an
object that is not ("Is there a red square in the image?"), so each split is exactly balanced. POPE's three
ways of choosing the absent object, with the training set's object statistics standing in for its corpus:
- ``random``: uniformly among the colour+shape objects not drawn;
- ``popular``: the absent object that appears in most training images;
- ``adversarial``: the absent object that co-occurs most with the drawn ones in training images.
The answer is read from log-probs, not sampled: the model says yes when its yes-answer is the more likely one.
"""

from __future__ import annotations

import collections
import itertools
import random
from pathlib import Path
from typing import Iterable

from megatron_po.data.records import PreferenceRecord
from megatron_po.data.synthetic import (COLOURS, SHAPES, YESNO_PROMPTS, _check_image_size, _record, _write_scenes,
                                        _yesno_pair)

SPLITS: tuple[str, ...] = ("random", "popular", "adversarial")
Object = tuple[str, str]


class ObjectStats:
    """How often each (colour, shape) object appears in training images, and how often two appear together."""

    def __init__(self, records: Iterable[PreferenceRecord]):
        self.frequency: collections.Counter[Object] = collections.Counter()
        self.cooccurrence: collections.Counter[tuple[Object, Object]] = collections.Counter()
        seen = set()
        for r in records:
            image = str(r.image)
            if image in seen or "objects" not in r.meta:  # one count per image, not per question about it
                continue
            seen.add(image)
            objects = sorted({(o["colour"], o["shape"]) for o in r.meta["objects"]})
            self.frequency.update(objects)
            self.cooccurrence.update(itertools.permutations(objects, 2))


def absent_object(split: str, drawn: set[Object], stats: ObjectStats, rng: random.Random) -> Object:
    """The absent object a question of `split` asks about (ties broken by name: the set is reproducible)."""
    candidates = sorted((c, s) for c in COLOURS for s in SHAPES if (c, s) not in drawn)
    if split == "random":
        return rng.choice(candidates)
    if split == "popular":
        return max(candidates, key=lambda o: (stats.frequency[o], o))
    if split == "adversarial":
        return max(candidates, key=lambda o: (sum(stats.cooccurrence[d, o] for d in drawn), stats.frequency[o], o))
    raise ValueError(f"POPE split {split!r} unknown (known: {SPLITS})")


def generate_pope_set(out_dir: Path, train_records: list[PreferenceRecord], num_images: int, seed: int,
                      image_size: int = 32) -> Path:
    """Writes ``pope.jsonl`` (+ ``images/pope_NNNNN.png``): per held-out image and split, a present and an
    absent question (``meta["pope"]`` the split, ``meta["present"]``); scenes from their own random stream."""
    _check_image_size(image_size)
    stats = ObjectStats(train_records)

    def questions(rng, i, rel_path, objects):
        drawn = {(o["colour"], o["shape"]) for o in objects}
        lines = []
        for split in SPLITS:
            for present in (True, False):
                absent = None if present else absent_object(split, drawn, stats, rng)
                pair = _yesno_pair(rng, objects, present=present, prompt=YESNO_PROMPTS[0], absent=absent)
                pair.update(kind="yesno", pope=split)
                name = "present" if present else "absent"
                lines.append(_record(f"pope-{i:05d}-{split}-{name}", rel_path, pair, objects))
        return lines

    return _write_scenes(out_dir, "pope", num_images, seed, image_size, questions)


def pope_metrics(says_yes: list[bool], present: list[bool]) -> dict[str, float]:
    """POPE's metrics with "yes" as the positive class: accuracy, precision, recall, F1 and the yes-ratio."""
    tp = sum(y and p for y, p in zip(says_yes, present))
    fp = sum(y and not p for y, p in zip(says_yes, present))
    fn = sum(not y and p for y, p in zip(says_yes, present))
    tn = len(present) - tp - fp - fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {"accuracy": (tp + tn) / len(present), "precision": precision, "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "yes_ratio": (tp + fp) / len(present)}
