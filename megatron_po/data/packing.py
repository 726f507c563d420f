"""Packed micro-batches: several whole sequences per row, attention isolated per sequence.

A collated micro-batch has one sequence per row, each padded to the micro-batch's longest. `pack_rows` moves the
sequences into rows of up to `capacity` tokens with first-fit-decreasing (deterministic: longest first, ties by
row index), at the row capacity that leaves the least padding (`best_packing`), and records, per position, the sequence it belongs to (`sequence_ids`, -1 for padding). The
model then attends within each sequence only (a block-diagonal causal mask, train/rows.py), every sequence keeps
the positions it was collated with (they restart at 0: plain RoPE and M-RoPE alike take them from position_ids),
its image slots keep their images in order, and the log-prob sums come back per sequence in the collated order:
everything after the log-probs (objectives, reference cache, metrics) sees the unpacked layout.

`balance_over_dp` spreads a global batch's samples over DP ranks by their token counts (equal sample counts, so
normalisation and gathers are unchanged) before packing.
"""

from __future__ import annotations

from typing import Optional

import torch


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of item indices, each holding at most `capacity` in total; items longest first, ties by index.

    Raises:
        ValueError: an item longer than `capacity` (collation never produces one: pairs that do not fit are
            dropped when the dataset is built).
    """
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        if lengths[i] > capacity:
            raise ValueError(f"sequence of {lengths[i]} tokens does not fit rows of {capacity}")
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


def best_packing(lengths: list[int], capacity: int, pad_multiple: int = 1, candidates: int = 16) -> list[list[int]]:
    """First-fit-decreasing bins that cost the fewest processed positions (rows x the fullest row, rounded up to
    `pad_multiple`), over row capacities from the longest sequence to `capacity`.

    A micro-batch's rows are padded to its fullest one, so the fewest bins is not always the least padding (four
    sequences of 60 tokens fill two rows of 120 better than one of 180 and one of 60). Capacity = the longest
    sequence is one candidate, so packing never processes more positions than one sequence per row.
    """
    longest = max(lengths)
    step = max(1, (capacity - longest) // max(1, candidates - 1))
    best, best_cost = None, None
    for cap in sorted({*range(longest, capacity + 1, step), capacity}):
        bins = first_fit_decreasing(lengths, cap)
        width = -(-max(sum(lengths[i] for i in b) for b in bins) // pad_multiple) * pad_multiple
        cost = (len(bins) * width, len(bins))
        if best_cost is None or cost < best_cost:
            best, best_cost = bins, cost
    return best


def balance_over_dp(costs: list[int], dp_size: int) -> list[list[int]]:
    """Positions of a global batch per DP rank: equal counts, token costs balanced (longest first to the least
    loaded rank that still has room; ties by position and rank), each rank's positions in increasing order."""
    per_rank = len(costs) // dp_size
    if per_rank * dp_size != len(costs):
        raise ValueError(f"{len(costs)} samples do not split evenly over {dp_size} DP ranks")
    load, members = [0] * dp_size, [[] for _ in range(dp_size)]
    for i in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        rank = min((r for r in range(dp_size) if len(members[r]) < per_rank), key=lambda r: (load[r], r))
        members[rank].append(i)
        load[rank] += costs[i]
    return [sorted(m) for m in members]


def _pack_view(view: dict, capacity: int, pad_multiple: int, pad_id: int) -> dict:
    """One row view (tokens, labels, position_ids, image_token_mask, row_images, row_lengths) packed."""
    lengths = view["row_lengths"].tolist()
    bins = best_packing(lengths, capacity, pad_multiple)
    width = max(sum(lengths[i] for i in b) for b in bins)
    width = -(-width // pad_multiple) * pad_multiple
    tokens, labels, positions = view["tokens"], view["labels"], view["position_ids"]
    n = len(bins)
    out = {
        "tokens": tokens.new_full((n, width), pad_id),
        "labels": labels.new_full((n, width), -100),
        "position_ids": positions.new_zeros((*positions.shape[:-2], n, width)),
        "image_token_mask": view["image_token_mask"].new_zeros((n, width)),
        "sequence_ids": torch.full((n, width), -1, dtype=torch.long),
        "row_images": [],
        "row_lengths": torch.tensor([sum(lengths[i] for i in b) for b in bins]),
    }
    for row, members in enumerate(bins):
        start, images = 0, []
        for i in sorted(members):  # collated order inside a row: deterministic, and images follow their slots
            end = start + lengths[i]
            out["tokens"][row, start:end] = tokens[i, :lengths[i]]
            # a label predicts the next token of its own sequence: the last position of a sequence predicts
            # nothing (the collator already leaves it -100), so no label crosses into the next sequence
            out["labels"][row, start:end] = labels[i, :lengths[i]]
            out["position_ids"][..., row, start:end] = positions[..., i, :lengths[i]]
            out["image_token_mask"][row, start:end] = view["image_token_mask"][i, :lengths[i]]
            out["sequence_ids"][row, start:end] = i
            images += view["row_images"][i]
            start = end
        out["row_images"].append(images)
    return out


def pack_rows(batch: dict, capacity: int, pad_multiple: int, pad_id: int) -> dict:
    """A collated micro-batch (data/collate.py, data/p2_collate.py) with its rows packed.

    Returns the batch with the packed view's ``tokens``, ``labels``, ``position_ids``, ``image_token_mask``,
    ``row_images``, ``row_lengths`` (real tokens per packed row) and ``sequence_ids`` [R', S'] (the collated row
    each position belongs to, -1 for padding; ``num_sequences`` says how many). The reference's own view
    (``ref_rows``, P2-DPO) is packed on its own. Pair batches gain ``chosen_segment_slots`` [R', S']: the
    sentence slot ``b * K + k`` of chosen response b's sentence k at each position, -1 elsewhere (K the largest
    sentence count), so per-sentence sums are one scatter.
    """
    out = dict(batch)
    out.update(_pack_view(batch, capacity, pad_multiple, pad_id))
    out["num_sequences"] = batch["tokens"].shape[0]
    if "ref_rows" in batch:
        out["ref_rows"] = {**_pack_view(batch["ref_rows"], capacity, pad_multiple, pad_id),
                           "num_sequences": batch["ref_rows"]["tokens"].shape[0]}
    segment_ids: Optional[torch.Tensor] = batch.get("chosen_segment_ids")
    if segment_ids is not None:
        k = int(batch["num_segments"].max())
        slots = torch.full_like(out["sequence_ids"], -1)
        seq = out["sequence_ids"]
        for b in range(segment_ids.shape[0]):
            where = seq == b
            local = segment_ids[b, : int(where.sum())]
            slots[where] = torch.where(local >= 0, b * k + local, local.new_tensor(-1))
        out["chosen_segment_slots"] = slots
    return out
