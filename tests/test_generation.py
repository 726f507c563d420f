"""Greedy decoding of the megatron VLM (generation.py) and P2-DPO's pair generator (p2_pairs.py, `megatron-po
generate-p2`): equal to a plain greedy loop over the full-vocabulary logits, the same tokens at TP=1 and TP=2 + SP,
contrastive decoding's limits, a tiny random CLIP's scores, and records the trainer loads."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys

import pytest
import torch
from PIL import Image

from conftest import run_python, subprocess_env

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def task(tmp_path_factory, groups):
    """The synthetic task's tokenizer, P2 questions about 6 images, and a config of a random tiny_vlm."""
    from megatron_po.config import load_config
    from megatron_po.data.synthetic_p2 import generate_p2_questions
    from megatron_po.families import family_spec
    from megatron_po.objectives import build_objective
    from megatron_po.train.data import prepare_data

    out = tmp_path_factory.mktemp("gen")
    cfg = load_config(None, [f"output_dir={out}", "data.num_train=16", "data.num_eval=2", "model.logprobs=logits",
                             "model.init_method_std=0.1"])
    _, tok_path = prepare_data(cfg, build_objective("sft", {}), family_spec(cfg.model.family))
    questions = generate_p2_questions(out / "q", 6, seed=3)
    return cfg, tok_path, questions


def _model(cfg, groups, tokenizer):
    from megatron_po.families import family_spec
    from megatron_po.train.models import build_initial_model

    model = build_initial_model(cfg, family_spec(cfg.model.family), groups, tokenizer.vocab_size)
    return model.eval()


def _prompts(tokenizer, cfg, questions):
    from megatron_po.data.records import load_image
    from megatron_po.generation import Prompts

    n = cfg.model.vision.num_patches
    images = torch.stack([load_image(q.parent / json.loads(line)["image"], cfg.model.vision.image_size)
                          for q in [questions] for line in q.read_text().splitlines()])
    texts = [json.loads(line)["prompt"] for line in questions.read_text().splitlines()]
    return Prompts([tokenizer.prompt_ids(t, [n]) for t in texts], images, [[i] for i in range(len(texts))])


@pytest.mark.pure
def test_greedy_equals_a_plain_loop_over_full_vocabulary_logits(groups, task):
    """Each row's tokens are the argmax of the model's own full logits over prefix + tokens so far (control ids
    other than the end excluded), computed row by row here without the batching, padding or gather."""
    from megatron_po.data.tokenizer import Tokenizer
    from megatron_po.generation import greedy_generate
    from megatron_po.train.rows import causal_mask, unwrap

    cfg, tok_path, questions = task
    tokenizer = Tokenizer(tok_path)
    model = _model(cfg, groups, tokenizer)
    prompts = _prompts(tokenizer, cfg, questions)
    got = greedy_generate(model, tokenizer, prompts, groups, max_new_tokens=8)
    stops = {tokenizer.eos_id, tokenizer.end_id}
    banned = sorted(set(tokenizer.control_ids) - stops)
    vlm = unwrap(model)
    with torch.no_grad():
        embeds = vlm.encode_images(prompts.images)
        for r, prefix in enumerate(prompts.prefixes):
            ids, logps = [], []
            for _ in range(8):
                tokens = torch.tensor([prefix + ids])
                logits = vlm(tokens, torch.arange(tokens.shape[1])[None], causal_mask(tokens.shape[1], "cpu"),
                             embeds[r], tokens == tokenizer.image_id)[0, -1, : tokenizer.vocab_size].float()
                scores = logits.clone()
                scores[banned] = -math.inf
                token = int(scores.argmax())
                logps.append(float(torch.log_softmax(logits, -1)[token]))
                if token in stops:
                    break
                ids.append(token)
            assert got[r].ids == ids, r
            assert got[r].token_logps == pytest.approx(logps, abs=1e-5)
    assert any(g.ids for g in got)


@pytest.mark.pure
def test_contrastive_decoding_limits(groups, task):
    """VCD with λ = 0, or with the amateur shown the expert's images, is greedy decoding of the expert."""
    from megatron_po.data.tokenizer import Tokenizer
    from megatron_po.generation import greedy_generate

    cfg, tok_path, questions = task
    tokenizer = Tokenizer(tok_path)
    model = _model(cfg, groups, tokenizer)
    prompts = _prompts(tokenizer, cfg, questions)
    plain = [g.ids for g in greedy_generate(model, tokenizer, prompts, groups, max_new_tokens=6)]
    other = dataclasses.replace(prompts, images=torch.rand_like(prompts.images))
    same = greedy_generate(model, tokenizer, prompts, groups, 6, amateur=prompts, cd_alpha=1.0)
    assert [g.ids for g in same] == plain
    assert [g.ids for g in greedy_generate(model, tokenizer, prompts, groups, 6, amateur=other, cd_alpha=0.0)] == plain
    # a strong amateur term on other images changes some answer (the formula is applied at all)
    assert [g.ids for g in greedy_generate(model, tokenizer, prompts, groups, 6, amateur=other, cd_alpha=5.0,
                                           cd_beta=1e-6)] != plain


