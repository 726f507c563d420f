"""The memory plan (`--dry-run --world-size N`): its counts against what the built modules hold and save.

- parameters: the plan's per-rank counts equal the modules megatron_po builds (tiny_vlm and both HF families, in
  one shared 1-rank gloo group; TP/PP shards are checked by the layout test), and the shape-only configs of the
  published models equal transformers' own models built on the meta device;
- activations: the per-token, per-layer coefficients of the local spec equal the bytes a decoder layer saves for
  backward (saved-tensor hooks), with and without GQA and recompute, and with LoRA's frozen base and adapters;
- LoRA: the plan's parameters equal a built LoRA model's (adapters inside the decoder and projector, only they
  trainable), and it differs from full fine-tuning's by the reference, gradient and optimizer terms;
- the driver: the dry run prints the plan, as JSON too, and every shipped example fits its node.
The plan against measured peak memory of whole runs is benchmarks/bench_memory_plan.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import REPO, run_python
from megatron_po.config import ParallelConfig, load_config
from megatron_po.families import family_spec
from megatron_po.memory_plan import GiB, _layer_elements, build_plan, format_plan, stage_params
from megatron_po.models.shapes import ModelShape

SHAPES = REPO / "launch" / "configs" / "shapes"
PLANS = sorted(SHAPES.glob("*.yaml"))


def model_shape(cfg) -> ModelShape:
    return family_spec(cfg.model.family).model_shape(cfg)


def _numel(module) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def _assert_counts(cfg, model) -> None:
    p = stage_params(cfg, model_shape(cfg), stage=0, layers=model_shape(cfg).lm.num_layers)
    assert p.lm == _numel(model.language_model)
    assert p.vision == _numel(model.vision)
    assert p.projector == _numel(model.projector)
    assert p.trainable == sum(t.numel() for t in model.parameters() if t.requires_grad)


@pytest.mark.pure
@pytest.mark.parametrize("overrides", [[], ["model.num_query_groups=4", "model.freeze_vit=false",
                                             "model.freeze_aligner=false", "model.vocab_size=1000"]])
def test_parameters_equal_the_built_tiny_vlm(groups, overrides):
    from megatron_po.models.tiny_vlm.model import build_vlm
    from megatron_po.models.specs import padded_vocab_size

    cfg = load_config(None, overrides)
    shape = model_shape(cfg)
    model = build_vlm(cfg.model, cfg.parallel, padded_vocab_size(shape.lm.vocab_size, 1), groups, seed=0)
    _assert_counts(cfg, model)


HF_CASES = {
    "internvl3_vit300m_tied": lambda d: __import__("hf_internvl3_fixture").make_checkpoint(d, "vit300m"),
    "internvl3_vit6b": lambda d: __import__("hf_internvl3_fixture").make_checkpoint(d, "vit6b"),
    "qwen2_5_vl": lambda d: __import__("hf_qwen2_5_vl_fixture").make_hf_dir(d),
}


@pytest.mark.pure
@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_parameters_equal_the_built_hf_families(groups, tmp_path, case):
    pytest.importorskip("transformers")
    hf = HF_CASES[case](tmp_path / "hf")
    family = case.split("_vit")[0] if case.startswith("internvl3") else "qwen2_5_vl"
    cfg = load_config(None, [f"model.family={family}", f"model.hf_path={hf}", f"checkpoint.init_from={tmp_path}",
                             "model.freeze_vit=false"])
    model = family_spec(family).hf.build(json.loads((hf / "config.json").read_text()), cfg.model,
                                               cfg.parallel, groups)
    _assert_counts(cfg, model)


def _hf_meta_params(hf_dir: Path) -> int:
    import transformers

    config = transformers.AutoConfig.from_pretrained(hf_dir)
    cls = {"internvl": transformers.InternVLForConditionalGeneration,
           "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration}[config.model_type]
    with torch.device("meta"):
        return sum(p.numel() for p in cls(config).parameters())


@pytest.mark.pure
@pytest.mark.parametrize("plan", PLANS, ids=lambda p: p.stem)
def test_published_shapes_equal_transformers_models(plan):
    """The shape-only configs count what transformers builds from them (its real vocabulary, no padding)."""
    pytest.importorskip("transformers")
    cfg = load_config(plan)
    cfg.parallel = ParallelConfig()  # the whole model on one rank
    shape = model_shape(cfg)
    unpadded = ModelShape(shape.lm, shape.lm.vocab_size, shape.vision)
    cfg.model.freeze_vit = cfg.model.freeze_aligner = False
    cfg.model.lora.rank = 0  # every weight counted as trainable: the base model (LoRA configs included)
    p = stage_params(cfg, unpadded, 0, shape.lm.num_layers)
    assert p.trainable == _hf_meta_params(Path(cfg.model.hf_path))


@pytest.mark.pure
@pytest.mark.parametrize("plan", PLANS, ids=lambda p: p.stem)
def test_every_published_example_fits_a_node(plan):
    cfg = load_config(plan)
    world = int(plan.read_text().split("world size ")[1].split()[0])
    result = build_plan(cfg, family_spec(cfg.model.family), world, 80.0, te=True)
    assert result.fits, f"{plan.name}: {result.peak / 2**30:.1f} GiB"


def _saved_elements_per_token(model, tokens: int, seq: int) -> dict[str, float]:
    """Elements (fp32) each decoder layer saves for backward per token, parameters excluded."""
    from megatron_po.train.rows import causal_mask

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    where, seen = ["outside"], {}

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in params and key not in seen:
            seen[key] = (where[0], t.untyped_storage().nbytes())
        return t

    hooks = []
    for i, layer in enumerate(model.language_model.decoder.layers):
        hooks.append(layer.register_forward_pre_hook(lambda *_, i=i: where.__setitem__(0, f"layer{i}")))
        hooks.append(layer.register_forward_hook(lambda *_: where.__setitem__(0, "outside")))
    rows = tokens // seq
    ids = torch.randint(0, 100, (rows, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, torch.arange(seq).expand(rows, seq), causal_mask(seq, ids.device), None, None)
    for h in hooks:
        h.remove()
    out: dict[str, float] = {}
    for name, nbytes in seen.values():
        out[name] = out.get(name, 0.0) + nbytes / 4 / tokens
    return out


@pytest.mark.pure
@pytest.mark.parametrize("overrides", [
    [],
    ["model.num_query_groups=4"],  # no GQA: v stays a view of the qkv buffer
    ["model.num_attention_heads=8", "model.max_seq_length=96"],
    ["model.recompute=selective"],
    ["model.recompute=selective", "model.recompute_modules=core_attn,mlp"],
])
def test_layer_activations_equal_saved_tensors(groups, overrides):
    from megatron_po.models.tiny_vlm.model import build_vlm

    cfg = load_config(None, ["model.max_seq_length=64", *overrides])
    seq = cfg.model.max_seq_length
    model = build_vlm(cfg.model, cfg.parallel, 256, groups, seed=0)
    saved = _saved_elements_per_token(model, 2 * seq, seq)
    act, fp32 = _layer_elements(cfg, model_shape(cfg).lm, te=False, recompute=cfg.model.recompute == "selective")
    assert fp32 == 0
    assert saved["layer1"] == pytest.approx(act, abs=0.01), saved  # layer0 also holds the shared mask


@pytest.mark.pure
def test_full_recompute_keeps_a_layer_input(groups):
    from megatron_po.models.tiny_vlm.model import build_vlm

    cfg = load_config(None, ["model.max_seq_length=64", "model.recompute=full"])
    model = build_vlm(cfg.model, cfg.parallel, 256, groups, seed=0)
    saved = _saved_elements_per_token(model, 128, 64)
    per_layer = (saved["outside"] - 2 * cfg.model.hidden_size - 3) / cfg.model.num_layers  # minus the final norm
    h = cfg.model.hidden_size
    assert h <= per_layer <= 1.25 * h, saved  # the checkpointed input (+ rotary tables and mask)


@pytest.mark.e2e
def test_dry_run_prints_the_plan_and_json(tmp_path):
    out = run_python(["-m", "megatron_po.cli", "train", "--dry-run", "--world-size", "4", "parallel.tp=2",
                      "parallel.sp=true", "train.global_batch_size=8", "--json"])
    plan = json.loads(out[out.index("{"):])
    assert plan["dp"] == 2 and plan["fits"] and len(plan["stages"]) == 1
    assert plan["stages"][0]["weights_reference"] > 0
    out = run_python(["-m", "megatron_po.cli", "train", "--dry-run", "--world-size", "4", "parallel.pp=2",
                      "parallel.tp=2", "--device-memory-gb", "0.001", "reference.source=cache",
                      "reference.cache_path=x"])
    assert "stage 1" in out and "does NOT fit" in out


@pytest.mark.pure
def test_plan_terms_move_the_right_way():
    def plan(dp: int = 1, **changes):
        cfg = load_config(None, ["model.max_seq_length=4096", "train.micro_batch_size=1", "model.num_layers=16",
                                 "train.global_batch_size=8", *[f"{k}={v}" for k, v in changes.items()]])
        return build_plan(cfg, family_spec(cfg.model.family), cfg.parallel.tp * cfg.parallel.pp * dp).stages[0]

    none, sel, full = plan(), plan(**{"model.recompute": "selective"}), plan(**{"model.recompute": "full"})
    assert none.activations > sel.activations > full.activations
    tp2, tp2sp = plan(**{"parallel.tp": 2}), plan(**{"parallel.tp": 2, "parallel.sp": "true"})
    assert tp2sp.activations < tp2.activations < none.activations
    # the fused stage holds one [chunk, V/tp] buffer, far below the full logits at chunks of 256 (the GPU's auto
    # chunk, a ~1 GiB buffer, covers this small vocabulary's whole micro-batch: then it is only below them)
    chunk256 = plan(**{"model.logprob_chunk_tokens": 256}).logprob_stage
    assert plan(**{"model.logprobs": "logits"}).logprob_stage > 10 * chunk256
    assert chunk256 < none.logprob_stage < plan(**{"model.logprobs": "logits"}).logprob_stage
    assert plan(**{"reference.source": "cache", "reference.cache_path": "x"}).weights_reference == 0
    distributed = plan(dp=2, **{"parallel.use_distributed_optimizer": "true"})
    assert distributed.optimizer == pytest.approx(plan(dp=2).optimizer / 2)


@pytest.mark.pure
def test_layernorm_recompute_is_refused_without_te():
    """megatron's layernorm recompute goes through TE's FP8 state: on the local spec it failed mid-forward."""
    from megatron_po.config import ParallelConfig
    from megatron_po.models.specs import build_lm_config

    cfg = load_config(None, ["model.recompute=selective", "model.recompute_modules=core_attn,layernorm",
                             "model.spec=local"])
    with pytest.raises(ValueError, match="needs the Transformer-Engine spec"):
        build_lm_config(cfg.model, ParallelConfig())


# ---- LoRA ----------------------------------------------------------------------------------------------------------


def _lora_model(cfg, groups, build):
    """`build()`'s model with cfg.model.lora's adapters, as train/models.build_models adds them."""
    from megatron_po.models.lora import apply_lora

    model = build()
    apply_lora(model, cfg.model.lora, groups.tp, seed=0)
    return model


@pytest.mark.pure
@pytest.mark.parametrize("overrides", [
    ["model.lora.rank=4"],
    ["model.lora.rank=8", "model.lora.target_modules=linear_qkv,linear_fc2,projector", "model.num_query_groups=4"],
])
def test_lora_parameters_equal_the_built_tiny_vlm(groups, overrides):
    """lm and projector hold their adapters; only the adapters train (what DDP and the optimizer hold)."""
    from megatron_po.models.specs import padded_vocab_size
    from megatron_po.models.tiny_vlm.model import build_vlm

    cfg = load_config(None, overrides)
    vocab = padded_vocab_size(model_shape(cfg).lm.vocab_size, 1)
    model = _lora_model(cfg, groups, lambda: build_vlm(cfg.model, cfg.parallel, vocab, groups, seed=0))
    _assert_counts(cfg, model)
    p = stage_params(cfg, model_shape(cfg), 0, cfg.model.num_layers)
    assert 0 < p.trainable == p.adapters < 0.1 * p.lm


@pytest.mark.pure
@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_lora_parameters_equal_the_built_hf_families(groups, tmp_path, case):
    """The projector's linears (VisionFootprint.projector_linears) of each family: column/row-parallel megatron linears
    (InternVL3) and Qwen2.5-VL's plain torch merger."""
    pytest.importorskip("transformers")
    hf = HF_CASES[case](tmp_path / "hf")
    family = case.split("_vit")[0] if case.startswith("internvl3") else "qwen2_5_vl"
    cfg = load_config(None, [f"model.family={family}", f"model.hf_path={hf}", f"checkpoint.init_from={tmp_path}",
                             "model.lora.rank=4", "model.lora.target_modules=linear_qkv,linear_fc1,projector"])
    config = json.loads((hf / "config.json").read_text())
    model = _lora_model(cfg, groups, lambda: family_spec(family).hf.build(config, cfg.model, cfg.parallel, groups))
    _assert_counts(cfg, model)


