"""What every VLM family shares around its decoder: freezing, the pipeline hook, and the image splice.

A family (tiny_vlm, InternVL3, Qwen2.5-VL) sets `vision`, `projector`, `language_model` (megatron GPTModel built
with scatter_embedding_sequence_parallel=False), `sequence_parallel` and `tp_group`, and implements
`encode_images`; the decoder pass with image embeddings spliced into the image-token slots is this one.

Under pipeline parallelism each rank builds one stage: the first holds the vision tower, the projector and the
embedding (``vision``/``projector`` are None elsewhere), the last the output layer; `decode` runs this stage's part.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule

from megatron_po.config import ModelConfig


class VLMBase(MegatronModule):
    def freeze_as_configured(self, model: ModelConfig) -> None:
        if model.freeze_vit and self.vision is not None:
            self.vision.requires_grad_(False)
        if model.freeze_aligner and self.projector is not None:
            self.projector.requires_grad_(False)
        if model.freeze_llm:
            self.language_model.requires_grad_(False)

    @property
    def pre_process(self) -> bool:
        """This pipeline stage embeds the tokens and encodes the images (the first stage)."""
        return self.language_model.pre_process

    @property
    def post_process(self) -> bool:
        """This pipeline stage returns logits (the last stage)."""
        return self.language_model.post_process

    # megatron's finalize_model_grads looks for the module with `pre_process` and asks it about tied embeddings
    # (the first and last stages all-reduce the tied weight's gradient): the decoder's answers are the VLM's
    @property
    def share_embeddings_and_output_weights(self) -> bool:
        return self.language_model.share_embeddings_and_output_weights

    def shared_embedding_or_output_weight(self):
        return self.language_model.shared_embedding_or_output_weight()

    @property
    def vision_frozen(self) -> bool:
        """No trainable vision parameter on this stage (true on stages without the tower)."""
        towers = [m for m in (self.vision, self.projector) if m is not None]
        return not any(p.requires_grad for m in towers for p in m.parameters())

    def set_input_tensor(self, input_tensor) -> None:
        # megatron's schedules hand pipeline activations in here; with pp=1 this is a no-op pass-through
        self.language_model.set_input_tensor(input_tensor)

    def decode(
        self,
        tokens: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_embeds: Optional[torch.Tensor],
        image_token_mask: Optional[torch.Tensor],
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> torch.Tensor:
        """Runs this pipeline stage's part of the decoder on text with image embeddings spliced in.

        Args:
            tokens: [b, s].
            position_ids: [b, s], or [3, b, s] for M-RoPE (positions reach the decoder's RoPE only: every family
                uses rotary embeddings, so the embedding layer takes none; they may restart within a row).
            attention_mask: [1, 1, s, s] bool, True = masked.
            image_embeds: [T, h] the embeddings of every image slot of the batch, in row-major order of
                `image_token_mask` (a row may hold several images, and rows may share one: the caller lays them
                out, see train/rows.py); None or empty for text only.
            image_token_mask: [b, s] bool, T True positions in all.
            packed_seq_params: THD packing for TE attention (one row of packed sequences, train/rows.py); the
                mask is then unused.
        Returns:
            logits [b, s, v/tp] (vocab-sharded over TP) on the last stage; elsewhere the stage's hidden states
            [s(/tp under SP), b, h] for the next one. Stages after the first read their input from
            `set_input_tensor` and ignore `tokens`, `image_embeds` and `image_token_mask`.
        Raises:
            ValueError: T differs from the number of image slots (masked_scatter would silently use a prefix).
        """
        if position_ids.dim() == 2:  # one position per token: the same on M-RoPE's three axes (plain RoPE)
            position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)
        if not self.pre_process:
            return self.language_model(input_ids=None, position_ids=position_ids, attention_mask=attention_mask,
                                       decoder_input=None, packed_seq_params=packed_seq_params)
        emb = self.language_model.embedding(input_ids=tokens, position_ids=None)  # [s, b, h]
        given = 0 if image_embeds is None else image_embeds.shape[0]
        if image_token_mask is not None:
            check_image_slots(image_token_mask, given)
        if given:
            emb = splice_image_embeds(emb.transpose(0, 1), image_token_mask, image_embeds).transpose(0, 1).contiguous()
        if self.sequence_parallel:
            emb = tensor_parallel.scatter_to_sequence_parallel_region(emb, group=self.tp_group)
        return self.language_model(input_ids=tokens, position_ids=position_ids, attention_mask=attention_mask,
                                   decoder_input=emb, packed_seq_params=packed_seq_params)


def splice_image_embeds(emb: torch.Tensor, image_token_mask: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
    """[b, s, h] `emb` with its image-token slots (row-major) replaced by the [T, h] `image_embeds`, in order.

    A trained tower's embeddings take a gradient: masked_scatter's gradient for its source is a masked_select,
    which makes the host wait for the GPU in backward, so they are gathered by each slot's running count instead
    (the same values; the gradient is an index_add). Frozen embeddings keep the cheaper masked_scatter.
    """
    image_embeds = image_embeds.to(emb.dtype)
    mask = image_token_mask.unsqueeze(-1)
    if not (image_embeds.requires_grad and torch.is_grad_enabled()):
        return emb.masked_scatter(mask.expand_as(emb), image_embeds)
    slot = (image_token_mask.reshape(-1).cumsum(0) - 1).clamp_min(0)  # positions before the first slot: unused
    return torch.where(mask, image_embeds.index_select(0, slot).view_as(emb), emb)


def check_image_slots(image_token_mask: torch.Tensor, given: int) -> None:
    """Raises ValueError unless `image_token_mask` has `given` True positions, without the host waiting for the
    count on a GPU: the comparison is a device-side assert there (a mismatch stops the job with a CUDA error; on the
    CPU it raises at once, as here)."""
    try:
        torch._assert_async(image_token_mask.sum() == given, f"image_embeds has {given} embeddings for another "
                            "number of image slots")
    except RuntimeError:
        raise ValueError(f"image_embeds has {given} embeddings for {int(image_token_mask.sum())} image slots") from None


def to_device(model: VLMBase, device: torch.device) -> VLMBase:
    """Moves a built model to its device; the converters build on the meta device, where nothing moves."""
    return model if any(p.is_meta for p in model.parameters()) else model.to(device)
