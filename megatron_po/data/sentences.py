"""Sentences of a response and the tokens each one owns (ASPO's sentence-level rewards, OBJECTIVES §10).

Two steps, kept apart so the tokenisation never depends on the split:

1. :func:`split_sentences` cuts the text into character spans. It is rule-based and deterministic (no model,
   no locale): a sentence ends after a run of ``. ! ?`` (optionally followed by closing quotes/brackets) when
   whitespace or the end of the text follows, after a full-width ``。！？`` whatever follows (CJK text puts no
   space after them), and at every line break. The spans *cover* the text: the first starts at 0, each starts
   where the previous ends, the last ends at ``len(text)``; whitespace after a sentence (spaces, blank lines)
   belongs to it, whitespace before the first sentence belongs to the first one.
2. :func:`token_segments` maps the tokens of the *whole* text (ids and character offsets from one
   ``encode`` call, see :meth:`megatron_po.data.tokenizer.Tokenizer.encode_with_offsets`) onto those spans.
   The token ids are therefore exactly those of ``encode(text)``; sentences are never tokenised one by one.

Protected from splitting: decimals ("3.5" — the "." is not followed by whitespace), a short list of
abbreviations (:data:`ABBREVIATIONS`, case-insensitive: "e.g.", "Dr.", "etc." ...) and list markers at the start
of a sentence ("1. The cat ..."). "No." is deliberately not an abbreviation: it is a whole answer in yes/no data.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

HALF_WIDTH_TERMINATORS = ".!?"
FULL_WIDTH_TERMINATORS = "。！？"
CLOSERS = "\"')]}”’」』）"
"""May follow a terminator and still end the sentence: 'He said "stop." Then ...'."""
OPENERS = "\"'([{“‘「『（"
ABBREVIATIONS: frozenset[str] = frozenset({
    "e.g.", "i.e.", "etc.", "vs.", "cf.", "approx.", "fig.",
    "mr.", "mrs.", "ms.", "dr.", "prof.", "st.", "jr.", "sr.",
})
"""Words (lower-case, final "." included) after which a "." does not end a sentence."""


def _word_before(text: str, stop: int) -> tuple[int, str]:
    """Start and text of the whitespace-delimited word ending at ``stop`` (leading openers stripped)."""
    start = stop
    while start > 0 and not text[start - 1].isspace():
        start -= 1
    while start < stop and text[start] in OPENERS:
        start += 1
    return start, text[start:stop]


def _protected_period(text: str, sentence_start: int, dot: int) -> bool:
    """Whether a single "." at ``dot`` that is followed by whitespace still does not end the sentence."""
    if dot > 0 and dot + 1 < len(text) and text[dot - 1].isdigit() and text[dot + 1].isdigit():
        return True  # a decimal; unreachable while a split needs whitespace after the ".", kept as a guard
    word_start, word = _word_before(text, dot + 1)
    if word.lower() in ABBREVIATIONS:
        return True
    # "1. " / "12. " opening a sentence is a list marker, not a one-word sentence
    return word[:-1].isdigit() and len(word) <= 4 and not text[sentence_start:word_start].strip()


def split_sentences(text: str) -> list[tuple[int, int]]:
    """Splits text into sentences that cover it.

    Args:
        text: any string.

    Returns:
        ``[(start, end), ...]`` character spans, sorted and contiguous: ``spans[0][0] == 0``,
        ``spans[i][1] == spans[i + 1][0]``, ``spans[-1][1] == len(text)``; every span is non-empty and all but
        whitespace-only text have non-whitespace in every span. ``[]`` for ``""``; one span for whitespace-only
        text.
    """
    n = len(text)
    if n == 0:
        return []
    spans: list[tuple[int, int]] = []
    start = 0
    has_content = False  # non-whitespace seen since `start`: a line break before any content does not split
    i = 0
    while i < n:
        ch = text[i]
        end = -1
        if ch == "\n":
            if has_content:
                end = i + 1
        elif ch in FULL_WIDTH_TERMINATORS or ch in HALF_WIDTH_TERMINATORS:
            j = i
            while j < n and (text[j] in HALF_WIDTH_TERMINATORS or text[j] in FULL_WIDTH_TERMINATORS):
                j += 1
            while j < n and text[j] in CLOSERS:
                j += 1
            full_width = any(c in FULL_WIDTH_TERMINATORS for c in text[i:j])
            followed_by_break = j == n or text[j].isspace()
            protected = text[i:j].rstrip(CLOSERS) == "." and _protected_period(text, start, i)
            has_content = True
            if (full_width or followed_by_break) and not protected:
                end = j
            else:
                i = j
                continue
        elif not ch.isspace():
            has_content = True
        if end < 0:
            i += 1
            continue
        while end < n and text[end].isspace():
            end += 1
        if end >= n:
            break  # trailing whitespace belongs to the last sentence
        spans.append((start, end))
        start, i, has_content = end, end, False
    spans.append((start, n))
    return spans


def check_sentence_spans(spans: object, text_len: int) -> str:
    """Why ``spans`` are not a valid sentence split of a text of ``text_len`` characters ("" if they are).

    Valid: a non-empty list of ``[start, end]`` integer pairs, sorted, non-empty, contiguous and covering
    ``[0, text_len)``.
    """
    if not isinstance(spans, (list, tuple)) or not spans:
        return "must be a non-empty list of [start, end] pairs"
    prev_end = 0
    for k, span in enumerate(spans):
        if (not isinstance(span, (list, tuple)) or len(span) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in span)):
            return f"entry {k} must be a [start, end] pair of integers, got {span!r}"
        start, end = span
        if start != prev_end:
            return (f"entry {k} {list(span)} must start where the previous one ends ({prev_end}): spans are "
                    f"sorted, non-overlapping and cover the response")
        if end <= start:
            return f"entry {k} {list(span)} is empty or reversed"
        if end > text_len:
            return f"entry {k} {list(span)} ends past the response ({text_len} characters)"
        prev_end = end
    if prev_end != text_len:
        return f"spans end at {prev_end} but the response has {text_len} characters"
    return ""


def check_sentence_similarity(similarity: object, num_sentences: int) -> str:
    """Why ``similarity`` is not one finite number per sentence ("" if it is)."""
    if not isinstance(similarity, (list, tuple)):
        return "must be a list of numbers"
    for k, s in enumerate(similarity):
        if not isinstance(s, (int, float)) or isinstance(s, bool) or not math.isfinite(s):
            return f"entry {k} must be a finite number, got {s!r}"
    if len(similarity) != num_sentences:
        return f"has {len(similarity)} values but the response has {num_sentences} sentences"
    return ""


def token_segments(text: str, offsets: Sequence[tuple[int, int]],
                   spans: Sequence[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Assigns every token of ``text`` to a sentence.

    A token belongs to the sentence that contains its first non-whitespace character. A token of whitespace
    only (" ", "\\n") belongs to the sentence containing its first character, which the splitter gives to the
    sentence the whitespace follows; sentencepiece's "▁There" (offset on the space before "There") thus opens
    the next sentence instead of closing the previous one. A zero-width token (sentencepiece's dummy prefix
    before leading whitespace, byte-fallback continuations) joins the sentence of the token before it, or the
    first sentence: this keeps segment ids non-decreasing along the response.

    Sentences that receive no token (possible with caller-given spans that cut inside a token) are dropped and
    the remaining ones renumbered ``0..K-1``; their characters are then scored with a neighbouring sentence,
    and any per-sentence data (e.g. similarity) of a dropped sentence must be dropped too: ``kept`` says which
    to keep. Every token gets a segment, so ``Σ_k count(k) == len(offsets)``.

    Args:
        text: the response.
        offsets: ``(start, end)`` character offsets of its tokens, in order, from one ``encode`` of ``text``.
        spans: covering sentence spans (:func:`split_sentences` or a record's ``chosen_sentence_spans``).

    Returns:
        ``(segment_ids, kept)``: ``segment_ids[t]`` in ``[0, len(kept))`` for token ``t`` (non-decreasing
        whenever the offsets are in text order, as sentencepiece's are); ``kept[k]`` is the index in ``spans``
        of segment ``k``.
    """
    if not spans:
        raise ValueError("token_segments needs at least one sentence span")
    starts = [s for s, _ in spans]
    raw: list[int] = []
    for begin, end in offsets:
        if end <= begin:
            raw.append(raw[-1] if raw else 0)
            continue
        anchor = begin
        while anchor < end and text[anchor].isspace():
            anchor += 1
        if anchor == end:
            anchor = begin
        raw.append(max(0, bisect.bisect_right(starts, anchor) - 1))
    kept = sorted(set(raw))
    renumber = {old: new for new, old in enumerate(kept)}
    return [renumber[s] for s in raw], kept
