"""One model forward over a set of rows (one pipeline stage's part of it), and per-token log-probs of the output.

A micro-batch (train/batch.py) holds rows of text whose image slots are filled from a shared list of images
(``Rows.row_images[r]`` = the indices into the batch's images of the images whose slots appear in row r, in
order). A preference pair's two rows name the same image; P2-DPO's calibration row names two ([I, I_crop]). The
model contract (models/tiny_vlm/model.py and the HF families) takes the flat ``[T, h]`` embeddings of every slot in
row-major order, on the first pipeline stage.

Nothing here reads a device tensor's value on the host (no `.item()`, boolean-mask indexing, `nonzero`): the
layout the host needs (image order and token counts, THD runs, supervised positions) comes with the `Rows`, computed
when the micro-batch was made (train/batch.py). tests/test_host_syncs.py holds this path to it.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_po.logprobs import response_token_logps, vocab_parallel_token_logps
from megatron_po.train.batch import Rows, ThdRuns


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
    embeds: torch.Tensor,
    row_images: list[list[int]],
    num_tokens: Optional[list[int]] = None,
    order: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The ``[T, h]`` embeddings of every image slot of the rows, in row-major order.

    Args:
        embeds: per-image embeddings from ``encode_images``: ``[N, p, h]`` (tiny_vlm: p tokens per image) or
            ``[T_img, h]`` (images concatenated, ``num_tokens[i]`` tokens for image i).
        row_images: per row, the indices of its images in slot order.
        num_tokens: tokens per image; only for the ``[T_img, h]`` form (host ints: `Rows.image_tokens`).
        order: `row_images` flattened, on the embeddings' device (`Rows.image_order`); else made here (a copy from
            host memory each call).
    """
    if embeds.dim() == 3:
        if order is None:
            order = torch.tensor([i for images in row_images for i in images], device=embeds.device)
        # one gather keeps the single-image layout (and its values) exactly as indexing a [b, p, h] tensor did
        return embeds.index_select(0, order).flatten(0, 1)
    if num_tokens is None:
        raise ValueError("[T_img, h] image embeddings need the tokens per image (images['num_tokens'])")
    per_image = embeds.split([int(n) for n in num_tokens])
    return torch.cat([per_image[i] for images in row_images for i in images])


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
        num_tokens = rows.image_tokens
        if num_tokens is None and isinstance(images, dict):
            num_tokens = images.get("num_tokens")
        flat = slot_embeds(embeds, rows.row_images, num_tokens, rows.image_order)
        if rows.cp_slots is not None:  # the slots among this CP rank's positions
            flat = flat[rows.cp_slots]
    tokens = rows.tokens
    if rows.packed and tokens.shape[0] == 1 and unwrap(model).language_model.packed_thd:
        # TE attention: sequences isolated by cu_seqlens (THD), no [S, S] mask
        return model(tokens, rows.position_ids, None, flat, rows.image_token_mask, packed_seq_params=thd_params(rows))
    mask = packed_mask(rows.sequence_ids) if rows.packed else causal_mask(tokens.shape[1], tokens.device)
    return model(tokens, rows.position_ids, mask, flat, rows.image_token_mask)


def thd_params(rows: Union[Rows, torch.Tensor]) -> PackedSeqParams:
    """megatron's THD description of one row of packed sequences [1, T]: a run per sequence (each row's padding,
    -1, a run of its own: it attends to itself and is never read).

    Args:
        rows: packed rows (their `Rows.thd`, computed on the host when they were made), or [R, S] sequence ids
            (computed here, where they are).
    """
    runs = rows.thd if isinstance(rows, Rows) else ThdRuns.of(rows)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=runs.cu_seqlens, cu_seqlens_kv=runs.cu_seqlens,
                           max_seqlen_q=runs.max_seqlen, max_seqlen_kv=runs.max_seqlen)


def token_logps(model, output: torch.Tensor, rows: Rows, tp_group) -> torch.Tensor:
    """Per-token log-probs [R, S] (fp32, 0 where unsupervised) of the rows' labels from the last stage's
    ``output``: the final hidden states [S(/tp), R, h] (model.logprobs=fused: response positions only, chunked,
    at the rows' host-computed supervised positions: no host sync) or the logits [R, S, V/tp]."""
    labels, index = rows.labels, rows.response
    vlm = unwrap(model)
    # HF families pad the real vocabulary (lm_shape.vocab_size): padded entries must not enter the softmax
    shape = getattr(vlm, "lm_shape", None)
    vocab = None if shape is None else shape.vocab_size
    lm = vlm.language_model
    if lm.output_hidden:
        return response_token_logps(output, lm.output_weight(), labels, tp_group, vlm.sequence_parallel, vocab,
                                    lm.logprob_chunk_tokens, index)
    return vocab_parallel_token_logps(output, labels, tp_group, vocab)
