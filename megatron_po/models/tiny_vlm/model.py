"""A small VLM on megatron-core: ViT tower -> MLP projector -> GPT decoder (Qwen2.5 shape).

Image embeddings replace the `<image>` placeholder tokens of the decoder input. Everything TP-sharded comes from
megatron-core (TransformerBlock, MultimodalProjector's MLP, GPTModel); the assembly is ours.
"""

from __future__ import annotations

import copy

import torch
from megatron.core.enums import ModelType
from megatron.core.models.vision.multimodal_projector import MultimodalProjector
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_po.config import ModelConfig, ParallelConfig
from megatron_po.data.image_ops import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from megatron_po.models.base import VLMBase
from megatron_po.models.lm import LanguageModel, rope_section
from megatron_po.models.specs import build_decoder_spec, build_lm_config, build_vision_config, build_vision_spec
from megatron_po.parallel.groups import ParallelGroups


class VisionTower(MegatronModule):
    """ViT: CLIP pixel normalisation + linear patch embedding + learned positions + megatron TransformerBlock
    (bidirectional).

    Images arrive as [0, 1] pixels (the data path and P2-DPO's noise work on those); the tower normalises them
    with CLIP's mean and std as the HF families' processors do. Without it a light background puts every patch
    embedding near one large constant vector, and a tower trained from scratch never learns to tell the shapes
    apart (the demo's SFT model answered the yes/no probe at chance after 1,600 steps; with it, ≥ 0.8).
    """

    def __init__(self, model: ModelConfig, config: TransformerConfig, groups: ParallelGroups):
        super().__init__(config=config)
        v = model.vision
        self.patch_size = v.patch_size
        # replicated over TP (tiny next to the blocks); drawn from the default generator, same on every rank
        self.patch_embed = torch.nn.Linear(3 * v.patch_size**2, v.hidden_size, dtype=config.params_dtype)
        self.position_embedding = torch.nn.Parameter(
            torch.randn(v.num_patches, v.hidden_size, dtype=config.params_dtype) * config.init_method_std
        )
        self.blocks = TransformerBlock(
            config, build_vision_spec(config), post_layer_norm=True, pg_collection=groups.pg_collection
        )
        # constants, not weights: left out of checkpoints
        self.register_buffer("pixel_mean", torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [n, 3, H, W] -> patch features [p, n, hv] (Megatron [s, b, h] layout)."""
        p = self.patch_size
        images = (images - self.pixel_mean) / self.pixel_std
        n, c, h, w = images.shape
        patches = images.unfold(2, p, p).unfold(3, p, p)  # [n, c, h/p, w/p, p, p]
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(n, (h // p) * (w // p), c * p * p)
        x = self.patch_embed(patches.to(self.patch_embed.weight.dtype)) + self.position_embedding
        return self.blocks(x.transpose(0, 1).contiguous(), attention_mask=None)


class VLMModel(VLMBase):
    """Vision tower + projector + GPTModel. `forward` returns vocab-sharded logits [b, s, v/tp]."""

    def __init__(self, model: ModelConfig, par: ParallelConfig, vocab_size: int, groups: ParallelGroups,
                 seed: int | None = None):
        lm_cfg = build_lm_config(model, par)
        lm_cfg.mrope_section = rope_section(lm_cfg.kv_channels)
        super().__init__(config=lm_cfg)
        vis_cfg = build_vision_config(model, lm_cfg)
        self.sequence_parallel = par.sp
        self.tp_group = groups.tp
        self.model_type = ModelType.encoder_or_decoder  # read by megatron's schedules
        self.vision = self.projector = None
        if groups.is_first_stage:  # the tower feeds the embedding: both live on the first pipeline stage
            self.vision = VisionTower(model, vis_cfg, groups)
            # image tokens are not sequence-sharded (the merged decoder input is scattered afterwards): under SP a
            # sequence-parallel projector would all-gather the full image sequence and double its gradients
            proj_cfg = copy.copy(lm_cfg)
            proj_cfg.sequence_parallel = False
            self.projector = MultimodalProjector(
                proj_cfg,
                MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
                projector_type="mlp",
                input_size=model.vision.hidden_size,
                tp_group=groups.tp,
            )
        self.language_model = LanguageModel(
            config=lm_cfg,
            transformer_layer_spec=build_decoder_spec(model, lm_cfg, pp_rank=groups.pp_rank, init_seed=seed),
            vocab_size=vocab_size,
            max_sequence_length=model.max_seq_length,
            position_embedding_type="mrope",  # plain RoPE from position_ids (lm.rope_section)
            rotary_base=model.rotary_base,
            share_embeddings_and_output_weights=False,
            parallel_output=True,
            # image features are merged first; we scatter to sequence-parallel shards ourselves afterwards
            scatter_embedding_sequence_parallel=False,
            pre_process=groups.is_first_stage,
            post_process=groups.is_last_stage,
            pg_collection=groups.pg_collection,
        )
        self.language_model.configure(model, groups.device.type)
        self.freeze_as_configured(model)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """images [n, 3, H, W] -> image embeddings [n, p, h] in the decoder's hidden size (p tokens per image)."""
        feats = self.vision(images)  # [p, n, hv]
        out = self.projector(feats)
        out = out[0] if isinstance(out, tuple) else out
        return out.transpose(0, 1)

    def forward(self, tokens, position_ids, attention_mask, image_embeds, image_token_mask,
                packed_seq_params=None) -> torch.Tensor:
        """Logits [b, s, v/tp] of text with image features spliced in: see VLMBase.decode."""
        return self.decode(tokens, position_ids, attention_mask, image_embeds, image_token_mask, packed_seq_params)


def build_vlm(model: ModelConfig, par: ParallelConfig, vocab_size: int, groups: ParallelGroups, seed: int) -> VLMModel:
    """Builds the VLM with weights that depend only on `seed`, not on the TP layout.

    The policy and the reference both come from here (same seed, then the same checkpoint if one is given).
    """
    torch.manual_seed(seed)
    m = VLMModel(model, par, vocab_size, groups, seed=seed)
    return m.to(groups.device)
