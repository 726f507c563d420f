"""Unit tests of megatron_po.data: embedded dataset, records, tokenizer, collation, sampler."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from megatron_po.data.collate import IGNORE_INDEX, CollateConfig, PairCollator, layout_rows
from megatron_po.data.dataset import PreferenceDataset
from megatron_po.data.fixed_images import FixedSizeImages
from megatron_po.data.records import (PreferenceRecord, RecordError, iter_texts, load_image, read_records,
                                      resolve_image, resolve_images)
from megatron_po.data.sampler import PairBatchSampler
from megatron_po.data.sentences import split_sentences
from megatron_po.data.synthetic import (COLOURS, YESNO_SHARE, generate_probe_set, generate_synthetic_dataset,
                                        probe_answers_yes)
from megatron_po.data.tokenizer import Tokenizer, train_tokenizer

pytestmark = pytest.mark.pure

NUM_IMAGE_TOKENS = 5
IMAGES = FixedSizeImages(32, NUM_IMAGE_TOKENS)  # tiny_vlm's handler: 32x32 pixels, NUM_IMAGE_TOKENS slots


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    generate_synthetic_dataset(out, num_train=120, num_eval=20, seed=3)
    return out


@pytest.fixture(scope="module")
def records(synthetic_dir) -> list[PreferenceRecord]:
    return read_records(synthetic_dir / "train.jsonl")


@pytest.fixture(scope="module")
def tokenizer(records, tmp_path_factory) -> Tokenizer:
    model = train_tokenizer(iter_texts(records), tmp_path_factory.mktemp("tok") / "spm", vocab_size=512)
    return Tokenizer(model)


def _collator(tokenizer, max_length=64, multiple=1) -> PairCollator:
    return PairCollator(tokenizer, CollateConfig(max_length=max_length, num_image_tokens=NUM_IMAGE_TOKENS,
                                                 pad_to_multiple_of=multiple), IMAGES)


def _batch(records, synthetic_dir, n=4):
    return [(r, IMAGES.load([resolve_image(r, synthetic_dir)])) for r in records[:n]]


def _blank():
    """One black image as the handler loads it."""
    return IMAGES.load_pils([Image.new("RGB", (32, 32))])


# ---------------------------------------------------------------- synthetic dataset

def test_synthetic_is_deterministic(tmp_path, synthetic_dir):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    counts = generate_synthetic_dataset(a, 30, 5, seed=3)
    generate_synthetic_dataset(b, 30, 5, seed=3)
    generate_synthetic_dataset(c, 30, 5, seed=4)
    assert counts == {"train": 30, "eval": 5, "images": 35}
    for split in ("train", "eval"):
        assert (a / f"{split}.jsonl").read_bytes() == (b / f"{split}.jsonl").read_bytes()
    pngs = sorted(p.name for p in (a / "images").iterdir())
    assert len(pngs) == 35
    assert all((a / "images" / p).read_bytes() == (b / "images" / p).read_bytes() for p in pngs)
    assert (a / "train.jsonl").read_bytes() != (c / "train.jsonl").read_bytes()
    # the eval split does not depend on how many train pairs came before it
    assert (a / "eval.jsonl").read_bytes() == (synthetic_dir / "eval.jsonl").read_bytes()[: len(
        (a / "eval.jsonl").read_bytes())]


def test_synthetic_rejected_is_a_hallucination(records):
    kinds = {r.meta["kind"] for r in records}
    hallucinations = {r.meta["hallucination"] for r in records}
    assert kinds == {"describe", "colour", "count", "yesno"}
    assert hallucinations == {"wrong_colour", "added_object", "wrong_count", "missed_object"}
    for r in records:
        assert r.chosen != r.rejected
        objects, target = r.meta["objects"], r.meta["target"]
        assert 1 <= len(objects) <= 3
        if r.meta["kind"] == "yesno":
            _check_yesno(r)
        elif r.meta["kind"] == "colour":
            (true_obj,) = [o for o in objects if o["shape"] == target["shape"]]
            assert target["answer"] == true_obj["colour"]
            assert target["rejected_answer"] != true_obj["colour"]
            assert true_obj["colour"] in r.chosen and true_obj["colour"] not in r.rejected
            assert target["rejected_answer"] in r.rejected
        elif r.meta["kind"] == "count":
            true_n = sum(o["shape"] == target["shape"] for o in objects)
            assert target["answer"] == true_n != target["rejected_answer"]
        elif r.meta["hallucination"] == "added_object":
            added = target["added"]
            assert not any(o["colour"] == added["colour"] and o["shape"] == added["shape"] for o in objects)
            assert f"{added['colour']} {added['shape']}" in r.rejected
            assert f"{added['colour']} {added['shape']}" not in r.chosen
        else:
            assert target["rejected_answer"] != objects[target["index"]]["colour"]


def _check_yesno(r: PreferenceRecord) -> None:
    """A yes/no record's answers agree with the objects drawn."""
    query, present = r.meta["query"], r.meta["present"]
    drawn = any(o["colour"] == query["colour"] and o["shape"] == query["shape"] for o in r.meta["objects"])
    assert present is drawn
    name = f"{query['colour']} {query['shape']}"
    assert name in r.prompt and r.prompt.endswith("?")
    yes, no = (r.chosen, r.rejected) if present else (r.rejected, r.chosen)
    assert yes.startswith("Yes, there is") and yes.endswith(f" {name}.")
    assert no == f"No, there is no {name}."
    assert r.meta["hallucination"] == ("missed_object" if present else "added_object")
    assert r.meta["target"] == {"answer": "yes" if present else "no", "rejected_answer": "no" if present else "yes"}