def _plan_pair(**changes) -> tuple:
    """The same job's plan under full fine-tuning and under LoRA rank 16 (the 72B shape on 8 GPUs, one stage)."""
    overrides = ["parallel.pp=1", *[f"{k}={v}" for k, v in changes.items()]]
    full = load_config(SHAPES / "qwen2_5_vl_72b.yaml", overrides)
    lora = load_config(SHAPES / "qwen2_5_vl_72b.yaml", [*overrides, "model.lora.rank=16"])
    family = family_spec(full.model.family)
    return (build_plan(full, family, 8, te=True).stages[0], build_plan(lora, family, 8, te=True).stages[0],
            stage_params(lora, family.model_shape(lora), 0, 80))


@pytest.mark.pure
def test_lora_plan_drops_the_reference_and_the_base_optimizer():
    full, lora, p = _plan_pair()
    assert full.weights_reference > 0 and lora.weights_reference == 0  # adapters_off: no second model
    assert lora.weights_policy == full.weights_policy + p.adapters * 2  # bf16 adapters on the same base
    assert lora.gradients == p.adapters * 4  # DDP's fp32 main grads: the adapters only
    assert lora.optimizer == p.adapters * 12  # fp32 master + Adam m, v (dp 1)
    # what LoRA saves is the reference and the base's gradients and optimizer state (151 of 182 GiB per GPU here);
    # the activations move by a few percent (frozen linears keep no inputs, the adapters keep theirs and A x)
    saved = {key: getattr(full, key) - getattr(lora, key) for key in ("weights_reference", "gradients", "optimizer")}
    assert full.total - lora.total == pytest.approx(sum(saved.values()), rel=0.01)
    assert lora.activations == pytest.approx(full.activations, rel=0.1)
    assert lora.logprob_stage <= full.logprob_stage  # no weight gradient for the frozen head
    assert lora.total < 0.2 * full.total
    # a LoRA run may still build a reference model: a copy of the base, without adapters
    _, with_model, _ = _plan_pair(**{"reference.source": "model"})
    assert with_model.weights_reference == full.weights_reference


