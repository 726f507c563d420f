"""Options users expect from Megatron-SWIFT / TRL: freezing named the same for every family, Weights & Biases
logging (stubbed: no network, no wandb package in CI)."""

from __future__ import annotations

import importlib.util
import json
import sys
import types

import pytest
import torch

from megatron_po.config import ConfigError, load_config
from megatron_po.models.base import VLMBase
from megatron_po.train.metrics import MetricsWriter


class _Parts(torch.nn.Module):
    """The three parts every family's model has (tiny_vlm, InternVL3, Qwen2.5-VL all derive from VLMBase)."""

    freeze_as_configured = VLMBase.freeze_as_configured

    def __init__(self):
        super().__init__()
        self.vision, self.projector, self.language_model = (torch.nn.Linear(2, 2) for _ in range(3))


@pytest.mark.parametrize("switches, trained", [
    ([], {"language_model"}),
    (["model.freeze_vit=false"], {"vision", "language_model"}),
    (["model.freeze_llm=true", "model.freeze_aligner=false"], {"projector"}),
    (["model.freeze_llm=true", "model.freeze_vit=false", "model.freeze_aligner=false"], {"vision", "projector"}),
])
def test_freeze_switches_pick_the_trained_parts(switches, trained):
    parts = _Parts()
    parts.freeze_as_configured(load_config(None, switches).model)
    assert {n.split(".")[0] for n, p in parts.named_parameters() if p.requires_grad} == trained


@pytest.mark.parametrize("switches, match", [
    (["model.freeze_llm=true"], "nothing would train"),
    (["model.freeze_llm=true", "model.freeze_aligner=false", "parallel.pp=2", "model.num_layers=2"],
     "stages after the first hold only frozen decoder layers"),
])
def test_freeze_settings_that_cannot_train_are_refused(switches, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, switches)


def test_all_families_take_the_same_switches():
    # one implementation: every family's model class is a VLMBase and calls freeze_as_configured when built
    from megatron_po.models import internvl3, qwen2_5_vl
    from megatron_po.models.tiny_vlm import model as tiny

    for cls in (tiny.VLMModel, internvl3.InternVL3Model, qwen2_5_vl.Qwen25VLModel):
        assert issubclass(cls, VLMBase)
        assert "freeze_as_configured" in cls.__init__.__code__.co_names, cls


class _FakeRun:
    def __init__(self, calls, **kwargs):
        self.calls = calls
        calls.append(("init", kwargs))

    def log(self, scalars, step):
        self.calls.append(("log", step, scalars))

    def finish(self):
        self.calls.append(("finish",))


def test_wandb_logs_every_step_and_a_resume_continues_the_run(tmp_path, monkeypatch):
    calls, ids = [], iter(["run-a", "run-b"])
    stub = types.SimpleNamespace(init=lambda **kw: _FakeRun(calls, **kw),
                                 util=types.SimpleNamespace(generate_id=lambda: next(ids)))
    monkeypatch.setitem(sys.modules, "wandb", stub)
    config = {"objective": {"name": "dpo"}}
    settings = {"project": "po", "run_name": "", "config": config}
    w = MetricsWriter(tmp_path, 3, 0, True, False, wandb=settings)
    w.log({"step": 1, "loss": 0.69, "lr": 1e-4, "note": "text"})
    w.close()
    assert calls[0] == ("init", {"project": "po", "name": tmp_path.name, "id": "run-a", "resume": "allow",
                                 "dir": str(tmp_path), "config": config})
    assert calls[1:] == [("log", 1, {"loss": 0.69, "lr": 1e-4}), ("finish",)]
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["loss"] == 0.69
    MetricsWriter(tmp_path, 3, 1, True, False, wandb=settings).close()  # the resumed job
    assert calls[3][1]["id"] == "run-a"
    calls.clear()
    MetricsWriter(tmp_path / "off", 3, 0, True, False, wandb={"project": ""}).close()
    assert calls == []


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_wandb_without_the_package_is_a_config_error():
    with pytest.raises(ConfigError, match=r"train.wandb_project needs the wandb package"):
        load_config(None, ["train.wandb_project=po"])
