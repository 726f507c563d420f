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
=============  ==========================================  =====================================

``meta["objects"]`` lists every shape drawn (colour, shape, bbox), so later code can build yes/no probes such
as "Is there a {colour} {shape} in the image?" with a known answer; ``meta["target"]`` names what the
question asks about and the true and hallucinated values.

Only ``random.Random`` seeded from ``(seed, split)`` drives generation, so the same seed gives byte-identical
JSONL and PNG files, and the eval split does not change when ``num_train`` does.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

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
COLOUR_PROMPTS = ("What colour is the {shape}?", "Which colour is the {shape} in the image?",
                  "What is the colour of the {shape}?")
COLOUR_ANSWERS = ("The {shape} is {colour}.", "It is {colour}.", "The {shape} in the image is {colour}.")
COUNT_PROMPTS = ("How many {shape}s are there?", "Count the {shape}s in the image.",
                 "How many {shape}s can you see?")


def _count_answer(template: int, shape: str, n: int) -> str:
    word = NUMBER_WORDS[n]
    noun = shape if n == 1 else shape + "s"
    if template == 0:
        return f"There {'is' if n == 1 else 'are'} {word} {noun}."
    if template == 1:
        return f"I count {word} {noun}."
    return f"The image has {word} {noun}."


def _phrase_objects(objects: list[dict[str, Any]]) -> str:
    """'a red square', 'a red square and a blue circle', 'a, b and c'."""
    names = [f"{'an' if o['colour'][0] in 'aeiou' else 'a'} {o['colour']} {o['shape']}" for o in objects]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


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
    template = rng.randrange(len(DESCRIBE_ANSWERS))
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
        target = {"index": index, "answer": objects[index]["colour"], "rejected_answer": colour}
    else:
        hallucination = "added_object"
        absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
        colour, shape = rng.choice(absent)
        fake = [dict(o) for o in objects]
        fake.insert(rng.randrange(len(fake) + 1), {"colour": colour, "shape": shape})
        target = {"added": {"colour": colour, "shape": shape}}
    return {
        "prompt": rng.choice(DESCRIBE_PROMPTS),
        "chosen": DESCRIBE_ANSWERS[template].format(objects=_phrase_objects(objects)),
        "rejected": DESCRIBE_ANSWERS[template].format(objects=_phrase_objects(fake)),
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


def _make_pair(rng: random.Random, objects: list[dict[str, Any]]) -> dict[str, Any]:
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


def _write_split(out_dir: Path, split: str, num_pairs: int, seed: int, image_size: int) -> None:
    rng = random.Random(f"megatron_po-synthetic-{seed}-{split}")
    lines = []
    for i in range(num_pairs):
        image, objects = _draw_scene(rng, image_size)
        rel_path = f"images/{split}_{i:05d}.png"
        image.save(out_dir / rel_path, format="PNG")
        pair = _make_pair(rng, objects)
        record = {
            "id": f"{split}-{i:05d}",
            "image": rel_path,
            "prompt": pair["prompt"],
            "chosen": pair["chosen"],
            "rejected": pair["rejected"],
            "meta": {
                "kind": pair["kind"],
                "hallucination": pair["hallucination"],
                "objects": objects,
                "target": pair["target"],
            },
        }
        lines.append(json.dumps(record, sort_keys=True))
    (out_dir / f"{split}.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def generate_synthetic_dataset(out_dir: Path, num_train: int, num_eval: int, seed: int,
                               image_size: int = 32) -> dict[str, int]:
    """Writes the coloured-shapes preference dataset.

    Args:
        out_dir: created if missing; receives ``images/{train,eval}_NNNNN.png``, ``train.jsonl``, ``eval.jsonl``
            (image paths in the JSONL are relative to ``out_dir``).
        num_train: pairs (and images) in the train split.
        num_eval: pairs (and images) in the eval split.
        seed: the same seed writes byte-identical files.
        image_size: side of the square RGB images, at least 16 pixels.

    Returns:
        ``{"train": num_train, "eval": num_eval, "images": num_train + num_eval}``.
    """
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16 to draw recognisable shapes, got {image_size}")
    if num_train < 0 or num_eval < 0:
        raise ValueError(f"num_train and num_eval must be >= 0, got {num_train} and {num_eval}")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    _write_split(out_dir, "train", num_train, seed, image_size)
    _write_split(out_dir, "eval", num_eval, seed, image_size)
    return {"train": num_train, "eval": num_eval, "images": num_train + num_eval}
