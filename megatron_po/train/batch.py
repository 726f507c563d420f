"""The typed micro-batch of the preference step.

A micro-batch holds B samples (preference pairs, or P2-DPO samples) as rows of text whose image slots are filled
from one shared list of images. Its optional fields are filled by whoever produces them *before* the policy step
(STYLE.md "inputs are typed, never injected"): the samples' global positions when the micro-batches are made
(train/data.step_micro_batches), the reference log-probs by the reference pass or the cache (train/reference.py),
the frozen towers' image embeddings by the first pass of the step that encodes them (train/step.py). Packed rows
(data/packing.py) hold several sequences each; log-prob sums come back per sequence in collated order.

A micro-batch is made on the host and then moved to its device (`MicroBatch.to`): what the step needs to know on
the host about the rows (where the supervised positions are, the THD sequence boundaries, how many tokens each
image has) is computed there, from CPU tensors, when the rows are built, and travels with them. On a GPU the step
then never waits for the device to learn a shape.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from typing import Optional, Union

import torch
from torch import Tensor

from megatron_po.flops import Work
from megatron_po.logprobs import ResponseIndex, segment_sums
from megatron_po.parallel.context import cp_positions

Images = Union[Tensor, dict]
"""tiny_vlm: ``[N, 3, H, W]``; HF families: the processor's dict (``pixel_values``, ``num_tokens``, ...)."""


PINNED = "pinned"
"""`move`'s destination for host tensors pinned in place (DataLoader's pin-memory thread, `MicroBatch.pin_memory`)."""


def move(t: Tensor, device: Union[torch.device, str]) -> Tensor:
    """`t` on `device` without stalling the host: a CPU tensor bound for a GPU is pinned first, so the copy runs
    asynchronously (``non_blocking`` from pageable memory is a synchronous copy); already pinned, it is not pinned
    again. `device` PINNED: pinned on the host."""
    if device == PINNED:
        return t.pin_memory() if t.device.type == "cpu" and not t.is_pinned() else t
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu" and not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def move_images(images: Images, device: torch.device) -> Images:
    """A micro-batch's images on `device`: pixels move; a processor's integer bookkeeping (``num_tokens``,
    ``image_grid_thw``, ``num_patches``) stays on the host, where it is only ever read (shapes, splits, windows):
    on the device every read of it would wait for the GPU."""
    if torch.is_tensor(images):
        return move(images, device)
    return {k: move(v, device) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in images.items()}


