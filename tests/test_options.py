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

pytestmark = pytest.mark.pure


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


PARTS = ("vision", "projector", "language_model")
SWITCHES = [  # each switch moved from its default alone, then all three (freeze_llm alone would train nothing)
    pytest.param([], {"language_model"}, id="defaults"),
    pytest.param(["model.freeze_vit=false"], {"vision", "language_model"}, id="vit"),
    pytest.param(["model.freeze_aligner=false"], {"projector", "language_model"}, id="aligner"),
    pytest.param(["model.freeze_llm=true", "model.freeze_aligner=false"], {"projector"}, id="aligner_only"),
    pytest.param(["model.freeze_vit=false", "model.freeze_aligner=false"], set(PARTS), id="all"),
]


@pytest.fixture(scope="module")
def family_settings(tmp_path_factory) -> dict[str, list[str]]:
    """The overrides that build each family's model: tiny_vlm from the config, the HF families from the tiny
    random checkpoints of tests/hf_*_fixture.py (built once for the module)."""
    settings = {"tiny_vlm": []}
    if importlib.util.find_spec("transformers") is not None:
        import hf_internvl3_fixture
        import hf_qwen2_5_vl_fixture

        root = tmp_path_factory.mktemp("families")
        for family, hf in (("internvl3", hf_internvl3_fixture.make_checkpoint(root / "internvl3", "vit300m")),
                           ("qwen2_5_vl", hf_qwen2_5_vl_fixture.make_hf_dir(root / "qwen2_5_vl"))):
            settings[family] = [f"model.family={family}", f"model.hf_path={hf}", f"checkpoint.init_from={root}"]
    return settings


@pytest.mark.parametrize("family", ["tiny_vlm", "internvl3", "qwen2_5_vl"])
@pytest.mark.parametrize("switches, trained", SWITCHES)
def test_every_family_trains_exactly_the_parts_the_switches_name(family_settings, groups, family, switches, trained):
    """Built as the trainer builds it (the family's spec), every parameter of a part named trained has
    requires_grad and no other parameter has: the same three switches mean the same for every family."""
    from megatron_po.families import family_spec

    if family not in family_settings:
        pytest.skip("transformers is not installed (the [hf] extra)")
    cfg = load_config(None, [*family_settings[family], *switches])
    model = family_spec(family).build_model(cfg, groups, 256)
    by_part: dict[str, set[bool]] = {}
    for name, param in model.named_parameters():
        by_part.setdefault(name.split(".")[0], set()).add(param.requires_grad)
    assert set(by_part) == set(PARTS), by_part.keys()  # every parameter belongs to one of the three parts
    assert {part: flags == {True} for part, flags in by_part.items()} == {part: part in trained for part in PARTS}
    assert all(len(flags) == 1 for flags in by_part.values()), by_part  # no part half frozen


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