@pytest.mark.pure
def test_lora_plan_sheds_optimizer_state_over_dp():
    """The distributed optimizer shards the adapters' master weights and moments over DP, not their grads."""
    def plan(world: int):
        cfg = load_config(SHAPES / "qwen2_5_vl_72b_lora.yaml", ["train.global_batch_size=32"])
        return build_plan(cfg, family_spec(cfg.model.family), world, te=True).stages[0]

    one, two = plan(8), plan(16)
    assert two.optimizer == pytest.approx(one.optimizer / 2) and two.gradients == one.gradients


@pytest.mark.pure
@pytest.mark.parametrize("plan", [SHAPES / "qwen2_5_vl_72b_lora.yaml", SHAPES / "internvl3_78b_lora.yaml"],
                         ids=lambda p: p.stem)
def test_lora_plan_names_its_reference_and_rank(plan):
    cfg = load_config(plan)
    result = build_plan(cfg, family_spec(cfg.model.family), 8, te=True)
    text = format_plan(result, cfg)
    assert "reference=adapters_off (the policy's base: no second model)" in text
    assert "lora=rank 16, alpha 32" in text
    assert (result.reference, result.lora_rank) == ("adapters_off", 16)
    assert result.fits and result.peak < 45 * GiB  # one node of 8 x 80 GB, with margin


