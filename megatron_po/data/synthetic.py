"""The embedded default dataset: coloured shapes with grounded and hallucinated answers.

Every image holds 1-3 coloured shapes on a plain background. Each pair asks one question about it; ``chosen``
answers from the pixels, ``rejected`` uses the *same sentence template* but hallucinates: a wrong colour, an
object that is not there, or a wrong count. Because the two responses differ only in the grounded words, a
policy can only prefer ``chosen`` by looking at the image; the text alone carries no signal.

Kinds of prompt and the hallucination each one gets:

=============  ==========================================  =====================================
``kind``       example prompt                              ``meta["hallucination"]``
=============  ==========================================  =====================================
``describe``   "Describe the image."                       ``wrong_colour`` or ``added_object``
``colour``     "What colour is the square?"                ``wrong_colour``
``count``      "How many circles are there?"               ``wrong_count``
``yesno``      "Is there a red square in the image?"       ``added_object`` (says yes to an absent
                                                           object) or ``missed_object`` (says no)
=============  ==========================================  =====================================

``yesno`` makes up :data:`YESNO_SHARE` of the pairs; the other kinds share the rest evenly. A description of
several objects has one sentence per object ("There is a red square. There is a blue circle."), so
sentence-level objectives (ASPO) see K > 1; its rejected twin changes one sentence (``wrong_colour``) or inserts
one (``added_object``) and keeps every other sentence verbatim; ``meta["target"]["sentence"]`` is the index of
the hallucinated sentence in ``rejected``.

``meta["objects"]`` lists every shape drawn (colour, shape, bbox); ``meta["target"]`` names what the question
asks about and the true and hallucinated values; ``yesno`` records add ``meta["present"]`` (whether the queried
colour+shape is drawn) and ``meta["query"]`` (``{"colour", "shape"}``). :func:`generate_probe_set` writes a
balanced set of such yes/no questions about held-out images for measuring hallucination.

Only ``random.Random`` seeded from ``(seed, split)`` drives generation, so the same seed gives byte-identical
JSONL and PNG files, and the eval split does not change when ``num_train`` does. The probe set draws from its
own stream (split name ``probe``), never from the train/eval ones.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from megatron_po.data.records import PreferenceRecord

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (235, 210, 20),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
}
"""Colour names and the RGB each is drawn with (far apart, so a 32-px image keeps them distinct)."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
BACKGROUNDS: tuple[tuple[int, int, int], ...] = ((255, 255, 255), (235, 235, 235), (215, 215, 215))
NUMBER_WORDS: tuple[str, ...] = ("no", "one", "two", "three", "four")

DESCRIBE_PROMPTS = ("Describe the image.", "What do you see in the image?", "What is in the picture?")
DESCRIBE_ANSWERS = ("There is {objects}.", "The image shows {objects}.", "I can see {objects}.")
"""One-sentence descriptions (a single object; the rejected one may list a hallucinated second)."""
DESCRIBE_SENTENCES: tuple[tuple[str, str], ...] = (
    ("There is {obj}.", "There is {obj}."),
    ("I can see {obj}.", "I can also see {obj}."),
    ("The image shows {obj}.", "There is also {obj}."),
)
"""Descriptions of several objects, one sentence each: (first sentence, every further sentence)."""
COLOUR_PROMPTS = ("What colour is the {shape}?", "Which colour is the {shape} in the image?",
                  "What is the colour of the {shape}?")
COLOUR_ANSWERS = ("The {shape} is {colour}.", "It is {colour}.", "The {shape} in the image is {colour}.")
COUNT_PROMPTS = ("How many {shape}s are there?", "Count the {shape}s in the image.",
                 "How many {shape}s can you see?")
YESNO_PROMPTS = ("Is there {obj} in the image?", "Is there {obj} in the picture?", "Do you see {obj} in the image?")
"""The first one is the probe set's (fixed) wording."""
YES_ANSWER = "Yes, there is {obj}."
NO_ANSWER = "No, there is no {colour} {shape}."
YESNO_SHARE = 0.2
"""Share of yes/no pairs in the train and eval splits."""


