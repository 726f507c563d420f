"""One model forward over a set of rows (one pipeline stage's part of it), and per-token log-probs of the output.

A micro-batch (train/batch.py) holds rows of text whose image slots are filled from a shared list of images
(``Rows.row_images[r]`` = the indices into the batch's images of the images whose slots appear in row r, in
order). A preference pair's two rows name the same image; P2-DPO's calibration row names two ([I, I_crop]). The
model contract (models/tiny_vlm/model.py and the HF families) takes the flat ``[T, h]`` embeddings of every slot in
row-major order, on the first pipeline stage.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_po.logprobs import response_token_logps, vocab_parallel_token_logps
from megatron_po.train.batch import Rows


def unwrap(model):
    """The VLM inside DDP / precision wrappers: the first module with the model contract's `encode_images`
    (tiny_vlm's VLMModel or an HF family's module)."""
    while not hasattr(model, "encode_images"):
        model = model.module
    return model


def causal_mask(seq_len: int, device) -> torch.Tensor:
    # explicit mask: megatron's default causal mask is allocated on "cuda"; True = masked
    return torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool, device=device), diagonal=1)[None, None]


def packed_mask(sequence_ids: torch.Tensor) -> torch.Tensor:
    """[R, 1, S, S] (True = masked) for packed rows: causal within each sequence, nothing across sequences;
    padding positions (-1) attend causally to anything (their outputs are never read)."""
    s = sequence_ids.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=sequence_ids.device).tril()
    same = (sequence_ids[:, :, None] == sequence_ids[:, None, :]) | (sequence_ids[:, :, None] < 0)
    return ~(same & causal)[:, None]


def slot_embeds(
    embeds: torch.Tensor, row_images: list[list[int]], num_tokens: Optional[list[int]] = None
) -> torch.Tensor:
    """The ``[T, h]`` embeddings of every image slot of the rows, in row-major order.

    Args:
        embeds: per-image embeddings from ``encode_images``: ``[N, p, h]`` (tiny_vlm: p tokens per image) or
            ``[T_img, h]`` (images concatenated, ``num_tokens[i]`` tokens for image i).
        row_images: per row, the indices of its images in slot order.
        num_tokens: tokens per image; only for the ``[T_img, h]`` form.
    """
    order = [i for images in row_images for i in images]
    if embeds.dim() == 3:
        # one gather keeps the single-image layout (and its values) exactly as indexing a [b, p, h] tensor did
        return embeds[torch.tensor(order, device=embeds.device)].flatten(0, 1)
    if num_tokens is None:
        raise ValueError("[T_img, h] image embeddings need the tokens per image (images['num_tokens'])")
    per_image = embeds.split([int(n) for n in num_tokens])
    return torch.cat([per_image[i] for i in order])


def encode(model, images) -> torch.Tensor:
    """Per-image embeddings of the batch's images (a tensor, or a family's preprocessed dict)."""
    return unwrap(model).encode_images(images)


def forward_rows(model, rows: Rows, embeds: Optional[torch.Tensor], images) -> torch.Tensor:
    """This pipeline stage's forward of ``rows``: on the last stage the final hidden states [S(/tp), R, h]
    (model.logprobs=fused) or the logits [R, S, V/tp]; elsewhere the hidden states for the next stage. Packed rows
    attend within their sequences only.

    Args:
        model: the policy (possibly DDP-wrapped) or the reference.
        rows: the rows to run (a micro-batch's policy or reference view).
        embeds: ``encode(model, images)`` of the micro-batch's images on the first stage; None on the others,
            which take their input from the previous stage (``set_input_tensor``).
        images: the micro-batch's images (for per-image token counts of ``[T_img, h]`` embeddings).
    """
    flat = None
    if unwrap(model).pre_process:
        num_tokens = images.get("num_tokens") if isinstance(images, dict) else None
        flat = slot_embeds(embeds, rows.row_images, num_tokens)
        if rows.cp_slots is not None:  # the slots among this CP rank's positions
            flat = flat[rows.cp_slots]
    tokens = rows.tokens
    if rows.packed and tokens.shape[0] == 1 and unwrap(model).language_model.packed_thd:
        # TE attention: sequences isolated by cu_seqlens (THD), no [S, S] mask
        return model(tokens, rows.position_ids, None, flat, rows.image_token_mask,
                     packed_seq_params=thd_params(rows.sequence_ids))
    mask = packed_mask(rows.sequence_ids) if rows.packed else causal_mask(tokens.shape[1], tokens.device)
    return model(tokens, rows.position_ids, mask, flat, rows.image_token_mask)


def thd_params(sequence_ids: torch.Tensor) -> PackedSeqParams:
    """megatron's THD description of one row of packed sequences [1, T]: a run per sequence (each row's padding,
    -1, a run of its own: it attends to itself and is never read)."""
    ids = sequence_ids.reshape(-1)
    starts = torch.ones_like(ids, dtype=torch.bool)
    starts[1:] = ids[1:] != ids[:-1]
    bounds = torch.cat([starts.nonzero().flatten(), torch.tensor([ids.numel()], device=ids.device)])
    cu = bounds.to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest,
                           max_seqlen_kv=longest)


def token_logps(model, output: torch.Tensor, labels: torch.Tensor, tp_group) -> torch.Tensor:
    """Per-token log-probs [R, S] (fp32, 0 where unsupervised) of ``labels`` from the last stage's ``output``:
    the final hidden states [S(/tp), R, h] (model.logprobs=fused: response positions only, chunked) or the
    logits [R, S, V/tp]."""
    vlm = unwrap(model)
    # HF families pad the real vocabulary (lm_shape.vocab_size): padded entries must not enter the softmax
    shape = getattr(vlm, "lm_shape", None)
    vocab = None if shape is None else shape.vocab_size
    lm = vlm.language_model
    if lm.output_hidden:
        return response_token_logps(output, lm.output_weight(), labels, tp_group, vlm.sequence_parallel, vocab,
                                    lm.logprob_chunk_tokens)
    return vocab_parallel_token_logps(output, labels, tp_group, vocab)