@dataclass(frozen=True)
class ThdRuns:
    """Packed rows laid end to end as one THD row: megatron's ``cu_seqlens`` (a run per sequence, each row's
    padding a run of its own) and the longest run, computed on the host when the rows are built."""

    cu_seqlens: Tensor
    """[runs + 1] int32 offsets of the runs in the flattened rows (on the rows' device)."""
    max_seqlen: int

    @classmethod
    def of(cls, sequence_ids: Tensor) -> "ThdRuns":
        """From [R, S] sequence ids (-1 = padding): on the host when they are there (the trainer's case)."""
        ids = sequence_ids.reshape(-1)
        starts = torch.ones_like(ids, dtype=torch.bool)
        starts[1:] = ids[1:] != ids[:-1]
        bounds = torch.cat([starts.nonzero().flatten(), torch.tensor([ids.numel()], device=ids.device)])
        cu = bounds.to(torch.int32)
        return cls(cu, int((cu[1:] - cu[:-1]).max()))

    def to(self, device: torch.device) -> "ThdRuns":
        return ThdRuns(move(self.cu_seqlens, device), self.max_seqlen)


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
    lengths: Tensor
    """[R] real (unpadded) tokens of each row."""
    sequence_ids: Optional[Tensor] = None
    """Packed rows (data/packing.py): [R, S] the sequence (collated row) of each position, -1 for padding; None
    when every row is one sequence."""
    num_sequences: Optional[int] = None
    """Packed rows: how many sequences they hold (log-prob sums come back per sequence, in collated order)."""
    cp_slots: Optional[Tensor] = None
    """Context parallelism (`cp_shard`): indices, among the image slots of the whole rows in row-major order, of
    the slots among this rank's positions; None without CP."""
    # --- derived from the fields above where the rows are built (on the host in the trainer), see __post_init__
    response: Optional[ResponseIndex] = None
    """Where the supervised positions are (`logprobs.ResponseIndex` of `labels`)."""
    thd: Optional[ThdRuns] = None
    """Packed rows: their THD runs (`ThdRuns.of(sequence_ids)`); None unpacked."""
    image_order: Optional[Tensor] = None
    """[n] long: `row_images` flattened, the images of the slots in row-major order."""
    image_tokens: Optional[tuple[int, ...]] = None
    """Tokens of each of the micro-batch's images when they differ per image (HF families' ``num_tokens``), on the
    host; None for fixed-size images."""

    def __post_init__(self) -> None:
        # computed where the tensors are: once on the host for the trainer's micro-batches (`MicroBatch.to` then
        # moves them); rows built on a device (generation, tests) pay a host sync here, once
        if self.response is None:
            self.response = ResponseIndex.of(self.labels)
        if self.thd is None and self.packed:
            self.thd = ThdRuns.of(self.sequence_ids)
        if self.image_order is None:
            self.image_order = torch.tensor([i for images in self.row_images for i in images], dtype=torch.long,
                                            device=self.tokens.device)

    @classmethod
    def from_collated(cls, d: dict, image_tokens: Optional[tuple[int, ...]] = None) -> "Rows":
        return cls(d["tokens"], d["labels"], d["position_ids"], d["image_token_mask"], d["row_images"],
                   d["row_lengths"], d.get("sequence_ids"), d.get("num_sequences"), image_tokens=image_tokens)

    def to(self, device: torch.device) -> "Rows":
        """The rows on `device` (host-side fields as they are)."""
        opt = lambda t: None if t is None else move(t, device)  # noqa: E731
        return Rows(move(self.tokens, device), move(self.labels, device), move(self.position_ids, device),
                    move(self.image_token_mask, device), self.row_images, move(self.lengths, device),
                    opt(self.sequence_ids), self.num_sequences, opt(self.cp_slots),
                    ResponseIndex(move(self.response.flat, device), self.response.positions),
                    None if self.thd is None else self.thd.to(device),
                    move(self.image_order, device), self.image_tokens)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.tokens.shape)

    @property
    def packed(self) -> bool:
        return self.sequence_ids is not None

    def as_one_row(self) -> "Rows":
        """Packed rows laid end to end as one row [1, R * S] (TE's THD layout: megatron takes packed sequences as
        one row with cu_seqlens); each row's trailing padding stays a run of its own. Slots, positions and sums
        keep their row-major order, so nothing downstream changes."""
        if not self.packed:
            raise ValueError("only packed rows are laid out as one THD row")
        flat = lambda t: t.reshape(*t.shape[:-2], 1, -1)  # noqa: E731  ([3,] R, S) -> ([3,] 1, R * S)
        return Rows(flat(self.tokens), flat(self.labels), flat(self.position_ids), flat(self.image_token_mask),
                    [[i for images in self.row_images for i in images]], self.lengths.sum().reshape(1),
                    flat(self.sequence_ids), self.num_sequences, image_tokens=self.image_tokens)

    def cp_shard(self, cp_size: int, cp_rank: int) -> "Rows":
        """This CP rank's share of the rows (parallel/context.py): its positions of every per-position tensor,
        except the positions themselves, which megatron's rotary embedding takes whole and slices alike."""
        if self.packed:
            raise ValueError("packed rows under context parallelism are not supported")
        pos = cp_positions(self.shape[1], cp_size, cp_rank, self.tokens.device)
        slot_no = (self.image_token_mask.flatten().cumsum(0) - 1).view(self.shape)
        kept = self.image_token_mask[:, pos]
        return Rows(self.tokens[:, pos], self.labels[:, pos], self.position_ids, kept, self.row_images,
                    self.lengths, cp_slots=slot_no[:, pos][kept], image_tokens=self.image_tokens)

    def work(self, image_tokens: tuple[int, ...] = ()) -> Work:
        """What a decoder pass over these rows processes (`flops.Work`), counted where the rows are (the host, for
        the trainer's micro-batches); `image_tokens`: the tokens of each image the pass encodes."""
        if self.packed:
            ids = self.sequence_ids.reshape(-1)
            sequences = torch.bincount(ids[ids >= 0])
        else:
            sequences = self.lengths
        sequences = sequences.long()
        return Work(int(self.lengths.sum()), self.tokens.numel(), int((sequences * sequences).sum()),
                    len(self.response.positions), image_tokens)

    @property
    def num_logical(self) -> int:
        """Sequences (collated rows) the rows hold: per-row sums have this many entries, packed or not."""
        return self.num_sequences if self.packed else self.shape[0]


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