def test_synthetic_yesno_share_and_balance(records):
    yesno = [r for r in records if r.meta["kind"] == "yesno"]
    assert 0.5 * YESNO_SHARE < len(yesno) / len(records) < 2 * YESNO_SHARE
    assert {r.meta["present"] for r in yesno} == {True, False}
    assert all("present" not in r.meta for r in records if r.meta["kind"] != "yesno")


def test_synthetic_descriptions_have_one_sentence_per_object(records):
    """Several objects: one sentence each, and the rejected twin differs in exactly one sentence."""
    multi = [r for r in records if r.meta["kind"] == "describe" and len(r.meta["objects"]) > 1]
    assert {r.meta["hallucination"] for r in multi} == {"wrong_colour", "added_object"}
    for r in multi:
        chosen = [r.chosen[a:b].strip() for a, b in split_sentences(r.chosen)]
        rejected = [r.rejected[a:b].strip() for a, b in split_sentences(r.rejected)]
        assert len(chosen) == len(r.meta["objects"]) > 1
        k = r.meta["target"]["sentence"]
        for o, sentence in zip(r.meta["objects"], chosen):
            assert f"{o['colour']} {o['shape']}" in sentence
        if r.meta["hallucination"] == "wrong_colour":
            assert len(rejected) == len(chosen)
            assert [i for i in range(len(chosen)) if chosen[i] != rejected[i]] == [k]
            assert r.meta["target"]["rejected_answer"] in rejected[k]
        else:
            added = r.meta["target"]["added"]
            assert rejected[:k] + rejected[k + 1:] == chosen
            assert f"{added['colour']} {added['shape']}" in rejected[k]


def test_synthetic_images_show_the_objects(records, synthetic_dir):
    for r in records[:30]:
        image = load_image(resolve_image(r, synthetic_dir), 32)
        for o in r.meta["objects"]:
            x0, y0, x1, y1 = o["bbox"]
            # the centre of every shape (circle, square, triangle alike) is filled with its colour
            cx, cy = (x0 + x1) // 2, (y0 + y1) // 2 + 1
            pixel = (image[:, cy, cx] * 255).round().tolist()
            assert pixel == list(COLOURS[o["colour"]]), (r.id, o)


def _pixels(path: Path) -> str:
    with Image.open(path) as im:
        return hashlib.sha256(im.convert("RGB").tobytes()).hexdigest()


