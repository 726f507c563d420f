"""Turning preference pairs into model tensors, and the dataset that feeds them.

One pair becomes two rows that share its image (or images, each with its slots, before the prompt or where
the record's ``image_offsets`` put them)::

    [bos] <|user|> <image> x num_image_tokens  prompt_ids  <|assistant|>  response_ids  <|end|>  [pad ...]

Only ``response_ids`` and ``<|end|>`` are supervised. Labels follow Megatron: ``labels[t]`` is the target
for position ``t`` (``tokens[t + 1]``) and -100 where nothing is predicted, so the prediction made at
``<|assistant|>`` is the first response token's. A batch of B pairs is laid out as
**[chosen rows 0..B-1 ; rejected rows B..2B-1]**, so ``logps[:B]`` / ``logps[B:]`` split it.

Pairs are never truncated: a cut could drop image slots or the part of a response where chosen and rejected
differ. :class:`PreferenceDataset` drops pairs that do not fit when it is built and counts why.

For sentence-level objectives (ASPO) the chosen rows also carry their sentences: ``chosen_segment_ids[i, t]``
is the sentence of the token that label position ``t`` predicts (see :mod:`megatron_po.data.sentences` for how
tokens map to sentences; ``<|end|>`` belongs to the last one), so a per-sentence sum of log-probs is
``scatter_add`` over ``chosen_segment_ids`` of the per-token log-probs of rows ``0..B-1``.

:class:`PreferenceDataset` lives here rather than in ``records.py`` because deciding whether a pair fits
needs the tokenizer and the sequence layout, which are this module's business.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from megatron_po.data.records import PreferenceRecord
from megatron_po.data.sentences import token_segments
from megatron_po.data.tokenizer import Tokenizer

IGNORE_INDEX = -100
SKIP_REASONS: tuple[str, ...] = ("too_long", "empty_response", "identical_pair")
"""Reasons :meth:`PairCollator.fits` can give; every :attr:`PreferenceDataset.skipped` counts all three."""


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass
class CollateConfig:
    """How pairs become sequences."""

    max_length: int
    """Longest allowed row (specials and image slots included); longer pairs are dropped, never cut."""
    num_image_tokens: int
    """``<image>`` slots of one image where the caller gives no counts (``fits`` / ``num_tokens`` without
    ``image_tokens``); the datasets and the collation take each image's count from the image handler."""
    pad_to_multiple_of: int = 1
    """Round the batch length up to this (sequence parallel needs S divisible by the TP size)."""

    def __post_init__(self):
        if self.num_image_tokens < 0:
            raise ValueError(f"num_image_tokens must be >= 0, got {self.num_image_tokens}")
        if self.pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {self.pad_to_multiple_of}")
        # 4 specials + the image slots + at least one response token
        if self.max_length < self.num_image_tokens + 5:
            raise ValueError(f"max_length ({self.max_length}) leaves no room for a response after "
                             f"num_image_tokens ({self.num_image_tokens}) and the 4 special tokens")


def prompt_prefix(tokenizer: Tokenizer, prompt: str, image_tokens: Sequence[int], image_offsets=None) -> list[int]:
    """The chat-formatted user turn with one image of ``image_tokens[k]`` slots per entry, in slot order
    (tokenizer.prompt_ids: our own chat markers, or a HF family's template, see data/hf_chat.py)."""
    return tokenizer.prompt_ids(prompt, list(image_tokens), image_offsets)


def layout_rows(tokenizer: Tokenizer, rows: Sequence[tuple[list[int], list[int]]], pad_to_multiple_of: int) -> dict:
    """Pads ``(prefix ids, response ids)`` rows into model tensors; only the response is supervised.

    Returns:
        With S the longest row rounded up to ``pad_to_multiple_of``: ``tokens``, ``labels`` (-100 unsupervised),
        ``loss_mask`` (float), ``position_ids``, ``image_token_mask`` (bool), each [R, S], and ``row_lengths``
        [R] (tokens before the padding).
    """
    seq_len = _round_up(max(len(p) + len(r) for p, r in rows), pad_to_multiple_of)
    tokens = torch.full((len(rows), seq_len), tokenizer.pad_id, dtype=torch.long)
    labels = torch.full((len(rows), seq_len), IGNORE_INDEX, dtype=torch.long)
    for i, (prefix, response) in enumerate(rows):
        row_t = torch.tensor(prefix + response, dtype=torch.long)
        tokens[i, : len(row_t)] = row_t
        # targets are the response, predicted from the position just before each of its tokens
        labels[i, len(prefix) - 1 : len(row_t) - 1] = row_t[len(prefix):]
    return {
        "tokens": tokens,
        "labels": labels,
        "row_lengths": torch.tensor([len(p) + len(r) for p, r in rows], dtype=torch.long),
        "loss_mask": (labels != IGNORE_INDEX).float(),
        "position_ids": torch.arange(seq_len, dtype=torch.long).unsqueeze(0).expand(len(rows), -1).contiguous(),
        "image_token_mask": tokens == tokenizer.image_id,
    }


