"""The Qwen2/Qwen2.5 decoder shared by every family (tiny_vlm, InternVL3, Qwen2.5-VL), on megatron's GPTModel."""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.models.gpt import GPTModel

from megatron_po.config import ModelConfig, ParallelConfig
from megatron_po.logprobs import CPU_CHUNK_TOKENS, auto_chunk_tokens
from megatron_po.models.specs import LMShape, build_decoder_spec, build_lm_config, use_te_spec
from megatron_po.parallel.groups import ParallelGroups


class LanguageModel(GPTModel):
    """megatron's GPTModel, which can stop before its output layer.

    With `output_hidden` the last pipeline stage returns the final (normed) hidden states [s, b, h] instead of
    logits, and the log-probs come from `logprobs.response_token_logps` with `output_weight()`: only response
    positions meet the vocabulary, a chunk at a time (model.logprobs=fused, the trainer's default).
    """

    output_hidden: bool = False
    logprob_chunk_tokens: int = CPU_CHUNK_TOKENS
    """Tokens per chunk of the fused log-prob stage (its [chunk, V/tp] fp32 buffer), resolved by `configure`."""

    packed_thd: bool = False
    """Packed rows come as one THD row with cu_seqlens (TE attention), not as rows with a block-diagonal mask."""

    def configure(self, model: ModelConfig, device_type: str = "cpu") -> "LanguageModel":
        """What the trainer's step reads off the language model: the log-prob path and its chunk, the packed layout.

        Args:
            model: the model config.
            device_type: where the model runs (``groups.device.type``): `model.logprob_chunk_tokens=0` becomes
                `logprobs.auto_chunk_tokens` of this rank's vocabulary slice there (the weights may still be on
                the CPU while the model is built).
        """
        self.output_hidden = model.logprobs == "fused"
        vocab_local = self.vocab_size // self.config.tensor_model_parallel_size
        self.logprob_chunk_tokens = model.logprob_chunk_tokens or auto_chunk_tokens(vocab_local, device_type)
        self.packed_thd = use_te_spec(model)
        return self

    def _postprocess(self, hidden_states, *args, **kwargs):
        if self.output_hidden and self.post_process:
            return hidden_states
        return super()._postprocess(hidden_states, *args, **kwargs)

    def output_weight(self) -> torch.Tensor:
        """[V/tp, h] the weight the output layer multiplies by (the embedding's when tied)."""
        if self.share_embeddings_and_output_weights:
            return self.shared_embedding_or_output_weight()
        return self.output_layer.weight


def rope_fields(text: dict) -> dict:
    """`text` with RoPE in transformers 4.x fields: 5.x writes `rope_parameters` ({rope_type, rope_theta,
    mrope_section, factor, ...}) where 4.x had `rope_theta` and `rope_scaling`. Both layouts are read; a value the
    file sets is never replaced by a default, and the two layouts must agree where a file has both."""
    params = text.get("rope_parameters")
    if not params:
        return text
    out = dict(text)
    theta = params.get("rope_theta")
    if theta is not None:
        if text.get("rope_theta") is not None and float(text["rope_theta"]) != float(theta):
            raise ValueError(f"rope_theta {text['rope_theta']} and rope_parameters.rope_theta {theta} disagree")
        out["rope_theta"] = theta
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind != "default" or "mrope_section" in scaling:
        old = text.get("rope_scaling") or {}
        if any(old[k] != scaling[k] for k in old.keys() & scaling.keys()):
            raise ValueError(f"rope_scaling {old} and rope_parameters {params} disagree")
        out["rope_scaling"] = scaling
    return out


def lm_shape_from_hf(text: dict, init_method_std: float = 0.02) -> LMShape:
    """Decoder shape from a Hugging Face Qwen2 / Qwen2.5 text config (the `text_config` of a VLM; transformers
    4.x or 5.x fields)."""
    text = rope_fields(text)
    heads = text["num_attention_heads"]
    head_dim = text.get("head_dim") or text["hidden_size"] // heads
    if head_dim * heads != text["hidden_size"]:
        raise ValueError(f"head_dim {head_dim} x {heads} heads != hidden_size {text['hidden_size']}: unsupported")
    return LMShape(
        num_layers=text["num_hidden_layers"],
        hidden_size=text["hidden_size"],
        ffn_hidden_size=text["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=text.get("num_key_value_heads") or heads,
        norm_epsilon=text.get("rms_norm_eps", 1e-6),
        rotary_base=text.get("rope_theta", 1_000_000.0),
        vocab_size=text["vocab_size"],
        tie_embeddings=bool(text.get("tie_word_embeddings", False)),
        init_method_std=init_method_std,
    )


def rope_section(head_dim: int) -> list[int]:
    """Plain 1-D RoPE as megatron's M-RoPE with every frequency on the first axis: the rotary angles come from
    `position_ids` (megatron's "rope" type derives them from the sequence index), so positions can restart per
    sequence of a packed row. With the positions 0..S-1 it is plain RoPE exactly (the same products pos × freq)."""
    return [head_dim // 2, 0, 0]


def build_language_model(
    shape: LMShape,
    model: ModelConfig,
    par: ParallelConfig,
    groups: ParallelGroups,
    padded_vocab: int,
    max_seq_length: int,
    mrope_section: Optional[list[int]] = None,
) -> "LanguageModel":
    """GPTModel in the Qwen2.5 shape (this rank's pipeline stage of it); `mrope_section` switches RoPE to
    Qwen2-VL's 3-axis M-RoPE (else plain RoPE over `position_ids`, see `rope_section`).

    The caller merges image features into the embeddings and scatters them to sequence-parallel shards itself,
    so the embedding does not scatter (scatter_embedding_sequence_parallel=False) and takes `decoder_input`.
    """
    cfg = build_lm_config(model, par, shape)
    cfg.mrope_section = list(mrope_section) if mrope_section is not None else rope_section(shape.kv_channels)
    lm = LanguageModel(
        config=cfg,
        transformer_layer_spec=build_decoder_spec(model, cfg, pp_rank=groups.pp_rank),
        vocab_size=padded_vocab,
        max_sequence_length=max_seq_length,
        position_embedding_type="mrope",
        rotary_base=int(shape.rotary_base),
        share_embeddings_and_output_weights=shape.tie_embeddings,
        parallel_output=True,
        scatter_embedding_sequence_parallel=False,
        pre_process=groups.is_first_stage,
        post_process=groups.is_last_stage,
        pg_collection=groups.pg_collection,
    )
    return lm.configure(model, groups.device.type)