def _count_answer(template: int, shape: str, n: int) -> str:
    word = NUMBER_WORDS[n]
    noun = shape if n == 1 else shape + "s"
    if template == 0:
        return f"There {'is' if n == 1 else 'are'} {word} {noun}."
    if template == 1:
        return f"I count {word} {noun}."
    return f"The image has {word} {noun}."


def _phrase_object(colour: str, shape: str) -> str:
    """'a red square', 'an orange circle'."""
    return f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape}"


def _phrase_objects(objects: list[dict[str, Any]]) -> str:
    """'a red square', 'a red square and a blue circle', 'a, b and c'."""
    names = [_phrase_object(o["colour"], o["shape"]) for o in objects]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _describe_sentences(template: int, objects: list[dict[str, Any]]) -> str:
    """'There is a red square. There is also a blue circle.': one sentence per object."""
    first, further = DESCRIBE_SENTENCES[template]
    return " ".join((first if k == 0 else further).format(obj=_phrase_object(o["colour"], o["shape"]))
                    for k, o in enumerate(objects))


def _draw_scene(rng: random.Random, image_size: int) -> tuple[Image.Image, list[dict[str, Any]]]:
    """Draws 1-3 shapes, one per distinct quadrant, so shapes never overlap."""
    background = rng.choice(BACKGROUNDS)
    image = Image.new("RGB", (image_size, image_size), background)
    draw = ImageDraw.Draw(image)
    cell = image_size // 2
    num_objects = rng.randint(1, 3)
    quadrants = rng.sample(range(4), num_objects)
    objects = []
    for q in quadrants:
        colour = rng.choice(list(COLOURS))
        shape = rng.choice(SHAPES)
        # the shape fills 55-85% of its quadrant with a random offset; the 1-px margin keeps neighbours apart
        size = rng.randint(max(3, int(cell * 0.55)), max(3, int(cell * 0.85)))
        x0 = (q % 2) * cell + rng.randint(1, max(1, cell - size - 1))
        y0 = (q // 2) * cell + rng.randint(1, max(1, cell - size - 1))
        box = [x0, y0, x0 + size - 1, y0 + size - 1]
        fill = COLOURS[colour]
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([((box[0] + box[2]) / 2, box[1]), (box[0], box[3]), (box[2], box[3])], fill=fill)
        objects.append({"colour": colour, "shape": shape, "bbox": box})
    return image, objects


def _describe_pair(rng: random.Random, objects: list[dict[str, Any]]) -> dict[str, Any]:
    multi = len(objects) > 1
    template = rng.randrange(len(DESCRIBE_SENTENCES) if multi else len(DESCRIBE_ANSWERS))
    present = {(o["colour"], o["shape"]) for o in objects}
    if rng.random() < 0.5:
        hallucination = "wrong_colour"
        index = rng.randrange(len(objects))
        shape = objects[index]["shape"]
        # the new colour must not turn the object into another one that is really there
        candidates = [c for c in COLOURS if (c, shape) not in present]
        colour = rng.choice(candidates)
        fake = [dict(o) for o in objects]
        fake[index] = {**fake[index], "colour": colour}
        target = {"index": index, "answer": objects[index]["colour"], "rejected_answer": colour,
                  "sentence": index if multi else 0}
    else:
        hallucination = "added_object"
        absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
        colour, shape = rng.choice(absent)
        fake = [dict(o) for o in objects]
        # a template whose first sentence differs from the others keeps the inserted sentence after the
        # first, so that only the hallucinated sentence is new in the rejected answer
        first, further = DESCRIBE_SENTENCES[template] if multi else ("", "")
        position = rng.randrange(0 if first == further else 1, len(fake) + 1)
        fake.insert(position, {"colour": colour, "shape": shape})
        target = {"added": {"colour": colour, "shape": shape}, "sentence": position if multi else 0}
    if multi:
        chosen, rejected = _describe_sentences(template, objects), _describe_sentences(template, fake)
    else:
        chosen = DESCRIBE_ANSWERS[template].format(objects=_phrase_objects(objects))
        rejected = DESCRIBE_ANSWERS[template].format(objects=_phrase_objects(fake))
    return {
        "prompt": rng.choice(DESCRIBE_PROMPTS),
        "chosen": chosen,
        "rejected": rejected,
        "hallucination": hallucination,
        "target": target,
    }


def _colour_pair(rng: random.Random, objects: list[dict[str, Any]], shape: str) -> dict[str, Any]:
    colour = next(o["colour"] for o in objects if o["shape"] == shape)
    wrong = rng.choice([c for c in COLOURS if c != colour])
    template = COLOUR_ANSWERS[rng.randrange(len(COLOUR_ANSWERS))]
    return {
        "prompt": rng.choice(COLOUR_PROMPTS).format(shape=shape),
        "chosen": template.format(shape=shape, colour=colour),
        "rejected": template.format(shape=shape, colour=wrong),
        "hallucination": "wrong_colour",
        "target": {"shape": shape, "answer": colour, "rejected_answer": wrong},
    }


def _count_pair(rng: random.Random, objects: list[dict[str, Any]]) -> dict[str, Any]:
    # mostly shapes that are there; sometimes an absent one, whose true answer is "no ..."
    present_shapes = sorted({o["shape"] for o in objects}, key=SHAPES.index)
    shape = rng.choice(present_shapes) if rng.random() < 0.8 else rng.choice(SHAPES)
    n = sum(o["shape"] == shape for o in objects)
    wrong = rng.choice([k for k in range(len(NUMBER_WORDS)) if k != n and abs(k - n) <= 2])
    template = rng.randrange(3)
    return {
        "prompt": rng.choice(COUNT_PROMPTS).format(shape=shape),
        "chosen": _count_answer(template, shape, n),
        "rejected": _count_answer(template, shape, wrong),
        "hallucination": "wrong_count",
        "target": {"shape": shape, "answer": n, "rejected_answer": wrong},
    }


def _yesno_pair(rng: random.Random, objects: list[dict[str, Any]], present: bool | None = None,
                prompt: str | None = None, absent: tuple[str, str] | None = None,
                near_miss: float = 0.0) -> dict[str, Any]:
    """'Is there a red square in the image?': about a drawn object, or a colour+shape combination not drawn
    (`absent`, when the caller chose it; else, with probability `near_miss`, one that shares its colour or its
    shape with a drawn object, so that only binding the two answers it)."""
    if present is None:
        present = rng.random() < 0.5
    if present:
        query = rng.choice(objects)
        colour, shape = query["colour"], query["shape"]
    elif absent is not None:
        colour, shape = absent
    else:
        drawn = {(o["colour"], o["shape"]) for o in objects}
        candidates = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in drawn]
        near = [(c, s) for c, s in candidates if any(c == o["colour"] or s == o["shape"] for o in objects)]
        colour, shape = rng.choice(near if near_miss > 0 and near and rng.random() < near_miss else candidates)
    obj = _phrase_object(colour, shape)
    yes, no = YES_ANSWER.format(obj=obj), NO_ANSWER.format(colour=colour, shape=shape)
    return {
        "prompt": (prompt or rng.choice(YESNO_PROMPTS)).format(obj=obj),
        "chosen": yes if present else no,
        "rejected": no if present else yes,
        "hallucination": "missed_object" if present else "added_object",
        "target": {"answer": "yes" if present else "no", "rejected_answer": "no" if present else "yes"},
        "present": present,
        "query": {"colour": colour, "shape": shape},
    }


