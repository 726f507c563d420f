"""The one FLOP count (megatron_po/flops.py) against two independent references:

1. Megatron-LM's `num_floating_point_operations` for a dense GPT, written out below, on the configurations where
   both count the same thing (one sequence per row, the output head on every position, no vision tower);
2. torch's `FlopCounterMode` over one real training step on the CPU (tiny_vlm, and a tiny Qwen2.5-VL and
   InternVL3), where our count is fed what the local spec's kernels execute: every position of the padded rows
   and the full [S, S] scores of each row (the local spec masks them, it does not skip them).

What each side counts that the other does not:
- FlopCounterMode counts every GEMM the kernels run: padding positions, the masked half of causal attention and,
  in packed rows, the blocks between different sequences; our *model* FLOPs (the `mfu` metric's) count only real
  tokens and each sequence's own s^2. It would also count recompute replays (none here; the MFU convention leaves
  them out) and sees no element-wise work, which neither side counts.
- We count the output head as applied to response positions only, which is what the fused log-prob stage runs
  (with model.logprobs=logits the kernels compute every position's logits, which we do not count).
- The vision tower's per-tile class token (InternViT) is counted as one more patch through the patch embedding,
  which it does not pass through; edge windows of Qwen2.5-VL are counted whole.
- The fused log-prob stage recomputes each chunk's logits in backward (a replay: not model FLOPs) and accumulates
  the output weight's gradient with an in-place `addmm_`, which FlopCounterMode does not see. With a trained head
  the two cancel; with a frozen one (LoRA) there is no weight gradient, and the replay is added to our side.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from train_state import in_process_run

pytestmark = pytest.mark.pure


# ---- 1. Megatron-LM --------------------------------------------------------------------------------------------


def megatron_lm_flops(args, batch_size: int) -> float:
    """Megatron-LM's `num_floating_point_operations(args, batch_size)` (megatron/training/training.py, as of
    core_r0.9.0 - core_r0.12.0, before its MLA / hybrid-model branches) for a dense model without MoE:

        expansion_factor = 3 * 2 * 2   # fwd + wgrad + dgrad; 2 GEMMs per block; 2 FLOPs per multiply-add
        expansion_factor * batch_size * seq_length * num_layers * hidden_size^2 * (
            (1 + num_query_groups / num_attention_heads + seq_length / hidden_size)
                * query_projection_size / hidden_size                               # attention
            + ffn_hidden_size / hidden_size * gated_linear_multiplier                # MLP (3/2 with SwiGLU)
            + padded_vocab_size / (2 * num_layers * hidden_size))                   # logits

    with query_projection_size = kv_channels * num_attention_heads. Written out here (not imported): Megatron-LM's
    training package is not part of megatron-core."""
    query_projection_size = args.kv_channels * args.num_attention_heads
    query_ratio = query_projection_size / args.hidden_size
    groups = args.num_query_groups if args.group_query_attention else args.num_attention_heads
    gated = 3 / 2 if args.swiglu else 1
    return (3 * 2 * 2 * batch_size * args.seq_length * args.num_layers * args.hidden_size * args.hidden_size * (
        (1 + groups / args.num_attention_heads + args.seq_length / args.hidden_size) * query_ratio
        + args.ffn_hidden_size / args.hidden_size * gated
        + args.padded_vocab_size / (2 * args.num_layers * args.hidden_size)))


@pytest.mark.parametrize("layers,hidden,ffn,heads,groups,vocab,seq,batch", [
    (32, 4096, 11008, 32, 32, 32000, 4096, 8),      # Llama-2-7B-like, no GQA
    (28, 3584, 18944, 28, 4, 152064, 12288, 2),     # Qwen2.5-7B decoder, GQA, 12K
    (4, 64, 176, 4, 2, 512, 96, 3),                  # the tiny test shapes
])
def test_step_flops_equal_megatron_lm_for_a_dense_gpt(layers, hidden, ffn, heads, groups, vocab, seq, batch):
    from megatron_po.flops import StepPasses, Work, step_flops
    from megatron_po.models.shapes import ModelShape, VisionFootprint
    from megatron_po.models.specs import LMShape

    lm = LMShape(layers, hidden, ffn, heads, groups, 1e-6, 1e6, vocab)
    no_vision = VisionFootprint(0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0)
    shape = ModelShape(lm, vocab, no_vision)
    # b rows of s tokens, one sequence each; Megatron's logit term applies the head at every position
    work = Work(tokens=batch * seq, positions=batch * seq, attention=batch * seq * seq, response=batch * seq)
    ours = step_flops(shape, StepPasses(live_reference=False), work.scalars())
    args = SimpleNamespace(num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn, num_attention_heads=heads,
                           num_query_groups=groups, group_query_attention=groups != heads, kv_channels=hidden // heads,
                           swiglu=True, seq_length=seq, padded_vocab_size=vocab)
    assert ours["policy"] == pytest.approx(megatron_lm_flops(args, batch), rel=1e-12)
    assert ours["total"] == ours["policy"]  # no reference, no statistics pass, no images
    # a live reference adds one forward: a third of the policy's forward + backward
    live = step_flops(shape, StepPasses(live_reference=True), work.scalars())
    assert live["reference"] == pytest.approx(ours["policy"] / 3, rel=1e-12)


def test_packed_sequences_count_their_own_attention_only():
    """Two sequences packed in one row cost s1^2 + s2^2 of attention, not (s1 + s2)^2: the count follows the
    sequences, so packing does not change a step's model FLOPs."""
    import torch

    from megatron_po.train.batch import Rows

    labels = torch.full((1, 8), -100)
    labels[0, [2, 3, 6]] = 1
    ids = torch.tensor([[0, 0, 0, 0, 1, 1, 1, -1]])
    rows = Rows(torch.zeros(1, 8, dtype=torch.long), labels, torch.zeros(1, 8, dtype=torch.long),
                torch.zeros(1, 8, dtype=torch.bool), [[]], torch.tensor([7]), ids, 2)
    w = rows.work()
    assert (w.tokens, w.positions, w.attention, w.response) == (7, 8, 4 * 4 + 3 * 3, 3)
    unpacked = Rows(torch.zeros(2, 4, dtype=torch.long), torch.full((2, 4), -100), torch.zeros(2, 4, dtype=torch.long),
                    torch.zeros(2, 4, dtype=torch.bool), [[], []], torch.tensor([4, 3]))
    assert unpacked.work().attention == w.attention