def _generate(task, tmp_path, *extra, nproc=1):
    cfg, tok_path, questions = task
    out = questions.parent / f"pairs_{tmp_path.name}_{nproc}.jsonl"  # beside the images it names
    args = ["-m", "megatron_po.cli", "generate-p2", "--questions", str(questions), "--out", str(out),
            "--max-new-tokens", "8", f"output_dir={tmp_path}", f"data.tokenizer_path={tok_path}",
            "model.init_method_std=0.1", *extra]
    env = subprocess_env()
    cmd = [sys.executable, *args] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    return out, json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.e2e
@pytest.mark.slow
def test_pairs_are_identical_at_tp1_and_tp2_and_load_in_the_trainer(task, tmp_path):
    """`megatron-po generate-p2` with one process and with TP=2 + SP writes the same records (same seed: the same
    random policy); the trainer's dry run reads and decodes them as P2-DPO training data."""
    from megatron_po.data.p2_records import read_p2_records

    one, stats = _generate(task, tmp_path)
    two, _ = _generate(task, tmp_path, "parallel.tp=2", "parallel.sp=true", nproc=2)
    assert one.read_text() == two.read_text()
    records = read_p2_records(one)
    assert stats["questions"] == 6 and stats["pairs_generated"] == 12 and stats["records"] == len(records) > 0
    assert stats["pairs_kept"] == sum((r.focus is not None) + (r.robust is not None) for r in records)
    assert stats["yield"] == pytest.approx(stats["pairs_kept"] / 12)
    for line in one.read_text().splitlines():
        f = json.loads(line)["focus"]
        if f:  # §9.5's filter (defaults) held for every kept focus pair
            assert max(f["chosen_ppl"], f["rejected_ppl"]) < 2.5
            assert -0.174 <= f["chosen_logp"] - f["rejected_logp"] <= 0.208
    _, tok_path, _ = task
    out = run_python(["-m", "megatron_po.cli", "train", "--dry-run", "--world-size", "1", "objective.name=p2_dpo",
                      "data.source=jsonl", f"data.train_path={one}", f"data.tokenizer_path={tok_path}",
                      f"output_dir={tmp_path / 'dry'}"])
    assert f"{len(records)} samples kept" in out, out[-2000:]


@pytest.mark.pure
def test_filter_and_yield_follow_the_spec(groups, task):
    """A focus pair survives §9.5's filter only with both perplexities < max_ppl and its margin in the window:
    with max_ppl = 0 none does; identical answers never make a pair."""
    from megatron_po.data.tokenizer import Tokenizer
    from megatron_po.p2_pairs import P2GenConfig, box_clip, generate_p2_records, read_questions

    cfg, tok_path, questions = task
    tokenizer = Tokenizer(tok_path)
    model = _model(cfg, groups, tokenizer)
    qs = read_questions(questions)
    kw = dict(root=questions.parent, image_size=32, num_image_tokens=cfg.model.vision.num_patches, clip=box_clip)
    records, stats = generate_p2_records(model, tokenizer, groups, qs, cfg=P2GenConfig(max_new_tokens=6, max_ppl=0.0),
                                         **kw)
    assert stats["focus_kept"] == 0 and all(r["focus"] is None for r in records)
    loose = P2GenConfig(max_new_tokens=6, max_ppl=1e9, margin_low=-1e9, margin_high=1e9)
    records, stats = generate_p2_records(model, tokenizer, groups, qs, cfg=loose, **kw)
    assert stats["dropped_filter"] == 0
    assert stats["focus_kept"] + stats["robust_kept"] + stats["dropped_identical"] == stats["pairs_generated"]
    for r in records:
        for branch in ("focus", "robust"):
            if r[branch]:
                assert r[branch]["chosen"] != r[branch]["rejected"] and r[branch]["chosen"] and r[branch]["rejected"]


def _tiny_clip(path):
    """A random CLIP from a config, with a byte-level BPE vocabulary and no merges (nothing downloaded)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {t: i for i, t in enumerate(["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars])}
    tok = CLIPTokenizer(vocab=vocab, merges=[])
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=tok).save_pretrained(path)
    torch.manual_seed(0)
    config = CLIPConfig(text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=128),
                        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=1, num_attention_heads=2), projection_dim=16)
    CLIPModel(config).save_pretrained(path)
    return path


@pytest.mark.e2e
def test_clip_scores_from_a_tiny_random_clip(task, tmp_path):
    """--clip PATH scores both-branch records with raw CLIP cosines of (P, I_crop) and (P, I) from a CLIP checkpoint
    directory (safetensors, local files only)."""
    pytest.importorskip("transformers")
    from megatron_po.p2_pairs import HFClip

    clip = _tiny_clip(tmp_path / "clip")
    assert (clip / "model.safetensors").is_file()
    out, stats = _generate(task, tmp_path, "--clip", str(clip))
    both = [json.loads(line) for line in out.read_text().splitlines()]
    both = [r for r in both if r["focus"] and r["robust"]]
    scorer = HFClip(str(clip))
    for r in both:
        assert -1 <= r["clip_crop_score"] <= 1 and -1 <= r["clip_image_score"] <= 1
        image = Image.open(out.parent / r["image"]).convert("RGB")
        crop, whole = scorer(r["prompt"], image, image.crop(r["focus"]["bbox"]), 0.0)
        assert (crop, whole) == pytest.approx((r["clip_crop_score"], r["clip_image_score"]), abs=1e-6)