@dataclass(frozen=True)
class BatchWork:
    """What a step's passes process in one micro-batch (train/costs.py: `tokens/*`, the FLOP count, the memory
    plan's rows), counted on the host when the micro-batch is made, on the whole rows: before CP sharding and the
    THD layout."""

    policy: Work
    """The policy's rows, with the tokens of each image encoded."""
    reference: Work
    """The reference's rows (`MicroBatch.reference_rows`); its images are the policy's, counted there."""
    rows: int
    """Rows of the micro-batch (packed rows: after packing)."""
    row_length: int
    """Positions per row (the longest row's, padded)."""

    @classmethod
    def of(cls, mb: "MicroBatch") -> "BatchWork":
        rows = mb.rows
        per_image = rows.image_tokens
        if per_image is None:  # fixed-size images: every image has the same slots
            shown = sum(len(images) for images in rows.row_images)
            count = mb.images.shape[0] if torch.is_tensor(mb.images) else 0
            each = int(rows.image_token_mask.sum()) // shown if shown else 0
            per_image = (each,) * count
        policy = rows.work(tuple(per_image))
        reference = policy if mb.ref_rows is None else mb.ref_rows.work()
        return cls(policy, reference, rows.shape[0], rows.shape[1])


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
    """[B, S] sentence of each chosen label position, -1 where none (pairs only, collated layout)."""
    chosen_segment_slots: Optional[Tensor] = None
    """Packed pairs: [R', S'] sentence slot ``b * K + k`` of each position of the packed rows, -1 elsewhere."""
    num_segments: Optional[Tensor] = None
    """[B] sentences of each chosen response."""
    chosen_segment_lengths: Optional[Tensor] = None
    """[B, K] fp64 tokens of each sentence of the chosen rows, counted on the whole rows when collated (a CP
    rank's share of the positions would count only its own)."""
    segment_similarity: Optional[Tensor] = None
    p2: Optional[P2Fields] = None
    ref_rows: Optional[Rows] = None
    """The reference's own view of the rows when its responses differ (P2-DPO calib_reference="rejected")."""
    # --- filled before the policy step ---
    ref_logps: Optional[SeqLogps] = None
    """The reference's sums over ``reference_rows`` (reference pass or cache); set on the last pipeline stage."""
    sample_index: Optional[Tensor] = None
    """[B] positions of the samples in the optimizer step's global batch (set by train/data.step_micro_batches:
    a contiguous share per DP rank, or spread by tokens when packing)."""
    image_embeds: dict[str, Tensor] = field(default_factory=dict)
    """No-grad image embeddings of frozen towers by tower key (train/step.Tower), shared by every pass of the
    step that uses the same tower (first pipeline stage only)."""
    segment_slots: Optional[int] = None
    """K of `num_segment_slots`, counted on the host when collated (None: counted on demand)."""
    work: Optional[BatchWork] = None
    """What the step's passes process (set on the host with the rows, `BatchWork.of`; None: counted on demand)."""

    @classmethod
    def from_collated(cls, d: dict) -> "MicroBatch":
        """From a collator's dict (data/collate.py, data/p2_collate.py)."""
        p2 = None
        if "p2_rows" in d:
            p2 = P2Fields(d["p2_rows"], d["has_focus"], d["has_robust"], d["clip_crop_score"], d["clip_image_score"])
        images = d["images"]
        counts = images.get("num_tokens") if isinstance(images, dict) else None
        image_tokens = None if counts is None else tuple(int(n) for n in counts.tolist())
        ref_rows = Rows.from_collated(d["ref_rows"], image_tokens) if "ref_rows" in d else None
        ids, lengths, slots = d.get("chosen_segment_ids"), None, None
        if ids is not None:
            slots = int(d["num_segments"].max())
            lengths = segment_sums((ids >= 0).double(), ids, slots)
        return cls(Rows.from_collated(d, image_tokens), images, d["num_pairs"], list(d["ids"]),
                   d.get("chosen_lengths"), d.get("rejected_lengths"), ids, d.get("chosen_segment_slots"),
                   d.get("num_segments"), lengths, d.get("segment_similarity"), p2, ref_rows, segment_slots=slots)

    def to(self, device: torch.device) -> "MicroBatch":
        """The micro-batch on `device`: every tensor (pinned on the way to a GPU, so nothing waits), the rows with
        their host-side layout; images by `move_images`."""
        out = copy.copy(self)
        for f in fields(self):
            value = getattr(self, f.name)
            if torch.is_tensor(value):
                setattr(out, f.name, move(value, device))
        out.rows = self.rows.to(device)
        out.ref_rows = None if self.ref_rows is None else self.ref_rows.to(device)
        out.images = move_images(self.images, device)
        if self.p2 is not None:
            out.p2 = P2Fields(*(move(getattr(self.p2, f.name), device) for f in fields(P2Fields)))
        if self.ref_logps is not None:
            seq, segments = self.ref_logps.seq, self.ref_logps.segments
            out.ref_logps = SeqLogps(move(seq, device), None if segments is None else move(segments, device))
        out.image_embeds = {k: move(v, device) for k, v in self.image_embeds.items()}
        return out

    def pin_memory(self) -> "MicroBatch":
        """The micro-batch with every host tensor pinned (torch's DataLoader calls this in its pin-memory thread,
        off the training thread); `to` then copies it to the GPU asynchronously at once."""
        return self.to(PINNED)

    def as_thd(self) -> "MicroBatch":
        """The packed rows (and the reference's) as one THD row each (`Rows.as_one_row`)."""
        out = copy.copy(self)
        out.rows = self.rows.as_one_row()
        out.ref_rows = None if self.ref_rows is None else self.ref_rows.as_one_row()
        if self.chosen_segment_slots is not None:
            out.chosen_segment_slots = self.chosen_segment_slots.reshape(1, -1)
        return out

    def cp_shard(self, cp_size: int, cp_rank: int) -> "MicroBatch":
        """This CP rank's share of the rows (and of the per-position sentence ids); the rest is whole."""
        if cp_size == 1:
            return self
        if self.chosen_segment_slots is not None:
            raise ValueError("packed rows under context parallelism are not supported")
        out = copy.copy(self)
        out.rows = self.rows.cp_shard(cp_size, cp_rank)
        out.ref_rows = None if self.ref_rows is None else self.ref_rows.cp_shard(cp_size, cp_rank)
        if self.chosen_segment_ids is not None:
            out.chosen_segment_ids = self.chosen_segment_ids[:, cp_positions(self.rows.shape[1], cp_size, cp_rank,
                                                                             self.rows.tokens.device)]
        return out

    @property
    def reference_rows(self) -> Rows:
        return self.ref_rows if self.ref_rows is not None else self.rows

    @property
    def num_segment_slots(self) -> int:
        """K: sentence slots of the chosen rows' segment sums (the batch's largest sentence count), counted on the
        host when the micro-batch was collated."""
        if self.segment_slots is None:
            self.segment_slots = int(self.num_segments.max())
        return self.segment_slots
