"""LoRA preference runs of the real driver under torchrun: from a full-weight SFT checkpoint (the base) on the
embedded task, and from both HF families' tiny converted fixtures.

The base is checkpoint.init_from; the reference is the policy with its adapters off; checkpoints hold the adapters
and name the base; a resume equals the straight run bit for bit, reshards to another layout, and refuses another
base or a run without LoRA.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from conftest import REPO, assert_metrics_equal, read_metrics, run_python, run_torchrun

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

COMMON = ["train.progress_bar=false", "data.num_train=32", "data.num_eval=4", "train.global_batch_size=4",
          "train.micro_batch_size=2", "parallel.tp=2", "parallel.sp=true", "eval.interval=0"]
LORA = ["model.lora.rank=8", "model.lora.alpha=16", "objective.name=acpo", "train.train_steps=4", "optim.lr=1e-2",
        "eval.interval=4", "eval.max_pairs=4", "eval.probe_images=4"]


def train(out: Path, *overrides: str) -> str:
    return run_torchrun(["-m", "megatron_po.train", f"output_dir={out}", *COMMON, *overrides])


def ckpt(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"iter_{step:07d}"


def checkpoint_keys(path: Path) -> set[str]:
    """The model tensors a dist_checkpointing directory holds (from its metadata, nothing unpickled)."""
    from torch.distributed.checkpoint import FileSystemReader

    return {k for k in FileSystemReader(str(path)).read_metadata().state_dict_metadata if k.startswith("model.")}


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    """Full-weight SFT, checkpoints after steps 1 and 2: the bases."""
    out = tmp_path_factory.mktemp("sft")
    train(out, "objective.name=sft", "train.train_steps=2", "checkpoint.save_interval=1")
    return out


@pytest.fixture(scope="module")
def base(sft) -> list[str]:
    return [f"checkpoint.init_from={ckpt(sft, 2)}", f"data.tokenizer_path={sft / 'data' / 'tokenizer.model'}"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, base):
    out = tmp_path_factory.mktemp("lora_straight")
    train(out, *base, *LORA)
    return out


@pytest.fixture(scope="module")
def half(tmp_path_factory, base):
    out = tmp_path_factory.mktemp("lora_half")
    train(out, *base, *LORA, "train.exit_interval=2")
    return out


def test_lora_acpo_from_a_base_checkpoint(straight, sft):
    m = read_metrics(straight)[1:]  # [0]: the step-0 evaluation
    assert [r["step"] for r in m] == [1, 2, 3, 4]
    # the reference is the base: step 1's policy equals it bit for bit
    assert m[0]["loss"] == pytest.approx(math.log(2), abs=1e-12) and m[0]["reference/step0_max_gap"] == 0.0
    assert m[-1]["loss"] < m[0]["loss"]
    keys = checkpoint_keys(ckpt(straight, 4))
    assert keys and all(k.endswith(("_lora.lora_a", "_lora.lora_b")) for k in keys), sorted(keys)[:5]
    state = json.loads((ckpt(straight, 4) / "trainer_state.json").read_text())
    assert state["lora_base"]["init_from"] == str(ckpt(sft, 2)) and state["lora_base"]["adapters"]["rank"] == 8
    # adapters only: the checkpoint is a small fraction of the base's
    size = lambda d: sum(p.stat().st_size for p in d.rglob("*.distcp"))  # noqa: E731
    assert size(ckpt(straight, 4)) < 0.5 * size(ckpt(sft, 2))


def test_resume_equals_the_straight_run(tmp_path, straight, half, base):
    resumed = shutil.copytree(half, tmp_path / "resumed")
    assert "resumed from" in train(resumed, *base, *LORA)
    assert_metrics_equal(read_metrics(straight), read_metrics(resumed))


def test_resume_reshards_the_adapters_to_another_layout(tmp_path, half, base):
    resumed = shutil.copytree(half, tmp_path / "tp1")
    assert "resumed from" in train(resumed, *base, *LORA, "parallel.tp=1", "parallel.sp=false", "parallel.pp=2")
    assert [r["step"] for r in read_metrics(resumed)] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("change, message", [
    ("other_base", "its adapters were trained on base .*iter_0000002 .*this run's base is .*iter_0000001"),
    ("no_lora", "holds LoRA adapters; this run has none"),
])
def test_resume_refuses_another_base(tmp_path, half, base, sft, change, message):
    resumed = shutil.copytree(half, tmp_path / change)
    overrides = [*base, *LORA]
    if change == "other_base":
        overrides[0] = f"checkpoint.init_from={ckpt(sft, 1)}"
    else:
        overrides = [*base, "objective.name=acpo", "train.train_steps=4"]
    with pytest.raises(pytest.fail.Exception, match=message):
        train(resumed, *overrides)


def test_eval_scores_the_trained_policy_and_a_stage_refuses_it_as_a_base(tmp_path, straight, base):
    """`megatron-po eval` of a LoRA checkpoint builds its base (the checkpoint names it) with the trained adapters:
    its held-out scores are the run's own at that step; a training stage cannot start from adapters alone."""
    policy = [*base[1:], f"checkpoint.init_from={ckpt(straight, 4)}", *LORA[2:]]
    text = run_torchrun(["-m", "megatron_po.cli", "eval", f"output_dir={tmp_path / 'eval'}", *COMMON, *policy])
    scored, _ = json.JSONDecoder().raw_decode(text[text.index("{\n"):])
    run = read_metrics(straight)[-1]
    # (Δlog p is against the run's step 0, which a lone evaluation does not have)
    shared = [k for k in scored if k.startswith("eval/") and "delta" not in k and k in run]
    assert len(shared) >= 4, sorted(scored)
    for k in shared:
        assert scored[k] == pytest.approx(run[k], rel=1e-6, abs=1e-7), k
    with pytest.raises(pytest.fail.Exception, match="holds LoRA adapters only: start from the merged model"):
        train(tmp_path / "stage", *policy, "model.lora.rank=0")


@pytest.mark.parametrize("family", ["qwen2_5_vl", "internvl3"])
def test_lora_dpo_on_hf_families(tmp_path, family):
    import hf_internvl3_fixture
    import hf_qwen2_5_vl_fixture

    pytest.importorskip("transformers")
    hf = (hf_qwen2_5_vl_fixture.make_hf_dir(tmp_path / "hf") if family == "qwen2_5_vl"
          else hf_internvl3_fixture.make_checkpoint(tmp_path / "hf", "vit300m"))
    converted = tmp_path / "megatron"
    run_python([str(REPO / "tools" / "convert_hf.py"), "hf-to-megatron", str(hf), str(converted), "--family", family])
    out = tmp_path / "run"
    train(out, f"model.family={family}", f"model.hf_path={converted / 'hf'}", f"checkpoint.init_from={converted}",
          "model.max_seq_length=320", "objective.name=dpo", "model.lora.rank=4", "train.train_steps=2",
          "optim.lr=1e-2", "data.num_train=8")
    m = read_metrics(out)
    assert m[0]["loss"] == pytest.approx(math.log(2), abs=1e-12) and m[1]["loss"] != m[0]["loss"]
    keys = checkpoint_keys(ckpt(out, 2))
    assert keys and all(k.endswith(("_lora.lora_a", "_lora.lora_b")) for k in keys)
    assert (ckpt(out, 2) / "conversion.json").is_file()  # exportable: megatron-to-hf --merge-lora / --adapter