class PairCollator:
    """Builds the model batch from ``(record, images)`` pairs.

    Args:
        tokenizer: provides the text ids and the special ids.
        cfg: lengths and padding.
        images: the family's image handler (``FamilySpec.image_handler``: data/fixed_images.FixedSizeImages,
            data/hf_chat.HFImages): collates the pairs' loaded images and gives the rows' positions.
    """

    def __init__(self, tokenizer: Tokenizer, cfg: CollateConfig, images):
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.images = images

    def _encode(self, record: PreferenceRecord, image_tokens: Sequence[int] | None = None) -> tuple[list[int], ...]:
        """(prefix ids, chosen ids, rejected ids) of one pair whose images take `image_tokens` slots each (None:
        the config's fixed count per image)."""
        n = [self.cfg.num_image_tokens] * len(record.images) if image_tokens is None else image_tokens
        return (prompt_prefix(self.tokenizer, record.prompt, n, record.image_offsets),
                self.tokenizer.encode(record.chosen), self.tokenizer.encode(record.rejected))

    def _chosen_segments(self, record: PreferenceRecord, chosen_ids: list[int]) -> tuple[list[int], list[int]]:
        """(sentence index of every chosen token, indices of the record's sentences that kept a token)."""
        ids, offsets = self.tokenizer.encode_with_offsets(record.chosen)
        if ids != chosen_ids:
            # the offsets must describe the very tokens the model is trained on
            raise RuntimeError(f"pair {record.id!r}: encode_with_offsets disagrees with encode")
        return token_segments(record.chosen, offsets, record.sentence_spans())

    def _reason(self, record: PreferenceRecord, prefix: list[int], chosen: list[int], rejected: list[int]) -> str:
        # whitespace-only text still encodes to a "▁" piece, hence the check on the text as well
        if not (chosen and rejected and record.chosen.strip() and record.rejected.strip()):
            return "empty_response"
        if chosen == rejected:
            return "identical_pair"
        if len(prefix) + max(len(chosen), len(rejected)) + len(self.tokenizer.response_end_ids) > self.cfg.max_length:
            return "too_long"
        return ""

    def num_tokens(self, record: PreferenceRecord, image_tokens: Sequence[int] | None = None) -> int:
        """Tokens of the pair's two rows (what packing balances and fills rows with)."""
        prefix, chosen, rejected = self._encode(record, image_tokens)
        return 2 * (len(prefix) + len(self.tokenizer.response_end_ids)) + len(chosen) + len(rejected)

    def fits(self, record: PreferenceRecord, image_tokens: Sequence[int] | None = None) -> tuple[bool, str]:
        """Whether a pair can be collated as is (its images taking `image_tokens` slots each, default the
        config's).

        Returns:
            ``(True, "")``, or ``(False, reason)`` with reason one of :data:`SKIP_REASONS`.
        """
        reason = self._reason(record, *self._encode(record, image_tokens))
        return not reason, reason

    def measure(self, record: PreferenceRecord, image_tokens: Sequence[int] | None = None) -> tuple[str, tuple[int, int]]:
        """``(skip reason or "", (tokens of the chosen row, of the rejected row))`` of one pair, tokenized once
        (what preparing an index records; their sum is :meth:`num_tokens`)."""
        prefix, chosen, rejected = self._encode(record, image_tokens)
        end = len(self.tokenizer.response_end_ids)
        return (self._reason(record, prefix, chosen, rejected),
                (len(prefix) + len(chosen) + end, len(prefix) + len(rejected) + end))

    def __call__(self, records_with_images: Sequence[tuple[PreferenceRecord, dict]]) -> dict:
        """Collates B pairs.

        Args:
            records_with_images: ``(record, images)`` for each pair, images the handler's ``load`` of the record's
                k images (``num_tokens`` [k] among them); every pair must fit (see :meth:`fits`).

        Returns:
            With S the longest row rounded up to ``pad_to_multiple_of``, rows [chosen 0..B-1; rejected 0..B-1]:
            ``tokens`` [2B, S] long, ``labels`` [2B, S] long (-100 unsupervised), ``loss_mask`` [2B, S] float,
            ``position_ids`` [2B, S] long (the handler's), ``image_token_mask`` [2B, S] bool, ``images`` the
            handler's collation of every pair's images in order (tiny_vlm: [N, 3, H, W] float), shared by a pair's
            two rows, ``row_images`` (list of 2B lists: the
            images of each row, ``[i]`` for both rows of pair i when each pair has one), ``chosen_lengths`` /
            ``rejected_lengths`` [B] long (supervised tokens per row, ``<|end|>`` included), ``num_pairs`` int B,
            ``ids`` the B record ids.

            Sentences of the chosen responses (:mod:`megatron_po.data.sentences`), with K_max the largest
            ``num_segments`` in the batch: ``chosen_segment_ids`` [B, S] long, aligned with ``labels[:B]``: the
            sentence (0-based) of the token each label position predicts, -1 where ``labels == -100``;
            ``num_segments`` [B] long (>= 1; sentences that own no token are dropped);
            ``segment_similarity`` [B, K_max] float32: the record's ``chosen_sentence_similarity`` of each kept
            sentence, NaN where the record gives none or ``k >= num_segments``. For every row,
            ``(chosen_segment_ids[i] >= 0).sum() == chosen_lengths[i]``.

        Raises:
            ValueError: empty batch, or a pair that does not fit (it is reported, never truncated).
        """
        if not records_with_images:
            raise ValueError("cannot collate an empty batch")
        tok = self.tokenizer
        b = len(records_with_images)
        prefixes: list[list[int]] = []
        responses: list[list[int]] = [[] for _ in range(2 * b)]
        segments: list[tuple[list[int], list[int]]] = []
        end = list(tok.response_end_ids)
        pair_images: list[list[int]] = []
        for i, (record, image) in enumerate(records_with_images):
            first = pair_images[-1][-1] + 1 if pair_images else 0
            pair_images.append(list(range(first, first + len(record.images))))
            prefix, chosen, rejected = self._encode(record, [int(n) for n in image["num_tokens"]])
            reason = self._reason(record, prefix, chosen, rejected)
            if reason:
                raise ValueError(f"pair {record.id!r} cannot be collated ({reason}); "
                                 f"filter it out beforehand with PairCollator.fits")
            prefixes.append(prefix)
            segments.append(self._chosen_segments(record, chosen))
            responses[i] = chosen + end
            responses[b + i] = rejected + end

        rows = layout_rows(tok, [(prefixes[r % b], responses[r]) for r in range(2 * b)], self.cfg.pad_to_multiple_of)
        seq_len = rows["tokens"].shape[1]
        lengths = rows["loss_mask"].sum(dim=1).long()
        row_images = [pair_images[i % b] for i in range(2 * b)]  # a pair's two rows show its images
        images = self.images.collate([image for _, image in records_with_images])
        rows["position_ids"] = self.images.position_ids(rows["tokens"], images, row_images)

        segment_ids = torch.full((b, seq_len), -1, dtype=torch.long)
        num_segments = torch.tensor([len(kept) for _, kept in segments], dtype=torch.long)
        similarity = torch.full((b, int(num_segments.max())), math.nan, dtype=torch.float32)
        for i, ((record, _), (token_ids, kept)) in enumerate(zip(records_with_images, segments)):
            # same positions as the chosen row's labels; the end-of-turn tokens close the last sentence
            start = len(prefixes[i]) - 1
            seg = token_ids + [len(kept) - 1] * len(end)
            segment_ids[i, start : start + len(seg)] = torch.tensor(seg)
            if record.chosen_sentence_similarity is not None:
                similarity[i, : len(kept)] = torch.tensor([record.chosen_sentence_similarity[k] for k in kept])
        return {
            **rows,
            "images": images,
            "row_images": row_images,
            "chosen_lengths": lengths[:b],
            "rejected_lengths": lengths[b:],
            "num_pairs": b,
            "ids": [record.id for record, _ in records_with_images],
            "chosen_segment_ids": segment_ids,
            "num_segments": num_segments,
            "segment_similarity": similarity,
        }
