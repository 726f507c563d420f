"""The image-slot layout of train/rows.py: per-row image lists -> the flat [T, h] embeddings the models take."""

import pytest
import torch

from megatron_po.train.rows import slot_embeds

pytestmark = pytest.mark.pure


def test_uniform_images_follow_the_rows():
    embeds = torch.randn(3, 2, 4)  # tiny_vlm: [N, p, h]
    rows = [[0], [2], [0, 1], [2]]  # a two-image row ([I, I_crop]) among single-image rows; images reused
    flat = slot_embeds(embeds, rows)
    assert torch.equal(flat, torch.cat([embeds[0], embeds[2], embeds[0], embeds[1], embeds[2]]))
    # a pair batch's layout is exactly the old per-row indexing of [b, p, h]
    index = torch.tensor([0, 1, 2, 0, 1, 2])
    assert torch.equal(slot_embeds(embeds, [[i] for i in index.tolist()]), embeds[index].reshape(-1, 4))


def test_variable_token_counts():
    counts = torch.tensor([1, 3, 2])  # HF families: images concatenated, [T_img, h]
    embeds = torch.arange(6 * 2, dtype=torch.float32).reshape(6, 2)
    flat = slot_embeds(embeds, [[1], [2, 0]], counts)
    assert torch.equal(flat, torch.cat([embeds[1:4], embeds[4:6], embeds[0:1]]))