# ---- 2. torch's FlopCounterMode over one real step ---------------------------------------------------------------


def _counted_step(groups, out, overrides: list[str]):
    """One training step under FlopCounterMode; returns (counted FLOPs, our count of what the kernels execute,
    our model FLOPs, the replays the kernels run beyond our count: {"head": the log-prob stage's logits over the
    executed policy rows, "decoder": one forward of the policy's decoder and adapters over them, what full
    recompute replays})."""
    from torch.utils.flop_counter import FlopCounterMode

    from megatron_po.flops import Work, decoder_forward, step_flops
    from megatron_po.train.batch import BatchWork
    from megatron_po.train.costs import step_passes
    from megatron_po.train.loop import train_step

    run = in_process_run(groups, out, ["data.num_train=16", "data.num_eval=2", "train.global_batch_size=4",
                                       "train.micro_batch_size=2", "objective.name=dpo", "model.params_dtype=fp32",
                                       *overrides])
    with FlopCounterMode(display=False) as counter:
        train_step(run.state, run.batches, 0)
    works = [mb.work or BatchWork.of(mb) for mb in run.batches]
    shape = run.family.model_shape(run.cfg)
    passes = step_passes(run.cfg, run.objective, run.reference, run.state.step.policy_tower,
                         run.family.model_shape(run.cfg))

    def executed(w: Work, rows: int, length: int) -> Work:  # every position, and each row's whole [S, S] scores
        return Work(w.positions, w.positions, rows * length * length, w.response, w.image_tokens)

    kernels = [sum(v) for v in zip(*(executed(w.policy, w.rows, w.row_length).scalars() for w in works))]
    model = [sum(v) for v in zip(*(w.policy.scalars() for w in works))]
    forward = decoder_forward(shape, kernels[0], kernels[2], kernels[3])
    adapters = passes.adapters.layer_forward() * shape.lm.num_layers * kernels[0] if passes.adapters else 0.0
    replays = {"head": forward["head"], "decoder": forward["dense"] + forward["attention"] + adapters}
    return counter.get_total_flops(), step_flops(shape, passes, kernels), step_flops(shape, passes, model), replays


def test_flop_counter_agrees_on_a_tiny_vlm_step(groups, tmp_path):
    counted, ours, model, _ = _counted_step(groups, tmp_path, [])
    assert ours["reference"] > 0 and ours["vision"] > 0
    assert ours["total"] == pytest.approx(counted, rel=5e-3), (counted, ours)
    # the model FLOPs leave out the padding and the masked scores: fewer than the kernels ran
    assert model["total"] < ours["total"]


def test_flop_counter_agrees_on_a_packed_step(groups, tmp_path):
    counted, ours, model, _ = _counted_step(groups, tmp_path, ["data.packing=true", "train.micro_batch_size=4"])
    assert ours["total"] == pytest.approx(counted, rel=5e-3), (counted, ours)
    assert model["total"] < ours["total"]


@pytest.mark.parametrize("family", ["qwen2_5_vl", "internvl3"])
def test_flop_counter_agrees_on_a_tiny_hf_family_step(groups, tmp_path, family):
    """The HF families' towers (Qwen2.5-VL's windowed and full attention, InternViT's tiles) and projectors."""
    import hf_internvl3_fixture
    import hf_qwen2_5_vl_fixture

    from megatron_po.convert.core import hf_to_megatron

    hf = (hf_qwen2_5_vl_fixture.make_hf_dir(tmp_path / "hf") if family == "qwen2_5_vl"
          else hf_internvl3_fixture.make_checkpoint(tmp_path / "hf", "vit300m"))
    ckpt = hf_to_megatron(hf, tmp_path / "megatron", family=family)
    counted, ours, model, _ = _counted_step(groups, tmp_path / "run", [
        f"model.family={family}", f"model.hf_path={ckpt / 'hf'}", f"checkpoint.init_from={ckpt}",
        "model.max_seq_length=320"])
    assert ours["vision"] > 0
    assert ours["total"] == pytest.approx(counted, rel=5e-3), (counted, ours)
    assert model["total"] < ours["total"]


