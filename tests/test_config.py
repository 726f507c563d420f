"""Typed config: YAML + dotted overrides, unknown keys and bad values named, layout checks."""

import subprocess
from pathlib import Path
import sys

import pytest
import yaml

from megatron_po.config import ConfigError, apply_overrides, config_from_dict, load_config
from megatron_po.objectives import build_objective_config


@pytest.mark.pure
def test_overrides_reach_nested_fields_with_types(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("parallel:\n  tp: 2\noptim:\n  lr: 1e-3\n")  # PyYAML reads 1e-3 as a string: still a float
    cfg = load_config(f, ["parallel.sp=true", "train.train_steps=7", "objective.params.beta=0.2"])
    assert (cfg.parallel.tp, cfg.parallel.sp, cfg.train.train_steps) == (2, True, 7)
    assert cfg.optim.lr == pytest.approx(1e-3) and isinstance(cfg.optim.lr, float)
    assert cfg.objective.params == {"beta": 0.2}


@pytest.mark.pure
@pytest.mark.parametrize("data, needle", [
    ({"parallel": {"tpp": 2}}, "parallel.tpp"),
    ({"modle": {}}, "modle"),
    ({"model": {"vision": {"patch": 4}}}, "model.vision.patch"),
    ({"train": {"train_steps": "ten"}}, "train.train_steps"),
    ({"parallel": {"sp": "yes"}}, "parallel.sp"),
    ({"parallel": {"sp": True}}, "parallel.sp"),  # sp without tp > 1
    ({"optim": {"lr": -1.0}}, "optim.lr"),
    ({"model": {"vision": {"image_size": 30, "patch_size": 8}}}, "image_size"),
    ({"parallel": {"pp_layers_first": 1}}, "parallel.pp_layers_first"),  # without pp > 1
    ({"parallel": {"pp": 2}, "model": {"num_layers": 3}}, "do not split over parallel.pp=2"),
    ({"parallel": {"pp": 3, "pp_layers_first": 1}, "model": {"num_layers": 4}}, "pp_layers_first=1"),
    ({"parallel": {"pp": 2, "pp_layers_first": 1, "pp_layers_last": 1}, "model": {"num_layers": 3}}, "!= 3 layers"),
    ({"reference": {"source": "cache"}}, "reference.cache_path"),
    ({"reference": {"source": "disk"}}, "reference.source"),
])
def test_bad_config_is_named(data, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        config_from_dict(data)


@pytest.mark.pure
def test_objective_hparams_validated_by_name():
    with pytest.raises(ValueError, match="betta"):
        build_objective_config("acpo", {"betta": 0.1})
    with pytest.raises(ValueError, match="beta"):
        build_objective_config("dpo", {"beta": 0.0})
    with pytest.raises(ValueError, match="clip"):
        build_objective_config("acpo", {"clip_lo": 0.9, "clip_hi": 0.3})
    with pytest.raises(ValueError, match="unknown objective"):
        build_objective_config("dpoo", {})


@pytest.mark.pure
def test_world_layout_checked():
    cfg = config_from_dict({"parallel": {"tp": 2}, "train": {"global_batch_size": 8, "micro_batch_size": 2}})
    assert cfg.validate_world(4) == 2
    with pytest.raises(ConfigError, match="not divisible"):
        cfg.validate_world(3)
    with pytest.raises(ConfigError, match="global_batch_size"):
        config_from_dict({"train": {"global_batch_size": 6, "micro_batch_size": 2}}).validate_world(8)


@pytest.mark.pure
def test_override_syntax_error():
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["parallel.tp"])


@pytest.mark.pure
def test_yaml_is_not_evaluated(tmp_path):
    """Config text is data: a YAML tag that would call Python (here `open(path, "w")`, which creates a file) is
    refused by yaml.safe_load naming the tag, in a config file and in a dotted override, and nothing runs."""
    target = tmp_path / "created_by_yaml"
    call = f'!!python/object/apply:builtins.open ["{target}", "w"]'
    refused = r"could not determine a constructor for the tag 'tag:yaml\.org,2002:python/object/apply:builtins\.open'"
    f = tmp_path / "evil.yaml"
    f.write_text(f"output_dir: {call}\n")
    with pytest.raises(yaml.constructor.ConstructorError, match=refused):
        load_config(f)
    with pytest.raises(yaml.constructor.ConstructorError, match=refused):
        load_config(None, [f"output_dir={call}"])
    assert not target.exists(), "the YAML was evaluated"


@pytest.mark.e2e
def test_dry_run_cli_validates_without_processes(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "megatron_po.train", "--dry-run", "--world-size", "4",
                         "parallel.tp=2", "parallel.sp=true"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "dp=2" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "megatron_po.train", "--dry-run", "parallel.tq=2"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "parallel.tq" in bad.stderr


@pytest.mark.pure
@pytest.mark.parametrize("model, extra, match", [
    ({"family": "qwen2_5_vl"}, {}, "model.hf_path is required"),
    ({"family": "tiny_vlm", "hf_path": "x"}, {}, "model.hf_path is required"),
    ({"family": "internvl3", "hf_path": "x"}, {}, "needs checkpoint.init_from"),
    ({"family": "llava"}, {}, "model.family 'llava' unknown"),
])
def test_hf_family_settings_are_checked(model, extra, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict({"model": model, **extra})


@pytest.mark.pure
def test_example_internvl3_config_validates():
    cfg = load_config(Path(__file__).resolve().parents[1] / "launch/configs/acpo_internvl3_8b_example.yaml")
    assert cfg.model.family == "internvl3" and cfg.checkpoint.init_from and cfg.model.hf_path


@pytest.mark.pure
def test_pipeline_stage_layers():
    """The split megatron builds (get_num_layers_to_build), named before any model exists."""
    from megatron_po.config import ParallelConfig

    assert ParallelConfig(pp=2).stage_layers(4) == [2, 2]
    assert ParallelConfig(pp=2, pp_layers_first=1).stage_layers(3) == [1, 2]
    assert ParallelConfig(pp=4, pp_layers_first=1, pp_layers_last=3).stage_layers(10) == [1, 3, 3, 3]
    assert ParallelConfig(pp=8, pp_layers_first=6, pp_layers_last=8).stage_layers(80) == [6] + [11] * 6 + [8]


@pytest.mark.pure
@pytest.mark.parametrize("warmup", [0, 3])
def test_linear_schedule_equals_transformers(warmup):
    """optim.lr_schedule=linear with min_lr 0 is TRL's default schedule (transformers'
    get_linear_schedule_with_warmup), step for step as the loop steps megatron's scheduler."""
    transformers = pytest.importorskip("transformers")
    import torch

    from megatron_po.train.loop import build_scheduler

    cfg = load_config(None, ["optim.lr_schedule=linear", "optim.min_lr=0", "optim.lr=5e-6",
                             f"optim.warmup_steps={warmup}", "train.train_steps=10"])
    ours = build_scheduler(cfg, torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=5e-6))
    ref_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=5e-6)
    ref = transformers.get_linear_schedule_with_warmup(ref_opt, warmup, 10)
    for _ in range(10):  # the lr each optimizer step uses, then the loop's scheduler.step(increment=1)
        assert ours.optimizer.param_groups[0]["lr"] == pytest.approx(ref_opt.param_groups[0]["lr"], abs=1e-15)
        ours.step(increment=1)
        ref_opt.step()
        ref.step()


@pytest.mark.pure
def test_lr_schedule_and_warmup_are_checked():
    with pytest.raises(ConfigError, match="optim.lr_schedule must be"):
        load_config(None, ["optim.lr_schedule=step"])
    with pytest.raises(ConfigError, match="optim.warmup_steps=20 must be < train.train_steps=20"):
        load_config(None, ["optim.warmup_steps=20", "train.train_steps=20"])


@pytest.mark.e2e
def test_a_job_says_once_that_te_and_apex_are_missing(tmp_path):
    """megatron's ~7 import-time notes per rank become one line per job; a bad key is one `config error:` line."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    run = subprocess.run([sys.executable, "-m", "megatron_po.train", f"output_dir={tmp_path}", "train.train_steps=1",
                          "data.num_train=8", "data.num_eval=2", "train.global_batch_size=2",
                          "train.micro_batch_size=2", "train.progress_bar=false", "checkpoint.save=false"],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Apex is not installed" not in run.stderr and "UserWarning: Transformer Engine" not in run.stderr
    assert run.stderr.count("Transformer-Engine and Apex are not installed") == 1
    bad = subprocess.run([sys.executable, "-m", "megatron_po.train", "objective.params.bogus=1"],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert [ln for ln in bad.stderr.splitlines() if ln.strip()] == [
        ln for ln in bad.stderr.splitlines() if ln.startswith("config error: objective 'acpo' has no hyper-parameter")]


@pytest.mark.pure
def test_epochs_set_the_steps_from_the_data():
    from megatron_po.train.loop import with_epochs

    cfg = load_config(None, ["train.epochs=2", "train.global_batch_size=8", "train.micro_batch_size=2",
                             "optim.warmup_steps=3"])
    assert with_epochs(cfg, 24).train.train_steps == 6 and cfg.train.train_steps == 20  # the given cfg untouched
    assert with_epochs(load_config(None, []), 24).train.train_steps == 20  # epochs=0: train_steps as given
    with pytest.raises(ValueError, match="warmup_steps=3 must be < the 2 steps of train.epochs=1"):
        with_epochs(load_config(None, ["train.epochs=1", "train.global_batch_size=8", "optim.warmup_steps=3"]), 16)
