"""Packed micro-batches (megatron_po/data/packing.py): the bins, the DP spread and the packed rows' layout.

That packed training gives the unpacked losses and gradients in every layout is checked in tests/test_layouts.py.
"""

import random

import pytest
import torch

from megatron_po.data.packing import balance_over_dp, best_packing, first_fit_decreasing, pack_rows
from megatron_po.train.rows import packed_mask

pytestmark = pytest.mark.pure


def test_first_fit_decreasing_is_deterministic_and_respects_capacity():
    lengths = [5, 9, 3, 9, 2, 7, 1]
    bins = first_fit_decreasing(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    # longest first (ties by index: 1 before 3), each into the first bin with room
    assert bins == [[1, 6], [3], [5, 2], [0, 4]]
    with pytest.raises(ValueError, match="does not fit"):
        first_fit_decreasing([11], 10)


def test_best_packing_never_pads_more_than_one_sequence_per_row():
    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.randint(1, 100) for _ in range(rng.randint(1, 12))]
        bins = best_packing(lengths, 160, pad_multiple=2)
        width = -(-max(sum(lengths[i] for i in b) for b in bins) // 2) * 2
        unpacked = len(lengths) * (-(-max(lengths) // 2) * 2)
        assert len(bins) * width <= unpacked
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    # four similar sequences fill two rows of two rather than one full row and a short one
    assert sorted(map(len, best_packing([60, 60, 60, 60], 160))) == [2, 2]


def test_balance_over_dp_equal_counts_balanced_tokens():
    costs = [100, 10, 90, 20, 80, 30, 70, 40]
    ranks = balance_over_dp(costs, 2)
    assert [len(r) for r in ranks] == [4, 4] and sorted(ranks[0] + ranks[1]) == list(range(8))
    loads = [sum(costs[i] for i in r) for r in ranks]
    assert abs(loads[0] - loads[1]) <= 20 and all(r == sorted(r) for r in ranks)
    with pytest.raises(ValueError, match="evenly"):
        balance_over_dp([1, 2, 3], 2)


def collated():
    """Three collated rows of lengths 4, 6, 3 (padding 0) with one image slot in row 1 and segment ids on the
    first (chosen) row, as data/collate.layout_rows lays them out."""
    lengths = [4, 6, 3]
    s = 6
    tokens = torch.zeros(3, s, dtype=torch.long)
    labels = torch.full((3, s), -100)
    for r, n in enumerate(lengths):
        tokens[r, :n] = torch.arange(1, n + 1) + 10 * r
        labels[r, 1:n - 1] = tokens[r, 2:n]  # the last position predicts nothing
    image = torch.zeros(3, s, dtype=torch.bool)
    image[1, 1] = True
    return {
        "tokens": tokens, "labels": labels, "row_lengths": torch.tensor(lengths),
        "position_ids": torch.arange(s).expand(3, s).clone(), "image_token_mask": image,
        "row_images": [[], [0], []], "num_pairs": 1, "ids": ["a"],
        "chosen_segment_ids": torch.tensor([[-1, 0, 0, -1, -1, -1]]), "num_segments": torch.tensor([1]),
    }


def test_pack_rows_layout():
    batch = collated()
    out = pack_rows(batch, capacity=8, pad_multiple=2, pad_id=0)
    seq, tokens = out["sequence_ids"], out["tokens"]
    assert out["num_sequences"] == 3 and tokens.shape[1] % 2 == 0 and tokens.shape[0] < 3
    for r in range(3):
        where = seq == r
        n = batch["row_lengths"][r]
        assert int(where.sum()) == n
        assert torch.equal(tokens[where], batch["tokens"][r, :n])
        assert torch.equal(out["labels"][where], batch["labels"][r, :n])
        assert torch.equal(out["position_ids"][where], torch.arange(n))  # positions restart per sequence
    assert (out["labels"][seq < 0] == -100).all() and int((seq >= 0).sum()) == int(out["row_lengths"].sum())
    # the image follows its slot; the chosen row's sentence slots follow its positions
    row_of_image = int(out["image_token_mask"].nonzero()[0, 0])
    assert out["row_images"][row_of_image] == [0] and sum(map(len, out["row_images"])) == 1
    slots = out["chosen_segment_slots"]
    assert torch.equal(slots[seq == 0], torch.tensor([-1, 0, 0, -1]))


def test_packed_mask_isolates_sequences():
    ids = torch.tensor([[0, 0, 1, 1, 1, -1]])
    mask = packed_mask(ids)[0, 0]  # True = masked
    allowed = ~mask
    assert allowed[1, 0] and not allowed[0, 1]  # causal within sequence 0
    assert not allowed[2, 1] and not allowed[4, 0]  # nothing across sequences
    assert allowed[4, 2] and allowed[4, 4]
    assert allowed[5].sum() == 6  # padding attends causally (its outputs are never read)


def test_thd_row_lays_packed_rows_end_to_end():
    """TE takes packed sequences as one row with cu_seqlens: a run per sequence, each row's padding its own run."""
    from megatron_po.train.batch import MicroBatch
    from megatron_po.train.rows import thd_params

    packed = pack_rows(collated(), capacity=8, pad_multiple=2, pad_id=0)
    packed.update(images=torch.zeros(1, 3, 8, 8), chosen_lengths=torch.tensor([2]),
                  rejected_lengths=torch.tensor([4]))
    mb = MicroBatch.from_collated(packed)
    one = mb.as_thd()
    r, s = mb.rows.shape
    assert one.rows.shape == (1, r * s) and one.rows.num_sequences == 3
    assert torch.equal(one.rows.tokens[0], mb.rows.tokens.flatten())
    assert torch.equal(one.rows.image_token_mask[0], mb.rows.image_token_mask.flatten())
    assert one.rows.row_images == [[i for row in mb.rows.row_images for i in row]]
    assert torch.equal(one.chosen_segment_slots[0], mb.chosen_segment_slots.flatten())
    params = thd_params(one.rows.sequence_ids)
    cu = params.cu_seqlens_q.tolist()
    runs = []  # (sequence id, length) of every run, row by row: what cu_seqlens must delimit
    for row in mb.rows.sequence_ids.tolist():
        for sid in row:
            if runs and runs[-1][0] == sid and runs[-1][2] == len(runs):
                runs[-1][1] += 1
            else:
                runs.append([sid, 1, len(runs) + 1])
    assert [b - a for a, b in zip(cu, cu[1:])] == [n for _, n, _ in runs] and cu[-1] == r * s
    assert params.qkv_format == "thd" and params.max_seqlen_q == max(n for _, n, _ in runs)


def test_thd_row_gives_the_packed_rows_logps(groups, tmp_path):
    """The one-row THD layout changes nothing the trainer computes: per-sequence sums of a real packed micro-batch
    (images, sentence slots) equal those of its rows (here both with the block-diagonal mask of the local spec;
    TE's cu_seqlens attention itself needs a GPU: tests/test_gpu.py)."""
    from megatron_po.config import load_config
    from megatron_po.data.tokenizer import Tokenizer
    from megatron_po.families import family_spec
    from megatron_po.models.tiny_vlm.model import build_vlm
    from megatron_po.models.specs import padded_vocab_size
    from megatron_po.objectives import build_objective
    from megatron_po.train.batch import MicroBatch
    from megatron_po.train.data import build_dataset, prepare_data
    from megatron_po.train.rows import forward_rows, token_logps
    from megatron_po.train.step import Tower, image_embeds, token_logps_sums

    cfg = load_config(None, [f"output_dir={tmp_path}", "data.num_train=8", "data.num_eval=2", "data.packing=true"])
    family = family_spec(cfg.model.family)
    train_path, tok_path = prepare_data(cfg, build_objective("aspo", {}), family)
    tokenizer = Tokenizer(tok_path)
    ds = build_dataset(cfg, family, train_path, tokenizer)
    batch = pack_rows(ds.collator([ds[i] for i in range(4)]), cfg.model.max_seq_length, 1, tokenizer.pad_id)
    mb = MicroBatch.from_collated(batch).to(groups.device)
    assert mb.rows.shape[0] > 1
    model = build_vlm(cfg.model, cfg.parallel, padded_vocab_size(tokenizer.vocab_size, 1), groups, seed=1)
    sums = []
    with torch.no_grad():
        for view in (mb, mb.as_thd()):
            out = forward_rows(model, view.rows, image_embeds(model, view, Tower("policy", True)), view.images)
            sums.append(token_logps_sums(token_logps(model, out, view.rows, None), view.rows, view))
    assert torch.allclose(sums[0].seq, sums[1].seq, rtol=1e-6, atol=1e-6)
    assert torch.allclose(sums[0].segments, sums[1].segments, rtol=1e-6, atol=1e-6)


# per-sequence sums of -token over the supervised positions of collated(): row 0 predicts tokens 2, 3; row 1 12..15;
# row 2 22 (every value distinct, so a sum moved to another sequence or lost cannot go unnoticed)
SEQUENCE_SUMS = [-5.0, -54.0, -22.0]


def _per_token(rows) -> torch.Tensor:
    """A known 'log-prob' at each position, a function of the position's own token and label only: the packed and
    the unpacked layouts hold the same value at the same token of the same sequence, wherever packing put it."""
    return torch.where(rows.labels != -100, -rows.tokens.float(), torch.zeros(()))


@pytest.mark.parametrize("capacity, rows", [(6, 3), (8, 2), (13, 1)])
def test_packed_sums_are_the_unpacked_rows_sums(capacity, rows):
    """token_logps_sums of packed rows gives each sequence its own sum, in collated order, as the unpacked rows do
    (sentence sums too), whatever rows the sequences were packed into: capacity 6 keeps one sequence per row, 8
    puts sequence 1 alone and 0 + 2 together, 13 all three in one row. (A shift of the sums by one sequence was
    caught only by a 4-minute layout launch before.)"""
    from megatron_po.train.batch import MicroBatch
    from megatron_po.train.step import token_logps_sums

    sums = {}
    for packed in (False, True):
        batch = collated()
        batch["chosen_segment_ids"] = torch.tensor([[-1, 0, 1, -1, -1, -1]])  # two sentences: tokens 2 | 3
        batch["num_segments"] = torch.tensor([2])
        if packed:
            batch = pack_rows(batch, capacity=capacity, pad_multiple=2, pad_id=0)
            assert batch["tokens"].shape[0] == rows and batch["num_sequences"] == 3
        batch.update(images=torch.zeros(1, 3, 8, 8), chosen_lengths=torch.tensor([2]),
                     rejected_lengths=torch.tensor([4]))
        mb = MicroBatch.from_collated(batch)
        assert mb.rows.packed == packed
        sums[packed] = token_logps_sums(_per_token(mb.rows), mb.rows, mb)
    assert sums[False].seq.tolist() == SEQUENCE_SUMS
    assert sums[True].seq.tolist() == SEQUENCE_SUMS
    assert sums[False].segments.tolist() == sums[True].segments.tolist() == [[-2.0, -3.0]]