def _make_pair(rng: random.Random, objects: list[dict[str, Any]], yesno_share: float = YESNO_SHARE,
               near_miss: float = 0.0) -> dict[str, Any]:
    if rng.random() < yesno_share:
        pair = _yesno_pair(rng, objects, near_miss=near_miss)
        pair["kind"] = "yesno"
        return pair
    counts = {s: sum(o["shape"] == s for o in objects) for s in SHAPES}
    unique_shapes = [s for s in SHAPES if counts[s] == 1]
    kinds = ["describe", "count"] + (["colour"] if unique_shapes else [])
    kind = rng.choice(kinds)
    if kind == "describe":
        pair = _describe_pair(rng, objects)
    elif kind == "colour":
        # "the square" is only well defined when exactly one square is drawn
        pair = _colour_pair(rng, objects, rng.choice(unique_shapes))
    else:
        pair = _count_pair(rng, objects)
    pair["kind"] = kind
    return pair


def _record(record_id: str, rel_path: str, pair: dict[str, Any], objects: list[dict[str, Any]]) -> str:
    meta = {"kind": pair["kind"], "hallucination": pair["hallucination"], "objects": objects,
            "target": pair["target"]}
    if pair["kind"] == "yesno":
        meta.update(present=pair["present"], query=pair["query"])
    if "pope" in pair:  # the POPE sampling split of the question (data/pope.py)
        meta["pope"] = pair["pope"]
    record = {"id": record_id, "image": rel_path, "prompt": pair["prompt"], "chosen": pair["chosen"],
              "rejected": pair["rejected"], "meta": meta}
    return json.dumps(record, sort_keys=True)