def test_probe_set(tmp_path, synthetic_dir, records):
    path = generate_probe_set(tmp_path / "a", num_images=30, seed=3)
    assert path == tmp_path / "a" / "probe.jsonl"
    assert generate_probe_set(tmp_path / "b", 30, seed=3).read_bytes() == path.read_bytes()
    assert generate_probe_set(tmp_path / "c", 30, seed=4).read_bytes() != path.read_bytes()
    probes = read_records(path)
    assert len(probes) == 60
    # balanced: every image is asked about one drawn and one absent object
    by_image: dict[str, list[bool]] = {}
    for r in probes:
        assert r.meta["kind"] == "yesno"
        _check_yesno(r)
        query = r.meta["query"]
        assert r.prompt.startswith("Is there ") and r.prompt.endswith(f" {query['colour']} {query['shape']} in the image?")
        by_image.setdefault(r.image, []).append(r.meta["present"])
    assert len(by_image) == 30 and all(v == [True, False] for v in by_image.values())
    # held-out images: names that cannot collide, pixels unlike every train/eval image of the same seed
    assert all(Path(image).name.startswith("probe_") for image in by_image)
    seen = {_pixels(p) for p in (synthetic_dir / "images").iterdir()}
    assert not seen & {_pixels(tmp_path / "a" / image) for image in by_image}
    # and it can share the dataset directory
    generate_probe_set(tmp_path / "a", 2, seed=3)
    assert len(list((tmp_path / "a" / "images").iterdir())) == 30


def test_probe_answers_yes():
    present, absent = (PreferenceRecord(f"p{i}", "x.png", "Is there a red square in the image?", a, b,
                                        meta={"kind": "yesno", "present": i == 0})
                       for i, (a, b) in enumerate([("Yes, there is a red square.", "No, there is no red square."),
                                                   ("No, there is no red square.", "Yes, there is a red square.")]))
    assert probe_answers_yes(present, -1.0, -2.0) and not probe_answers_yes(present, -2.0, -1.0)
    assert probe_answers_yes(absent, -2.0, -1.0) and not probe_answers_yes(absent, -1.0, -2.0)
    assert not probe_answers_yes(absent, -1.0, -1.0) and not probe_answers_yes(present, -1.0, -1.0)  # tie: no
    with pytest.raises(ValueError, match="yes/no"):
        probe_answers_yes(PreferenceRecord("c", "x.png", "p", "a", "b", meta={"kind": "colour"}), 0.0, 1.0)


# ---------------------------------------------------------------- records and images

def _write_jsonl(path: Path, objs: list) -> Path:
    path.write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs))
    return path


GOOD = {"id": "a", "image": "x.png", "prompt": "p?", "chosen": "yes.", "rejected": "no."}


@pytest.mark.parametrize("bad_line, field", [
    ('{"id": "b", "image": ', "JSON"),
    ({k: v for k, v in GOOD.items() if k != "chosen"} | {"id": "b"}, "'chosen'"),
    (GOOD | {"id": "b", "prompt": ""}, "'prompt'"),
    (GOOD | {"id": "b", "rejected": 3}, "'rejected'"),
    (GOOD | {"id": "b", "meta": [1]}, "'meta'"),
    (GOOD | {"id": "b", "rejected": "yes."}, "identical"),
    (GOOD, "'id'"),  # a repeated id
])
def test_malformed_line_names_file_line_and_field(tmp_path, bad_line, field):
    path = _write_jsonl(tmp_path / "d.jsonl", [GOOD, "", bad_line])
    with pytest.raises(RecordError) as info:
        read_records(path)
    message = str(info.value)
    assert f"{path}:3" in message and field in message


def test_read_records_roundtrip(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [GOOD | {"meta": {"kind": "colour"}}, GOOD | {"id": "b"}])
    recs = read_records(path)
    assert [r.id for r in recs] == ["a", "b"]
    assert recs[0].meta == {"kind": "colour"} and recs[1].meta == {}
    assert resolve_image(recs[0], tmp_path) == tmp_path / "x.png"
    assert resolve_image(PreferenceRecord("c", "/abs/y.png", "p", "a", "b"), tmp_path) == Path("/abs/y.png")


