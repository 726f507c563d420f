"""LoRA in one process: adapters start as a no-op, switch off to the base, train alone, and are what a checkpoint
holds; the configuration refuses what would make the adapters-off reference differ from the base.

The layouts (TP, SP, PP, DP, packed, cache) are compared with a plain-torch LoRA replica in tests/test_layouts.py.
"""

from __future__ import annotations

import json

import pytest
import torch

from megatron_po.config import ConfigError, load_config
from megatron_po.models.lora import LoraAdapter, adapters, adapters_off, is_adapter_param
from megatron_po.train.checkpoint import BASE, _model_sd, check_lora_base, load_model_weights
from megatron_po.train.step import run_logps_pass
from train_state import in_process_run

pytestmark = pytest.mark.pure

LORA = ["model.lora.rank=4", "model.lora.alpha=8", "data.num_train=16", "data.num_eval=2",
        "train.global_batch_size=4", "train.micro_batch_size=2", "objective.name=dpo"]


@pytest.fixture(scope="module")
def run(groups, tmp_path_factory):
    return in_process_run(groups, tmp_path_factory.mktemp("lora"), LORA)


@pytest.fixture(scope="module")
def base(run, groups):
    """The policy's base built on its own, without LoRA (same seed): what the reference must equal."""
    from megatron_po.train.models import build_initial_model

    return build_initial_model(run.cfg, run.family, groups, run.state.policy.module.language_model.vocab_size)


def logps(model, batches, groups, tower_key="policy"):
    from megatron_po.train.step import Tower

    for mb in batches:
        mb.image_embeds.clear()
    return torch.cat([x.seq for x in run_logps_pass(groups, model, batches, Tower(tower_key, frozen=True))])


def set_b(policy, value: float) -> None:
    with torch.no_grad():
        for a in adapters(policy):
            torch.manual_seed(len(a.lora_b))
            a.lora_b.copy_(torch.randn_like(a.lora_b) * value)


def test_reference_is_the_policy_with_adapters_off(run):
    assert run.cfg.reference.source == "adapters_off"
    assert run.reference.adapters_off and run.reference.model is run.state.policy.module


def test_adapters_start_as_a_no_op_and_switch_off_to_the_base(run, base, groups):
    policy = run.state.policy.module
    assert len(adapters(policy)) == 4 * len(policy.language_model.decoder.layers)
    want = logps(base, run.batches, groups)
    assert torch.equal(logps(policy, run.batches, groups), want)  # B = 0: bit for bit
    set_b(policy, 0.05)
    try:
        assert not torch.allclose(logps(policy, run.batches, groups), want)
        with adapters_off(policy):
            assert torch.equal(logps(policy, run.batches, groups), want)
        # the trainer's reference source: the base's log-probs while the policy's adapters are on
        run.reference.fill(run.batches)
        assert torch.equal(torch.cat([mb.ref_logps.seq for mb in run.batches]), want)
        assert all(a.enabled for a in adapters(policy))  # switched back on after the pass
    finally:
        set_b(policy, 0.0)


def test_only_adapters_train_and_a_checkpoint_holds_only_them(run):
    policy = run.state.policy.module
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all(is_adapter_param(n) for n in trainable)
    optimized = {id(p) for g in run.state.optimizer.param_groups for p in g["params"]}
    assert optimized == {id(p) for n, p in policy.named_parameters() if p.requires_grad}
    keys = set(_model_sd(policy))
    assert keys == {f"model.{n}" for n in trainable}


def test_a_is_the_same_in_every_layout_and_b_starts_at_zero(run):
    from megatron_po.models.lora import init_a

    a = next(m for m in run.state.policy.module.modules() if isinstance(m, LoraAdapter))
    assert torch.equal(a.lora_b, torch.zeros_like(a.lora_b))
    name = "language_model.decoder.layers.0.self_attention.linear_qkv"
    assert torch.equal(a.lora_a, init_a(4, a.lora_a.shape[1], name, run.cfg.train.seed))


