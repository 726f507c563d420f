"""Unit tests of megatron_po.data.sentences and the sentence fields of preference records (ASPO)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from megatron_po.data.records import PreferenceRecord, RecordError, read_records
from megatron_po.data.sentences import split_sentences, token_segments
from megatron_po.data.tokenizer import Tokenizer, train_tokenizer

pytestmark = pytest.mark.pure


def _assert_covering(text: str, spans: list[tuple[int, int]]) -> None:
    assert spans[0][0] == 0 and spans[-1][1] == len(text)
    assert all(a < b for a, b in spans)
    assert all(spans[k][1] == spans[k + 1][0] for k in range(len(spans) - 1))


# ---------------------------------------------------------------- splitter

@pytest.mark.parametrize("text, expected", [
    ("There is a red square. There is a blue circle.", ["There is a red square. ", "There is a blue circle."]),
    # decimals and abbreviations do not end a sentence
    ("The bar is 3.5 cm long. It is red.", ["The bar is 3.5 cm long. ", "It is red."]),
    ("Shapes, e.g. a square, i.e. four sides. Dr. Who etc. came along! Really?! yes",
     ["Shapes, e.g. a square, i.e. four sides. ", "Dr. Who etc. came along! ", "Really?! ", "yes"]),
    ("Mr. Smith met Mrs. Jones (approx. twice).", ["Mr. Smith met Mrs. Jones (approx. twice)."]),
    # line breaks split; blank lines and indentation go with the sentence before them
    ("Line one\nLine two\n\n  Line three  ", ["Line one\n", "Line two\n\n  ", "Line three  "]),
    ("\n\nHello\n", ["\n\nHello\n"]),
    # leading whitespace belongs to the first sentence, a list marker is not a sentence
    ("  First. Second", ["  First. ", "Second"]),
    ("1. A cat.\n2. A dog.", ["1. A cat.\n", "2. A dog."]),
    # "No." is a whole answer, a quote or bracket may close a sentence, an ellipsis ends one
    ("No. There is no red square.", ["No. ", "There is no red square."]),
    ('He said "stop." Then he left.', ['He said "stop." ', "Then he left."]),
    ("Wait...  what", ["Wait...  ", "what"]),
    # a "." inside a token is not an end; full-width terminators split without a following space
    ("See file.txt now. ok", ["See file.txt now. ", "ok"]),
    ("你好。世界！好吗？", ["你好。", "世界！", "好吗？"]),
    ("One sentence without end", ["One sentence without end"]),
    ("   ", ["   "]),
])
def test_split_sentences(text, expected):
    spans = split_sentences(text)
    assert [text[a:b] for a, b in spans] == expected
    _assert_covering(text, spans)


def test_split_sentences_empty_and_deterministic():
    assert split_sentences("") == []
    text = "A red square. A blue circle!\nAnd 2.5 triangles, e.g. small ones?  Yes."
    first = split_sentences(text)
    assert all(split_sentences(text) == first for _ in range(5))
    assert split_sentences(str(text)) == first


@pytest.mark.parametrize("seed", range(20))
def test_split_sentences_covers_random_text(seed):
    """Every character belongs to exactly one sentence, whatever the text."""
    rng = random.Random(seed)
    alphabet = "ab .!?\n。3e.g"
    text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60)))
    spans = split_sentences(text)
    _assert_covering(text, spans)
    # no sentence but the first is whitespace-only (whitespace joins the sentence before it)
    assert all(text[a:b].strip() for a, b in spans[1:])


# ---------------------------------------------------------------- tokens -> sentences

def test_token_segments_rules():
    text = "It is red. It is blue."
    spans = [(0, 11), (11, 22)]
    # sentencepiece-style offsets: "▁It" of the second sentence starts on the space at 10
    offsets = [(0, 0), (0, 2), (2, 5), (5, 9), (9, 10), (10, 13), (13, 16), (16, 21), (21, 22), (22, 22)]
    segments, kept = token_segments(text, offsets, spans)
    assert segments == [0, 0, 0, 0, 0, 1, 1, 1, 1, 1] and kept == [0, 1]
    # a whitespace-only token goes with the sentence holding its first character (the one the space ends)
    segments, _ = token_segments(text, [(0, 9), (9, 10), (10, 11), (11, 22)], spans)
    assert segments == [0, 0, 0, 1]
    # a sentence inside one token receives nothing: dropped, the others renumbered, kept says which stayed
    segments, kept = token_segments(text, [(0, 9), (9, 10), (10, 22)], [(0, 4), (4, 6), (6, 11), (11, 22)])
    assert segments == [0, 1, 2] and kept == [0, 2, 3]
    with pytest.raises(ValueError):
        token_segments(text, offsets, [])


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    corpus = ["There is a red square. There is a blue circle.", "Is there 3.5 of them?\nYes, e.g. this one.",
              "Le café est très bon. 日本語もある。"] * 10
    return Tokenizer(train_tokenizer(corpus, tmp_path_factory.mktemp("tok") / "spm", vocab_size=128))


@pytest.mark.parametrize("text", ["There is a red square. There is a blue circle.", "  Is there 3.5?\nYes.",
                                  "Le café est très bon. 日本語もある。", "Yes."])
def test_encode_with_offsets_matches_encode(tokenizer, text):
    ids, offsets = tokenizer.encode_with_offsets(text)
    assert ids == tokenizer.encode(text)
    assert len(offsets) == len(ids)
    # character offsets (not UTF-8 bytes) that tile the text: identity normalisation keeps every character
    assert "".join(text[a:b] for a, b in offsets) == text
    segments, kept = token_segments(text, offsets, split_sentences(text))
    assert len(segments) == len(ids) and segments == sorted(segments)
    assert kept == list(range(len(split_sentences(text))))
    # each segment's tokens decode to its sentence (up to the whitespace sentencepiece moves between them)
    for k, (a, b) in enumerate(split_sentences(text)):
        piece_ids = [i for i, s in zip(ids, segments) if s == k]
        assert tokenizer.decode(piece_ids).strip() == text[a:b].strip()


# ---------------------------------------------------------------- record fields

GOOD = {"id": "a", "image": "x.png", "prompt": "p?", "chosen": "It is red. It is round.", "rejected": "It is blue."}


def _write(path: Path, objs: list) -> Path:
    path.write_text("".join(json.dumps(o) + "\n" for o in objs))
    return path


def test_record_sentence_fields_roundtrip(tmp_path):
    path = _write(tmp_path / "d.jsonl", [
        GOOD,
        GOOD | {"id": "b", "chosen_sentence_similarity": [0.25, 1]},
        GOOD | {"id": "c", "chosen_sentence_spans": [[0, 23]], "chosen_sentence_similarity": [-0.5]},
        GOOD | {"id": "d", "chosen_sentence_spans": None, "chosen_sentence_similarity": None},
    ])
    a, b, c, d = read_records(path)
    assert a.chosen_sentence_spans is None and a.chosen_sentence_similarity is None
    assert a.sentence_spans() == [(0, 11), (11, 23)] == b.sentence_spans() == d.sentence_spans()
    assert b.chosen_sentence_similarity == [0.25, 1.0] and isinstance(b.chosen_sentence_similarity[1], float)
    # given spans replace the splitter
    assert c.chosen_sentence_spans == [(0, 23)] and c.sentence_spans() == [(0, 23)]


@pytest.mark.parametrize("extra, field, words", [
    ({"chosen_sentence_spans": [[0, 10], [11, 23]]}, "chosen_sentence_spans", "previous one ends"),
    ({"chosen_sentence_spans": [[0, 11], [11, 22]]}, "chosen_sentence_spans", "23 characters"),
    ({"chosen_sentence_spans": [[0, 30]]}, "chosen_sentence_spans", "past the response"),
    ({"chosen_sentence_spans": [[0, 11], [11, 11], [11, 23]]}, "chosen_sentence_spans", "empty"),
    ({"chosen_sentence_spans": [[0, 1.5], [1.5, 23]]}, "chosen_sentence_spans", "integers"),
    ({"chosen_sentence_spans": []}, "chosen_sentence_spans", "non-empty"),
    ({"chosen_sentence_spans": "0-23"}, "chosen_sentence_spans", "list"),
    ({"chosen_sentence_similarity": [0.1]}, "chosen_sentence_similarity", "2 sentences"),
    ({"chosen_sentence_spans": [[0, 23]], "chosen_sentence_similarity": [0.1, 0.2]}, "chosen_sentence_similarity",
     "1 sentences"),
    ({"chosen_sentence_similarity": [0.1, "high"]}, "chosen_sentence_similarity", "finite number"),
    ({"chosen_sentence_similarity": [0.1, True]}, "chosen_sentence_similarity", "finite number"),
    ({"chosen_sentence_similarity": 0.1}, "chosen_sentence_similarity", "list"),
])
def test_bad_sentence_fields_name_file_line_and_field(tmp_path, extra, field, words):
    path = _write(tmp_path / "d.jsonl", [GOOD, GOOD | {"id": "b"} | extra])
    with pytest.raises(RecordError) as info:
        read_records(path)
    message = str(info.value)
    assert f"{path}:2" in message and f"'{field}'" in message and words in message, message


def test_nan_similarity_is_rejected(tmp_path):
    # Python's json reads NaN; a missing score must be a missing field, not a NaN that poisons min-max
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(GOOD | {"chosen_sentence_similarity": [0.1, math.nan]}) + "\n")
    with pytest.raises(RecordError, match="finite"):
        read_records(path)


def test_records_built_in_code_are_checked():
    with pytest.raises(RecordError, match="chosen_sentence_similarity"):
        PreferenceRecord("r", "x.png", "p", "It is red. It is round.", "no", chosen_sentence_similarity=[0.3])
    record = PreferenceRecord("r", "x.png", "p", "It is red. It is round.", "no", chosen_sentence_spans=[(0, 23)],
                              chosen_sentence_similarity=[0.3])
    assert record.sentence_spans() == [(0, 23)]