def test_load_image(tmp_path):
    Image.new("RGB", (64, 48), (255, 0, 0)).save(tmp_path / "red.png")
    image = load_image(tmp_path / "red.png", 32)
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert torch.allclose(image[0], torch.ones(32, 32)) and image[1:].abs().max() < 1e-6
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png", 32)
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(RecordError, match="junk.png"):
        load_image(tmp_path / "junk.png", 32)


# ---------------------------------------------------------------- tokenizer

def test_tokenizer_deterministic_roundtrip_and_specials(records, tokenizer, tmp_path):
    again = train_tokenizer(iter_texts(records), tmp_path / "other_dir" / "tok", vocab_size=512)
    assert again.read_bytes() == tokenizer.model_file.read_bytes()
    assert tokenizer.vocab_size == 512
    specials = [tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.image_id, tokenizer.user_id,
                tokenizer.assistant_id, tokenizer.end_id]
    assert len(set(specials)) == len(specials) and tokenizer.unk_id not in specials
    for r in records[:20]:
        for text in (r.prompt, r.chosen, r.rejected):
            ids = tokenizer.encode(text)
            assert ids and tokenizer.unk_id not in ids
            assert tokenizer.decode(ids) == text
    # text can never produce a control id: a prompt cannot forge image slots
    assert not set(tokenizer.encode("<image> <|user|> <|assistant|> <|end|>")) & set(specials)


# ---------------------------------------------------------------- collation

def test_collator_layout_and_labels(records, tokenizer, synthetic_dir):
    collator = _collator(tokenizer, max_length=64, multiple=8)
    pairs = _batch(records, synthetic_dir, n=4)
    batch = collator(pairs)
    b, s = 4, batch["tokens"].shape[1]
    assert batch["num_pairs"] == b and batch["tokens"].shape == (2 * b, s)
    assert s % 8 == 0 and s <= 64
    assert batch["images"].shape == (b, 3, 32, 32)
    assert batch["row_images"] == [[i] for i in range(b)] * 2  # a pair's two rows show its one image
    assert torch.equal(batch["position_ids"], torch.arange(s).expand(2 * b, s))
    for key in ("labels", "loss_mask", "image_token_mask", "position_ids"):
        assert batch[key].shape == (2 * b, s), key
    assert batch["tokens"].dtype == batch["labels"].dtype == torch.long
    assert batch["loss_mask"].dtype == torch.float32 and batch["image_token_mask"].dtype == torch.bool

    tokens, labels = batch["tokens"], batch["labels"]
    for row in range(2 * b):
        record = pairs[row % b][0]
        response = record.chosen if row < b else record.rejected
        prefix = ([tokenizer.bos_id, tokenizer.user_id] + [tokenizer.image_id] * NUM_IMAGE_TOKENS
                  + tokenizer.encode(record.prompt) + [tokenizer.assistant_id])
        full = prefix + tokenizer.encode(response) + [tokenizer.end_id]
        assert tokens[row, : len(full)].tolist() == full
        assert (tokens[row, len(full):] == tokenizer.pad_id).all()
        # supervised exactly at positions predicting response tokens and <|end|>; the label is the next token
        expected = [IGNORE_INDEX] * s
        for t in range(len(prefix) - 1, len(full) - 1):
            expected[t] = full[t + 1]
        assert labels[row].tolist() == expected
        assert batch["image_token_mask"][row].sum() == NUM_IMAGE_TOKENS
        assert not (batch["loss_mask"][row].bool() & batch["image_token_mask"][row]).any()
        assert tokenizer.decode(labels[row][labels[row] != IGNORE_INDEX].tolist()) == response

    # chosen and rejected rows of a pair share the prompt prefix (and their image)
    for i in range(b):
        n_prefix = len(tokenizer.encode(pairs[i][0].prompt)) + NUM_IMAGE_TOKENS + 3
        assert torch.equal(tokens[i, :n_prefix], tokens[b + i, :n_prefix])
    assert torch.equal(batch["loss_mask"], (labels != IGNORE_INDEX).float())
    assert torch.equal(batch["chosen_lengths"], batch["loss_mask"][:b].sum(1).long())
    assert torch.equal(batch["rejected_lengths"], batch["loss_mask"][b:].sum(1).long())


