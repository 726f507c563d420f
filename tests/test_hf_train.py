"""The trainer runs preference steps on tiny random InternVL3 and Qwen2.5-VL models converted from HF.

Each case: a tiny HF model (tests/hf_*_fixture.py) -> tools/convert_hf.py -> `torchrun -m megatron_po.train` at
TP=2 + SP with DPO on the embedded task, through the family's tokenizer, chat template and image processor.
Policy and reference both start from the converted checkpoint, so step 1's loss is exactly ln 2 — which also needs
the log-probs to be complete sequences of real tokens (a mis-laid image slot or a padded-vocabulary leak would
still give ln 2, which is why the log-prob values are compared against transformers' own forward as well).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("transformers")

import hf_internvl3_fixture  # noqa: E402
import hf_qwen2_5_vl_fixture  # noqa: E402
from conftest import REPO, run_python, run_torchrun  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

FAMILIES = {
    "qwen2_5_vl": lambda d: hf_qwen2_5_vl_fixture.make_hf_dir(d),
    "internvl3": lambda d: hf_internvl3_fixture.make_checkpoint(d, "vit300m"),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def run(request, tmp_path_factory):
    family = request.param
    work = tmp_path_factory.mktemp(family)
    hf = FAMILIES[family](work / "hf")
    ckpt = work / "megatron"
    run_python([str(REPO / "tools" / "convert_hf.py"), "hf-to-megatron", str(hf), str(ckpt), "--family", family])
    out = work / "run"
    run_torchrun(["-m", "megatron_po.train", f"output_dir={out}", f"model.family={family}",
                  f"model.hf_path={ckpt / 'hf'}", f"checkpoint.init_from={ckpt}", "model.max_seq_length=320",
                  "objective.name=dpo", "parallel.tp=2", "parallel.sp=true", "train.progress_bar=false",
                  "data.num_train=16", "data.num_eval=4", "train.global_batch_size=4", "train.micro_batch_size=2",
                  "train.train_steps=3", "optim.lr=1e-3", "eval.interval=0", "checkpoint.save_interval=3"])
    return family, hf, ckpt, out


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_first_step_is_ln2_and_training_moves(run):
    _, _, _, out = run
    m = _metrics(out)
    assert [r["step"] for r in m] == [1, 2, 3]
    assert abs(m[0]["loss"] - math.log(2)) < 1e-6, m[0]["loss"]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in m)
    assert m[0]["grad_norm"] > 0
    assert m[-1]["loss"] != m[0]["loss"], "the policy did not change"
    # sequence log-probs of real responses: negative, and larger in magnitude than one token's
    assert m[0]["logps/chosen"] < -1.0 and m[0]["logps/rejected"] < -1.0


def test_first_step_logps_match_transformers(run, tmp_path):
    """The converted weights' log-probs through the trainer's forward-only pass equal transformers' on the same
    pairs, laid out by our collator (chat template, image processor, image slots, M-RoPE), at TP=1, at TP=2 (the
    padded vocabulary's mask on the rank holding its tail), at PP=2 (a TP=1 conversion loaded by two stages) and
    packed (several sequences per row: M-RoPE positions restarting, image slots). Every other pair shows two
    images placed inside its prompt (TRL's interleaved image parts), as the family's chat template lays them out."""
    family, hf, ckpt, out = run
    res = tmp_path / "logps.json"
    data = out / "data"
    records = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
    trl = []
    for i, r in enumerate(records):
        images = [r["image"]] + ([records[i + 1]["image"]] if i % 2 == 0 and i + 1 < len(records) else [])
        content = [{"type": "image"}, {"type": "text", "text": "First;"}] + (
            [{"type": "image"}, {"type": "text", "text": " second. "}] if len(images) == 2 else []) + [
            {"type": "text", "text": r["prompt"]}]
        trl.append({"prompt": [{"role": "user", "content": content}], "chosen": r["chosen"],
                    "rejected": r["rejected"], "images": images})
    (data / "two_images.jsonl").write_text("".join(json.dumps(r) + "\n" for r in trl))
    run_torchrun([str(REPO / "tests" / "dist" / "hf_train_logps.py"), family, str(hf), str(ckpt / "hf"),
                  str(data / "two_images.jsonl"), str(res)])
    got = json.loads(res.read_text())
    print(family, {name: r["max_rel_err"] for name, r in got["layouts"].items()})
    assert got["num_pairs"] >= 4 and got["image_tokens"] > 0
    assert sorted(got["layouts"]) == ["pp2", "tp1", "tp2", "tp2_packed"]
    for name, r in got["layouts"].items():
        assert r["max_rel_err"] < 1e-5, (name, r, got["theirs"])


def test_parity_tool_on_a_training_image(run):
    """tools/hf_parity.py: the user-facing check, on one of the run's images with a prompt and a response."""
    family, hf, ckpt, out = run
    image = sorted((out / "data").rglob("*.png"))[0]
    log = run_python([str(REPO / "tools" / "hf_parity.py"), str(hf), str(ckpt), "--image", str(image),
                      "--image", str(image), "--prompt", "What colour is the circle?", "--response", "It is red."])
    line = next(l for l in log.splitlines() if l.startswith("family"))
    err = float(line.split("max rel logit err")[1].split()[0])
    assert f"family {family}" in line and err < 1e-4, line


def _safetensors(path: Path) -> dict:
    from safetensors import safe_open

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_slice(k).get_dtype() for k in h.keys()})
    return out


def test_training_checkpoint_exports_as_it_is(run, tmp_path):
    """A run's checkpoint carries hf/ and conversion.json: megatron-to-hf takes OUTPUT_DIR/checkpoints/iter_N
    directly, in the source's dtype by default; a narrower --dtype warns that it rounds."""
    import subprocess
    import sys

    _, hf, _, out = run
    ckpt = out / "checkpoints" / "iter_0000003"
    meta = json.loads((ckpt / "conversion.json").read_text())
    assert meta["dtype"] == "float32" and meta["source_dtype"] == "float32"
    run_python([str(REPO / "tools" / "convert_hf.py"), "megatron-to-hf", str(ckpt), str(tmp_path / "same")])
    exported, original = _safetensors(tmp_path / "same"), _safetensors(hf)
    assert set(exported) == set(original) and set(exported.values()) == {"F32"}
    rounded = subprocess.run([sys.executable, str(REPO / "tools" / "convert_hf.py"), "megatron-to-hf", str(ckpt),
                              str(tmp_path / "bf16"), "--dtype", "bf16"], capture_output=True, text=True)
    assert rounded.returncode == 0, rounded.stderr
    assert "exporting bfloat16 rounds them" in rounded.stderr
    assert set(_safetensors(tmp_path / "bf16").values()) == {"BF16"}