def _rng(seed: int, split: str) -> random.Random:
    return random.Random(f"megatron_po-synthetic-{seed}-{split}")


def _check_image_size(image_size: int) -> None:
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16 to draw recognisable shapes, got {image_size}")


def _write_scenes(out_dir: Path, split: str, count: int, seed: int, image_size: int,
                  records: Callable[[random.Random, int, str, list[dict[str, Any]]], list[str]]) -> Path:
    """Draws ``count`` scenes from the ``split`` stream, saves ``images/{split}_NNNNN.png`` and writes
    ``{split}.jsonl`` with the JSON lines ``records(rng, i, image path, objects)`` gives each scene."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = _rng(seed, split)
    lines = []
    for i in range(count):
        image, objects = _draw_scene(rng, image_size)
        rel_path = f"images/{split}_{i:05d}.png"
        image.save(out_dir / rel_path, format="PNG")
        lines += records(rng, i, rel_path, objects)
    path = out_dir / f"{split}.jsonl"
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _write_split(out_dir: Path, split: str, num_pairs: int, seed: int, image_size: int, **mix: float) -> None:
    _write_scenes(out_dir, split, num_pairs, seed, image_size,
                  lambda rng, i, rel_path, objects: [_record(f"{split}-{i:05d}", rel_path,
                                                             _make_pair(rng, objects, **mix), objects)])


def generate_synthetic_dataset(out_dir: Path, num_train: int, num_eval: int, seed: int,
                               image_size: int = 32, yesno_share: float = YESNO_SHARE,
                               near_miss: float = 0.0) -> dict[str, int]:
    """Writes the coloured-shapes preference dataset.

    Args:
        out_dir: created if missing; receives ``images/{train,eval}_NNNNN.png``, ``train.jsonl``, ``eval.jsonl``
            (image paths in the JSONL are relative to ``out_dir``).
        num_train: pairs (and images) in the train split.
        num_eval: pairs (and images) in the eval split.
        seed: the same seed writes byte-identical files.
        image_size: side of the square RGB images, at least 16 pixels.
        yesno_share: share of yes/no pairs in both splits (balanced present / absent).
        near_miss: share of the absent-object yes/no pairs whose object shares its colour or its shape with a
            drawn one (the rest: any combination not drawn). Both defaults keep the files of earlier versions.

    Returns:
        ``{"train": num_train, "eval": num_eval, "images": num_train + num_eval}``.
    """
    _check_image_size(image_size)
    if num_train < 0 or num_eval < 0:
        raise ValueError(f"num_train and num_eval must be >= 0, got {num_train} and {num_eval}")
    if not (0.0 <= yesno_share <= 1.0 and 0.0 <= near_miss <= 1.0):
        raise ValueError(f"yesno_share and near_miss must lie in [0, 1], got {yesno_share} and {near_miss}")
    mix = dict(yesno_share=yesno_share, near_miss=near_miss)
    _write_split(out_dir, "train", num_train, seed, image_size, **mix)
    _write_split(out_dir, "eval", num_eval, seed, image_size, **mix)
    return {"train": num_train, "eval": num_eval, "images": num_train + num_eval}


def generate_probe_set(out_dir: Path, num_images: int, seed: int, image_size: int = 32) -> Path:
    """Writes a yes/no hallucination probe about held-out images (POPE-style).

    Every image gets two questions in the fixed wording "Is there a {colour} {shape} in the image?": one about
    an object that is drawn and one about a colour+shape combination that is not, so the set is exactly
    balanced (``2 * num_images`` records, present then absent for each image). Each record's ``chosen`` is the
    correct answer ("Yes, there is a red square." / "No, there is no red square.") and ``rejected`` the
    opposite one; ``meta`` is that of ``yesno`` training pairs (``present``, ``query``, ``objects``, ...).

    The scenes come from their own random stream (split ``probe``), disjoint from the train/eval streams of any
    seed; the scene space is small, so a probe image may by chance repeat a training one pixel for pixel
    (rare: single-object scenes have ~10^4 variants).

    Scoring: a model *answers yes* when log p(Yes-answer) > log p(No-answer) (:func:`probe_answers_yes`, from
    the summed log-probs of ``chosen`` and ``rejected``). Hallucination rate = share of absent-object probes
    answered yes; accuracy = share of all probes answered correctly (``chosen`` more likely than ``rejected``).

    Args:
        out_dir: receives ``probe.jsonl`` and ``images/probe_NNNNN.png`` (names that never collide with the
            ``train_``/``eval_`` images, so the probe may share the dataset directory).
        num_images: held-out images; the probe has twice as many records.
        seed: the same seed writes byte-identical files.
        image_size: side of the square RGB images, at least 16 pixels.

    Returns:
        The path of ``probe.jsonl``.
    """
    _check_image_size(image_size)
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")

    def questions(rng, i, rel_path, objects):
        lines = []
        for present in (True, False):
            pair = _yesno_pair(rng, objects, present=present, prompt=YESNO_PROMPTS[0])
            pair["kind"] = "yesno"
            name = "present" if present else "absent"
            lines.append(_record(f"probe-{i:05d}-{name}", rel_path, pair, objects))
        return lines

    return _write_scenes(out_dir, "probe", num_images, seed, image_size, questions)


def probe_answers_yes(record: PreferenceRecord, chosen_logp: float, rejected_logp: float) -> bool:
    """Whether a model answers a yes/no record with "yes": log p(Yes-answer) > log p(No-answer) (a tie is "no").

    Args:
        record: a ``yesno`` record (``meta["present"]``: ``chosen`` is the Yes-answer exactly when the object
            is present).
        chosen_logp: the model's summed log-prob of ``record.chosen``.
        rejected_logp: the same for ``record.rejected``.

    Raises:
        ValueError: the record has no boolean ``meta["present"]``.
    """
    present = record.meta.get("present")
    if not isinstance(present, bool):
        raise ValueError(f"record {record.id!r} is not a yes/no probe: meta['present'] is {present!r}")
    yes_logp, no_logp = (chosen_logp, rejected_logp) if present else (rejected_logp, chosen_logp)
    return float(yes_logp) > float(no_logp)
