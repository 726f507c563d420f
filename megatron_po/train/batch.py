"""The typed micro-batch of the preference step.

A micro-batch holds B samples (preference pairs, or P2-DPO samples) as rows of text whose image slots are filled
from one shared list of images. Its optional fields are filled by whoever produces them *before* the policy step
(STYLE.md "inputs are typed, never injected"): the reference log-probs by the reference pass or the cache
(train/reference.py), the global positions of its samples by the loop (`index_samples`), the frozen towers' image
embeddings by the first pass of the step that encodes them (train/step.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import Tensor

Images = Union[Tensor, dict]
"""tiny_vlm: ``[N, 3, H, W]``; HF families: the processor's dict (``pixel_values``, ``num_tokens``, ...)."""


@dataclass
class Rows:
    """Rows of text, one model forward: ``[R, S]`` tensors and each row's images."""

    tokens: Tensor
    labels: Tensor
    """Target of each position (``tokens[t + 1]`` where supervised), -100 elsewhere."""
    position_ids: Tensor
    """``[R, S]``, or ``[3, R, S]`` for M-RoPE."""
    image_token_mask: Tensor
    row_images: list[list[int]]
    """``row_images[r]``: indices into the micro-batch's images of the images whose slots row r shows, in order."""

    @classmethod
    def from_collated(cls, d: dict) -> "Rows":
        return cls(d["tokens"], d["labels"], d["position_ids"], d["image_token_mask"], d["row_images"])

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.tokens.shape)


@dataclass
class SeqLogps:
    """Per-row sums of response-token log-probs (fp64 sums of fp32 token log-probs, TP-reduced) and, when the rows
    carry sentence segments (pair batches), per-sentence sums of the chosen rows (ASPO)."""

    seq: Tensor
    """[R]"""
    segments: Optional[Tensor] = None
    """[B, K]"""

    def detach(self) -> "SeqLogps":
        return SeqLogps(self.seq.detach(), None if self.segments is None else self.segments.detach())


@dataclass
class P2Fields:
    """What a P2-DPO micro-batch adds to its rows (data/p2_collate.py)."""

    p2_rows: Tensor
    """[6, B] row of each term (order ``P2_TERMS``), -1 where the sample lacks the branch."""
    has_focus: Tensor
    has_robust: Tensor
    clip_crop_score: Tensor
    clip_image_score: Tensor


@dataclass
class MicroBatch:
    """One micro-batch of the preference step; see the module docstring for who fills the optional fields."""

    rows: Rows
    """The policy's rows: pairs as [chosen 0..B-1; rejected 0..B-1]; P2 samples term-major."""
    images: Images
    num_samples: int
    """B: pairs, or P2-DPO samples."""
    sample_ids: list[str]
    """The B record ids: the reference cache's keys (skipped records never shift later ones)."""
    chosen_lengths: Optional[Tensor] = None
    """[B] supervised tokens of each chosen row (pairs only)."""
    rejected_lengths: Optional[Tensor] = None
    chosen_segment_ids: Optional[Tensor] = None
    """[B, S] sentence of each chosen label position, -1 where none (pairs only)."""
    num_segments: Optional[Tensor] = None
    """[B] sentences of each chosen response."""
    segment_similarity: Optional[Tensor] = None
    p2: Optional[P2Fields] = None
    ref_rows: Optional[Rows] = None
    """The reference's own view of the rows when its responses differ (P2-DPO calib_reference="rejected")."""
    # --- filled before the policy step ---
    ref_logps: Optional[SeqLogps] = None
    """The reference's sums over ``reference_rows`` (reference pass or cache); set on the last pipeline stage."""
    sample_index: Optional[Tensor] = None
    """[B] positions of the samples in the optimizer step's global batch (DP-rank-major, then micro-batch)."""
    image_embeds: dict[str, Tensor] = field(default_factory=dict)
    """No-grad image embeddings of frozen towers by tower key (train/step.Tower), shared by every pass of the
    step that uses the same tower (first pipeline stage only)."""

    @classmethod
    def from_collated(cls, d: dict) -> "MicroBatch":
        """From a collator's dict (data/collate.py, data/p2_collate.py)."""
        p2 = None
        if "p2_rows" in d:
            p2 = P2Fields(d["p2_rows"], d["has_focus"], d["has_robust"], d["clip_crop_score"], d["clip_image_score"])
        ref_rows = Rows.from_collated(d["ref_rows"]) if "ref_rows" in d else None
        return cls(Rows.from_collated(d), d["images"], d["num_pairs"], list(d["ids"]), d.get("chosen_lengths"),
                   d.get("rejected_lengths"), d.get("chosen_segment_ids"), d.get("num_segments"),
                   d.get("segment_similarity"), p2, ref_rows)

    @property
    def reference_rows(self) -> Rows:
        return self.ref_rows if self.ref_rows is not None else self.rows

    @property
    def num_segment_slots(self) -> int:
        """K: sentence slots of the chosen rows' segment sums (the batch's largest sentence count)."""
        return int(self.num_segments.max())


def index_samples(batches: list[MicroBatch], dp_rank: int) -> None:
    """Sets each micro-batch's ``sample_index``: its samples' positions in the step's global batch.

    The global order is DP-rank-major then micro-batch, the order of the sampler's global batch (every DP rank
    holds the same number of samples) and of a rank-ordered ``all_gather_cat``.
    """
    offset = dp_rank * sum(b.num_samples for b in batches)
    for b in batches:
        b.sample_index = torch.arange(offset, offset + b.num_samples, device=b.rows.tokens.device)
        offset += b.num_samples