@pytest.mark.parametrize("overrides, message", [
    (["model.lora.rank=4", "model.freeze_aligner=false"], "freeze_vit and freeze_aligner true"),
    (["model.lora.rank=4", "model.freeze_llm=true"], "freeze_llm false"),
    (["reference.source=adapters_off"], "needs model.lora.rank > 0"),
    (["model.lora.rank=4", "model.lora.target_modules=linear_qkv,q_proj"], "unknown ['q_proj']"),
    (["model.lora.rank=-1"], "rank must be >= 0"),
])
def test_config_refuses(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(None, overrides)


def test_reference_source_resolves_per_lora():
    assert load_config(None, []).reference.source == "model"
    assert load_config(None, ["model.lora.rank=8"]).reference.source == "adapters_off"
    assert load_config(None, ["model.lora.rank=8", "reference.source=model"]).reference.source == "model"


def test_base_identity_names_the_base_and_changes_with_it(tmp_path):
    from megatron_po.families import family_spec
    from megatron_po.train.models import base_identity

    family = family_spec("tiny_vlm")
    assert base_identity(load_config(None, []), family) is None
    seeded = base_identity(load_config(None, ["model.lora.rank=8"]), family)
    assert seeded["init_from"] == "" and seeded["adapters"]["rank"] == 8
    assert base_identity(load_config(None, ["model.lora.rank=8", "train.seed=2"]), family)["key"] != seeded["key"]
    ckpt = tmp_path / "base"
    ckpt.mkdir()
    (ckpt / "weights.distcp").write_bytes(b"\0" * (3 << 20))
    one = base_identity(load_config(None, ["model.lora.rank=8", f"checkpoint.init_from={ckpt}"]), family)
    with open(ckpt / "weights.distcp", "r+b") as f:  # other weights: the last MiB differs
        f.seek((3 << 20) - 10)
        f.write(b"x")
    two = base_identity(load_config(None, ["model.lora.rank=8", f"checkpoint.init_from={ckpt}"]), family)
    assert one["init_from"] == str(ckpt) and one["key"] != two["key"]


def test_resume_refuses_another_base_or_a_lora_mismatch(tmp_path):
    base = {"init_from": "/ckpt/a", "key": "k1", "adapters": {"rank": 8}}
    check_lora_base(tmp_path, base, dict(base))
    check_lora_base(tmp_path, None, None)
    with pytest.raises(ValueError, match="trained on base /ckpt/a .*this run's base is /ckpt/b"):
        check_lora_base(tmp_path, base, base | {"init_from": "/ckpt/b", "key": "k2"})
    with pytest.raises(ValueError, match=r"\[adapters"):
        check_lora_base(tmp_path, base, base | {"adapters": {"rank": 16}})
    with pytest.raises(ValueError, match="holds LoRA adapters; this run has none"):
        check_lora_base(tmp_path, base, None)
    with pytest.raises(ValueError, match="holds full weights"):
        check_lora_base(tmp_path, None, base)


def test_init_from_an_adapters_only_checkpoint_is_refused(tmp_path):
    (tmp_path / "trainer_state.json").write_text(json.dumps({"step": 2, BASE: {"init_from": ""}}))
    with pytest.raises(ValueError, match="holds LoRA adapters only"):
        load_model_weights(tmp_path, torch.nn.Linear(1, 1))


def test_each_adapter_adds_its_formula(groups):
    """On the local spec, every adapted linear's output moves by exactly (α/r)·B A x (tests/dist/lora_delta_worker.py,
    which tests/test_gpu.py runs on the Transformer-Engine spec, where x is first put through the fused norm)."""
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("lora_delta_worker", REPO / "tests" / "dist" / "lora_delta_worker.py")
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    r = worker.delta_errors(groups, "local")
    assert r["worst_rel"] < 1e-5 and set(r["linears"].values()) == {"column", "row"}, r