def _segments_of_row(batch, i: int) -> list[int]:
    seg = batch["chosen_segment_ids"][i]
    return seg[seg >= 0].tolist()


def test_collator_segments_cover_the_chosen_response(records, tokenizer, synthetic_dir):
    """Every supervised chosen token (``<|end|>`` included) lies in exactly one sentence, in order."""
    collator = _collator(tokenizer, max_length=96, multiple=8)
    pairs = [(r, _blank()) for r in records]
    batch = collator(pairs)
    b = len(records)
    seg, labels = batch["chosen_segment_ids"], batch["labels"][:b]
    assert seg.shape == labels.shape and seg.dtype == torch.long
    assert batch["num_segments"].shape == (b,) and batch["num_segments"].dtype == torch.long
    # -1 exactly where nothing is predicted; the counts of all sentences add up to the chosen length
    assert torch.equal(seg < 0, labels == IGNORE_INDEX) and (seg >= -1).all()
    counts = torch.stack([torch.bincount(seg[i][seg[i] >= 0], minlength=int(batch["num_segments"].max()))
                          for i in range(b)])
    assert torch.equal(counts.sum(1), batch["chosen_lengths"])
    assert (counts[torch.arange(counts.shape[1]) < batch["num_segments"][:, None]] > 0).all()
    assert torch.equal(batch["num_segments"], (seg.max(1).values + 1))
    assert batch["segment_similarity"].shape == (b, int(batch["num_segments"].max()))
    assert batch["segment_similarity"].isnan().all()  # the synthetic records carry no similarity
    k_of = {}
    for i, (record, _) in enumerate(pairs):
        row = _segments_of_row(batch, i)
        assert row == sorted(row) and row[0] == 0
        # the tokens are those of a plain encode; grouping them by segment gives back the sentences
        targets = labels[i][labels[i] != IGNORE_INDEX].tolist()
        assert targets == tokenizer.encode(record.chosen) + [tokenizer.end_id]
        sentences = [record.chosen[a:c].strip() for a, c in split_sentences(record.chosen)]
        assert batch["num_segments"][i] == len(sentences)
        for k, sentence in enumerate(sentences):
            assert tokenizer.decode([t for t, s in zip(targets, row) if s == k]).strip() == sentence
        assert row[-1] == len(sentences) - 1  # <|end|> closes the last sentence
        k_of.setdefault(record.meta["kind"], set()).add(len(sentences))
    # the multi-object descriptions give ASPO more than one sentence to weigh
    assert k_of["describe"] >= {1, 2, 3} and k_of["yesno"] == {1}


def test_collator_segment_similarity_and_given_spans(records, tokenizer):
    base = records[0]
    text = "There is a red square. There is a blue circle. There is a green triangle."
    with_sim = PreferenceRecord("s", base.image, base.prompt, text, base.rejected,
                                chosen_sentence_similarity=[0.1, 0.2, 0.3])
    no_sim = PreferenceRecord("n", base.image, base.prompt, "It is red.", base.rejected)
    # caller-given spans replace the splitter: two sentences where the splitter finds three
    given = PreferenceRecord("g", base.image, base.prompt, text, base.rejected,
                             chosen_sentence_spans=[(0, 47), (47, len(text))], chosen_sentence_similarity=[0.5, 0.6])
    # a sentence strictly inside the first token gets no token: it is dropped with its similarity
    ids, offsets = tokenizer.encode_with_offsets(text)
    start, end = offsets[0]
    assert end - start >= 3 and not text[start].isspace()
    inner = PreferenceRecord("i", base.image, base.prompt, text, base.rejected,
                             chosen_sentence_spans=[(0, start + 1), (start + 1, start + 2), (start + 2, len(text))],
                             chosen_sentence_similarity=[0.7, 0.8, 0.9])
    batch = _collator(tokenizer, max_length=96)([(r, _blank()) for r in (with_sim, no_sim, given, inner)])
    assert batch["num_segments"].tolist() == [3, 1, 2, 2]
    sim = batch["segment_similarity"]
    assert sim.shape == (4, 3) and sim.dtype == torch.float32
    expected = [[0.1, 0.2, 0.3], [math.nan] * 3, [0.5, 0.6, math.nan], [0.7, 0.9, math.nan]]
    assert torch.allclose(sim, torch.tensor(expected), equal_nan=True)
    assert torch.equal(batch["chosen_lengths"], (batch["chosen_segment_ids"] >= 0).sum(1))
    # the given split puts the first two sentences (and their tokens) together
    row = _segments_of_row(batch, 2)
    n_first = len(tokenizer.encode(text[:46]))  # the space at 46 rides on the next sentence's "▁There"
    assert row == [0] * n_first + [1] * (len(row) - n_first)
    # the chosen tokens are the same whichever split is used
    assert torch.equal(batch["tokens"][0], batch["tokens"][2]) and torch.equal(batch["tokens"][0], batch["tokens"][3])