# ---- 3. A frozen base: LoRA, model.freeze_llm ---------------------------------------------------------------------


LORA = "model.lora.rank=4"


@pytest.mark.parametrize("overrides,anchor", [
    # every decoder linear adapted, DPO: no statistics pass
    ([LORA], []),
    # the MLPs and the projector: the projector's adapters make the decoder input take a gradient, the projector
    # runs its chain from the frozen tower, a statistics pass runs the adapters, and the adapters-off reference
    # encodes on its own
    ([LORA, "model.lora.target_modules=linear_fc1,linear_fc2,projector", "objective.name=beta_dpo"],
     ["objective.name=beta_dpo"]),
    # only the MLPs, nothing before the decoder trains: the first layer's attention has no backward at all
    ([LORA, "model.lora.target_modules=linear_fc1,linear_fc2"], []),
    # no adapters: a frozen LLM under a trained projector (data gradients all the way down to it)
    (["model.freeze_llm=true", "model.freeze_aligner=false"], ["model.freeze_aligner=false"]),
    # full recompute: models/lora.py makes the decoder's input take a gradient (the checkpoints need one), so the
    # first layer's data gradients run; the kernels also replay each layer's forward (not model FLOPs)
    ([LORA, "model.recompute=full"], ["model.recompute=full"]),
], ids=["lora", "lora_mlp_projector_stats", "lora_mlp", "freeze_llm", "lora_recompute_full"])
def test_flop_counter_agrees_on_a_frozen_base_step(groups, tmp_path, overrides, anchor):
    """A frozen base computes input gradients only (megatron's LinearWithFrozenWeight; the fused log-prob stage's
    `needs_input_grad`), the adapters their own two GEMMs three times, and the reference is the base's forward.
    Adding the log-prob stage's backward replay of the logits (module docstring), and under full recompute the
    decoder's, the count is exact."""
    counted, ours, model, replays = _counted_step(groups, tmp_path, overrides)
    _, full, _, _ = _counted_step(groups, tmp_path / "anchor", anchor)
    assert ours["reference"] == full["reference"] > 0  # a reference model, or the policy with its adapters off
    replayed = replays["head"] + (replays["decoder"] if "model.recompute=full" in overrides else 0.0)
    assert ours["total"] + replayed == pytest.approx(counted, rel=5e-3), (counted, ours)
    assert model["total"] < ours["total"]
    # no weight gradients for the base: its policy pass is about 2/3 of a trained one's
    assert ours["policy"] < 0.8 * full["policy"]


def test_frozen_base_policy_pass_is_forward_and_data_gradient():
    """On a dense GPT whose every linear carries an adapter: policy = 2 x forward of the GEMMs and head, 3 x the
    attention core, 3 x the adapters' forward, less the first layer's input gradients (nothing before it trains)."""
    from megatron_po.config import LoraConfig
    from megatron_po.flops import StepPasses, Work, decoder_forward, decoder_linears, lora_adapters, step_flops
    from megatron_po.models.shapes import ModelShape, VisionFootprint
    from megatron_po.models.specs import LMShape

    lm = LMShape(28, 3584, 18944, 28, 4, 1e-6, 1e6, 152064)
    shape = ModelShape(lm, 152064, VisionFootprint(0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0))
    adapters = lora_adapters(LoraConfig(rank=16), shape)
    work = Work(tokens=2 * 4096, positions=2 * 4096, attention=2 * 4096**2, response=2 * 1024)
    tokens, attention, response = work.tokens, work.attention, work.response
    passes = StepPasses(live_reference=True, frozen_base=True, adapters=adapters, decoder_input_grad=False)
    got = step_flops(shape, passes, work.scalars())
    parts = decoder_forward(shape, tokens, attention, response)
    qkv = decoder_linears(lm)[0]
    first_layer_input_grads = (qkv.gemm_flops() + qkv.adapter_flops(16)[0]) * tokens
    adapters_forward = adapters.layer_forward() * lm.num_layers * tokens
    expected = (2 * (parts["dense"] + parts["head"]) + 3 * parts["attention"] + 3 * adapters_forward
                - first_layer_input_grads)
    assert got["policy"] == pytest.approx(expected, rel=1e-12)
    assert got["reference"] == pytest.approx(sum(parts.values()), rel=1e-12)  # the base's forward
    full = step_flops(shape, StepPasses(live_reference=True), work.scalars())
    assert 0.6 < got["policy"] / full["policy"] < 0.75  # at 4K tokens the attention core keeps its 3 passes