@pytest.mark.pure
@pytest.mark.parametrize("overrides", [
    [],
    ["model.lora.target_modules=linear_qkv"],  # qkv's input kept; proj's and fc2's not
    ["model.lora.target_modules=linear_proj,linear_fc2"],  # the row-parallel ones: the context and SwiGLU's output
    ["model.lora.dropout=0.1"],  # the dropped input instead of the input, and its mask (input's dtype on the CPU)
    ["model.num_query_groups=4"],
    ["model.recompute=selective"],
    ["model.recompute=selective", "model.recompute_modules=core_attn,mlp"],
])
def test_frozen_layer_activations_equal_saved_tensors(groups, overrides):
    """Under LoRA a layer keeps its adapters' inputs and A x, and no frozen linear's or norm's operands. Three
    layers, the last one measured: with qkv not adapted the first layer's attention keeps nothing (no gradient
    reaches it), so the shared mask is kept by the second."""
    from megatron_po.models.tiny_vlm.model import build_vlm

    cfg = load_config(None, ["model.max_seq_length=64", "model.num_layers=3", "model.lora.rank=4", *overrides])
    seq = cfg.model.max_seq_length
    model = _lora_model(cfg, groups, lambda: build_vlm(cfg.model, cfg.parallel, 256, groups, seed=0))
    saved = _saved_elements_per_token(model, 2 * seq, seq)
    act, fp32 = _layer_elements(cfg, model_shape(cfg).lm, te=False, recompute=cfg.model.recompute == "selective")
    assert fp32 == 0
    assert saved["layer2"] == pytest.approx(act, abs=0.01), saved