def test_fixed_images_collate_as_the_plain_tensors_did(records, tokenizer, synthetic_dir):
    """tiny_vlm's handler gives the batch tiny_vlm had before it had a handler: every pair's images resized and
    concatenated in order ([k, 3, S, S] for a pair of k images), the config's slots per image, plain positions."""
    first = records[0]
    two = PreferenceRecord("two", [first.image, records[1].image], first.prompt, first.chosen, first.rejected)
    chosen = [records[2], two, records[3]]
    collator = _collator(tokenizer, max_length=96, multiple=8)
    batch = collator([(r, IMAGES.load(resolve_images(r, synthetic_dir))) for r in chosen])

    # the layout without a handler: load_image tensors, CollateConfig.num_image_tokens slots, layout_rows' positions
    pixels = [torch.stack([load_image(f, 32) for f in resolve_images(r, synthetic_dir)]) for r in chosen]
    assert torch.equal(batch["images"], torch.cat(pixels).float()) and batch["images"].shape == (4, 3, 32, 32)
    encoded = [collator._encode(r) for r in chosen]
    end = tokenizer.response_end_ids
    old = layout_rows(tokenizer, [(p, c + end) for p, c, _ in encoded] + [(p, r + end) for p, _, r in encoded], 8)
    for key in ("tokens", "labels", "position_ids", "image_token_mask"):
        assert torch.equal(batch[key], old[key]), key
    s = batch["tokens"].shape[1]
    assert torch.equal(batch["position_ids"], torch.arange(s).expand(6, s)) and batch["position_ids"].is_contiguous()
    assert batch["row_images"] == [[0], [1, 2], [3]] * 2


def test_collator_pads_to_longest_not_max_length(records, tokenizer, synthetic_dir):
    pairs = _batch(records, synthetic_dir, n=2)
    batch = _collator(tokenizer, max_length=200)(pairs)
    longest = int((batch["tokens"] != tokenizer.pad_id).sum(1).max())
    assert batch["tokens"].shape[1] == longest


def test_too_long_pair_is_dropped_and_counted_never_truncated(records, tokenizer, synthetic_dir, caplog):
    long = PreferenceRecord("long", records[0].image, records[0].prompt, "There is a red square. " * 20,
                            records[0].rejected)
    empty = PreferenceRecord("empty", records[0].image, records[0].prompt, " ", records[0].rejected)
    identical = PreferenceRecord("same", records[0].image, records[0].prompt, "It is red.", "It is red.")
    collator = _collator(tokenizer, max_length=48)
    assert collator.fits(long) == (False, "too_long")
    assert collator.fits(records[0]) == (True, "")
    with pytest.raises(ValueError, match="too_long"):
        collator([(long, _blank())])

    with caplog.at_level(logging.INFO, logger="megatron_po.data.dataset"):
        dataset = PreferenceDataset(records[:10] + [long, empty, identical], synthetic_dir, tokenizer,
                                    collator.cfg, images=IMAGES)
    assert len(dataset) == 10
    assert dataset.skipped == {"too_long": 1, "empty_response": 1, "identical_pair": 1}
    assert "kept 10 of 13" in caplog.text
    record, image = dataset[3]
    assert record is records[3] and image["pixel_values"].shape == (1, 3, 32, 32)
    assert image["num_tokens"].tolist() == [NUM_IMAGE_TOKENS]
    batch = dataset.collator([dataset[i] for i in range(len(dataset))])
    assert batch["tokens"].shape[1] <= 48


