"""A checkpoint written by the local layer spec (every converted HF checkpoint is) loads into a model built with
the Transformer-Engine spec, whose modules add `_extra_state` entries (FP8 metadata) to their state; and the
uninitialised build used when checkpoint.init_from overwrites the weights loads them exactly."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from megatron.core import dist_checkpointing

from megatron_po.config import load_config
from megatron_po.models.tiny_vlm.model import build_vlm
from megatron_po.train.checkpoint import load_model_weights

pytestmark = pytest.mark.pure


class FP8Meta(torch.nn.Module):
    """Stands in for a TE module's extra state (TE cannot be installed on a CPU machine): torch puts
    `<name>._extra_state` into the state dict and megatron a ShardedObject into the sharded one, as for TE."""

    def __init__(self):
        super().__init__()
        self.restored = None

    def get_extra_state(self):
        return torch.tensor([7.0])

    def set_extra_state(self, state):
        self.restored = state


def _te_shaped(model):
    for layer in model.language_model.decoder.layers:
        layer.self_attention.fp8_meta = FP8Meta()
        layer.fp8_meta = FP8Meta()
    return model


def _save(model, path):
    path.mkdir()
    dist_checkpointing.save({"model": model.sharded_state_dict(prefix="model.")}, str(path))


@pytest.fixture
def cfg():
    return load_config(None, ["parallel.backend=gloo"])


def test_local_spec_checkpoint_loads_into_te_shaped_model(groups, cfg, tmp_path):
    source = build_vlm(cfg.model, cfg.parallel, 256, groups, seed=3)
    _save(source, tmp_path / "ckpt")
    target = _te_shaped(build_vlm(cfg.model, cfg.parallel, 256, groups, seed=4))
    assert any(k.endswith("_extra_state") for k in target.state_dict())
    load_model_weights(tmp_path / "ckpt", target)
    theirs = target.state_dict()
    for name, t in source.state_dict().items():
        if torch.is_tensor(t):
            assert torch.equal(t, theirs[name]), name
    # the TE modules keep their own (fresh) extra state
    assert all(m.restored is not None for m in target.modules() if isinstance(m, FP8Meta))


def test_a_missing_weight_is_still_an_error(groups, cfg, tmp_path):
    """Only `_extra_state` may be absent: a checkpoint without a real weight of the model is refused."""
    source = build_vlm(cfg.model, cfg.parallel, 256, groups, seed=3)
    (tmp_path / "ckpt").mkdir()
    sd = source.sharded_state_dict(prefix="model.")
    del sd["model.language_model.decoder.final_layernorm.weight"]
    dist_checkpointing.save({"model": sd}, str(tmp_path / "ckpt"))
    target = _te_shaped(build_vlm(cfg.model, cfg.parallel, 256, groups, seed=4))
    with pytest.raises(RuntimeError, match="lacks 1 tensor.*final_layernorm"):
        load_model_weights(tmp_path / "ckpt", target)


def test_uninitialised_build_then_load_equals_the_source(groups, cfg, tmp_path):
    """With checkpoint.init_from the model is allocated on the device without initialisation
    (models/init.uninitialised, model.init_weights=false): megatron's init path still runs with a no-op init, so the
    sharded weights keep their tensor-parallel tags (without them the gradient norm dropped the other TP ranks'
    shards), and loading fills everything that matters: the logits equal the source model's."""
    from megatron_po.models.init import uninitialised
    from megatron_po.models.specs import skip_init

    source = build_vlm(cfg.model, cfg.parallel, 256, groups, seed=3)
    _save(source, tmp_path / "ckpt")
    with uninitialised(torch.device("cpu")):
        target = build_vlm(dataclasses.replace(cfg.model, init_weights=False), cfg.parallel, 256, groups, seed=4)
    assert target.language_model.config.init_method is skip_init
    tags = {n: getattr(p, "tensor_model_parallel", False) for n, p in source.named_parameters()}
    assert tags == {n: getattr(p, "tensor_model_parallel", False) for n, p in target.named_parameters()}
    assert sum(tags.values()) > 10
    load_model_weights(tmp_path / "ckpt", target)
    seq = 24
    tokens = torch.randint(0, 256, (2, seq))
    images = torch.rand(2, 3, cfg.model.vision.image_size, cfg.model.vision.image_size)
    out = []
    for m in (source, target):
        m.eval()
        with torch.no_grad():
            embeds = m.encode_images(images)
            mask = torch.zeros(2, seq, dtype=torch.bool)
            mask[:, 1:1 + cfg.model.vision.num_patches] = True
            causal = torch.triu(torch.ones(seq, seq, dtype=torch.bool), 1)[None, None]
            out.append(m(tokens, torch.arange(seq).expand(2, seq), causal, embeds.flatten(0, 1), mask))
    assert torch.equal(out[0], out[1])


def test_uninitialised_skips_torch_init_and_restores_it(monkeypatch):
    """Torch modules built inside (the HF vision towers) never run torch.nn.init; outside they do again."""
    from megatron_po.models.init import uninitialised

    calls = []
    real = torch.nn.init.kaiming_uniform_
    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.init, "kaiming_uniform_", counted)
    with uninitialised(torch.device("cpu")):
        torch.nn.Linear(8, 4)
    assert calls == []
    torch.nn.Linear(8, 4)
    assert calls  # torch.nn.Linear initialises again once outside