def test_dataset_missing_image_names_path(records, tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / records[0].image)):
        PreferenceDataset(records[:2], tmp_path, tokenizer, CollateConfig(64, NUM_IMAGE_TOKENS), images=IMAGES)


# ---------------------------------------------------------------- sampler

LAYOUTS = [(1, 4), (2, 2), (2, 1), (1, 2)]  # (dp_size, micro_batch_size)


def _global_batches(layout, steps, num_samples=23, gbs=4, seed=7):
    """Per step, the indices all ranks see, in rank-then-micro-batch order, and the micro-batch sizes."""
    dp, mbs = layout
    iters = [PairBatchSampler(num_samples, gbs, mbs, r, dp, seed).global_batches() for r in range(dp)]
    out = []
    for _ in range(steps):
        per_rank = [next(it) for it in iters]
        assert all(len(mb) == mbs for micro in per_rank for mb in micro)
        assert all(len(micro) == gbs // (dp * mbs) for micro in per_rank)
        out.append([i for micro in per_rank for mb in micro for i in mb])
    return out


def test_sampler_global_batch_is_layout_invariant():
    reference = _global_batches(LAYOUTS[0], steps=12)
    for layout in LAYOUTS[1:]:
        assert _global_batches(layout, steps=12) == reference, layout
    # and the batches are a real shuffle, not range(num_samples)
    assert reference[0] != [0, 1, 2, 3]


def test_sampler_epochs():
    steps_per_epoch = 23 // 4
    batches = _global_batches((1, 4), steps=3 * steps_per_epoch)
    epochs = [sum(batches[e * steps_per_epoch : (e + 1) * steps_per_epoch], []) for e in range(3)]
    for e, seen in enumerate(epochs):
        assert len(set(seen)) == len(seen) == steps_per_epoch * 4, e  # no repeat inside an epoch
        expected = torch.randperm(23, generator=torch.Generator().manual_seed(7 + e))[:20].tolist()
        assert seen == expected
    assert epochs[0] != epochs[1]

    padded = PairBatchSampler(23, 4, 2, 0, 1, seed=7, drop_last=False)
    assert padded.steps_per_epoch == 6
    epoch0 = sum((padded.global_batch(s) for s in range(6)), [])
    assert sorted(set(epoch0)) == list(range(23)) and epoch0[23:] == epoch0[:1]


def test_sampler_resume_continues_the_sequence():
    full = PairBatchSampler(23, 4, 2, 1, 2, seed=7)
    it = full.global_batches()
    expected = [next(it) for _ in range(10)]

    first = PairBatchSampler(23, 4, 2, 1, 2, seed=7)
    it = first.global_batches()
    got = [next(it) for _ in range(4)]
    state = first.state_dict()
    assert state["consumed_samples"] == 16
    resumed = PairBatchSampler(23, 4, 2, 1, 2, seed=7)
    resumed.load_state_dict(state)
    it = resumed.global_batches()
    got += [next(it) for _ in range(6)]
    assert got == expected

    # a different layout resumes the same global batches
    other = PairBatchSampler(23, 4, 1, 0, 1, seed=7)
    other.load_state_dict(state)
    assert sum(next(other.global_batches()), []) == full.global_batch(4)

    with pytest.raises(ValueError, match="seed"):
        PairBatchSampler(23, 4, 2, 1, 2, seed=8).load_state_dict(state)


def test_sampler_global_batch_depends_on_the_step_alone():
    """The trainer asks `global_batch(step)` of a sampler that may have been resumed anywhere: a step's pairs, and
    its epoch's permutation, never depend on the sampler's position (consumed_samples)."""
    fresh = PairBatchSampler(10, 4, 2, 0, 1, seed=3)  # 2 global batches per epoch
    resumed = PairBatchSampler(10, 4, 2, 0, 1, seed=3)
    resumed.load_state_dict(fresh.state_dict() | {"consumed_samples": 12})  # inside epoch 2
    steps = range(6)
    assert [resumed.global_batch(s) for s in steps] == [fresh.global_batch(s) for s in steps]
    assert fresh.global_batch(2) + fresh.global_batch(3) != fresh.global_batch(0) + fresh.global_batch(1)  # epoch 2's own


@pytest.mark.parametrize("change, named", [
    (dict(seed=8), r"train\.seed is 7 in the checkpoint but 8 in this run"),
    (dict(num_samples=24), r"\(data\.num_train, .*\) is 23 in the checkpoint but 24 in this run"),
    (dict(global_batch_size=8), r"train\.global_batch_size is 4 in the checkpoint but 8 in this run"),
    (dict(seed=8, num_samples=24, global_batch_size=8), r"train\.seed .*; the number .*; train\.global_batch_size"),
], ids=["seed", "num_samples", "global_batch_size", "all_three"])
def test_sampler_refuses_a_resume_that_changes_the_data_order(change, named):
    """A relaunch with another train.seed, dataset size or global batch size would train on other pairs than the
    saved run's next steps: refused, naming what changed and both values (the trainer resumes through this)."""
    saved = PairBatchSampler(23, 4, 2, 0, 2, seed=7)
    saved.consumed_samples = 8
    state = saved.state_dict()
    same = dict(num_samples=23, global_batch_size=4, micro_batch_size=2, dp_rank=0, dp_size=2, seed=7)
    with pytest.raises(ValueError, match=rf"^cannot resume: the data order would change: .*{named}"):
        PairBatchSampler(**(same | change)).load_state_dict(state)
    # the layout may change (DP size, micro-batch size): the global batches stay the same
    other_layout = PairBatchSampler(**(same | dict(micro_batch_size=1, dp_size=4, dp_rank=3)))
    other_layout.load_state_dict(state)
    assert other_layout.consumed_samples == 8
    with pytest.raises(ValueError, match=r"consumed_samples \(6\) must be a non-negative multiple"):
        PairBatchSampler(**same).load_state_dict(state | {"consumed_samples": 6})


@pytest.mark.parametrize("kwargs, message", [
    (dict(global_batch_size=6, micro_batch_size=2, dp_size=2), "global_batch_size"),
    (dict(global_batch_size=4, micro_batch_size=3, dp_size=1), "micro_batch_size"),
    (dict(global_batch_size=4, micro_batch_size=1, dp_size=2, dp_rank=2), "dp_rank"),
    (dict(global_batch_size=64, micro_batch_size=1, dp_size=1), "num_samples"),
])
def test_sampler_validates(kwargs, message):
    args = dict(num_samples=23, dp_rank=0, seed=0) | kwargs
    with pytest.raises(ValueError, match=message):
        PairBatchSampler(**args)


def test_dataloader_end_to_end(records, tokenizer, synthetic_dir):
    """The pieces as the trainer wires them: dataset + sampler as batch_sampler + collator."""
    dataset = PreferenceDataset(records, synthetic_dir, tokenizer, CollateConfig(96, NUM_IMAGE_TOKENS, 4),
                                images=IMAGES)
    sampler = PairBatchSampler(len(dataset), global_batch_size=8, micro_batch_size=2, dp_rank=1, dp_size=2,
                               seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=dataset.collator)
    batches = list(itertools.islice(iter(loader), 4))  # two global steps of two micro-batches each
    # rank 1 of 2 holds the second half of each global batch
    sampler_indices = PairBatchSampler(len(dataset), 8, 2, 1, 2, seed=0)
    expected = sampler_indices.global_batch(0)[4:8] + sampler_indices.global_batch(1)[4:8]
    images = torch.cat([b["images"] for b in batches])
    assert torch.equal(images, torch.cat([dataset[i][1]["pixel_values"] for i in expected]))
    assert sampler.consumed_samples == 16
    assert all(b["tokens"].shape[0] == 4 and b["tokens"].shape[1] % 4 == 0 for b in batches)
