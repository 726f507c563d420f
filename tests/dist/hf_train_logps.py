"""Sequence log-probs of the trainer's own batches: megatron (our collator + family model + the step's forward-only
pass through megatron's schedule) vs transformers' forward on the same token ids and images, in several layouts of
one 2-process launch (the pytest side is tests/test_hf_train.py):

- tp1: TP=1 (DP=2);
- tp2: TP=2, the padded vocabulary split over two ranks (rank 1 holds the padded tail: its mask offset matters);
- pp2: two pipeline stages loaded from the same converted (TP=1, PP=1) checkpoint, tied embeddings included;
- tp2_packed: TP=2 with the pairs' rows packed (several sequences per row, positions restarting per sequence).

    torchrun --nproc_per_node 2 hf_train_logps.py FAMILY HF_DIR CONVERTED_HF_DIR TRAIN_JSONL OUT_JSON
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

LAYOUTS = {"tp1": dict(tp=1), "tp2": dict(tp=2), "pp2": dict(pp=2), "tp2_packed": dict(tp=2)}


def hf_forward(family: str, hf_dir: Path, batch: dict, row_parts: list[dict]) -> torch.Tensor:
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tokens = batch["tokens"]
    if family == "qwen2_5_vl":
        # transformers 5 gives image tokens their M-RoPE positions only where mm_token_type_ids marks them
        kw = {"pixel_values": torch.cat([p["pixel_values"] for p in row_parts]),
              "image_grid_thw": torch.cat([p["image_grid_thw"] for p in row_parts]),
              "mm_token_type_ids": (tokens == model.config.image_token_id).int()}
    else:
        kw = {"pixel_values": torch.cat([p["pixel_values"] for p in row_parts])}
    with torch.no_grad():
        return model(input_ids=tokens, attention_mask=torch.ones_like(tokens), **kw).logits


def main(family: str, hf_dir: str, conv_hf: str, train_jsonl: str, out: str) -> None:
    from megatron_po.config import ModelConfig, ParallelConfig
    from megatron_po.data.collate import CollateConfig
    from megatron_po.data.dataset import PreferenceDataset
    from megatron_po.data.hf_chat import HFImages, HFTokenizer
    from megatron_po.data.packing import pack_rows
    from megatron_po.data.sources import read_preference_file
    from megatron_po.families import family_spec
    from megatron_po.parallel.groups import destroy_parallel, init_parallel, init_process_group, teardown
    from megatron_po.parallel.reduce import broadcast_from_last_stage
    from megatron_po.train.batch import MicroBatch
    from megatron_po.train.checkpoint import load_model_weights
    from megatron_po.train.step import Tower, run_logps_pass

    init_process_group(ParallelConfig(backend="gloo"))
    tok = HFTokenizer(family_spec(family).hf, conv_hf)
    images = HFImages(tok)
    ds = PreferenceDataset(read_preference_file(Path(train_jsonl))[:8], Path(train_jsonl).parent, tok,
                           CollateConfig(max_length=320, num_image_tokens=0), images=images)
    items = [ds[i] for i in range(min(4, len(ds)))]
    batch = ds.collator(items)
    # transformers takes every row's images in the order their spans appear: row r shows pair r % B's, all of them
    row_parts = [items[r % batch["num_pairs"]][1] for r in range(len(batch["row_images"]))]
    assert any(len(rows) > 1 for rows in batch["row_images"]), "the batch has no pair with several images"
    logits = hf_forward(family, Path(hf_dir), batch, row_parts)
    labels = batch["labels"]
    theirs = (torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp_min(0)[..., None])[..., 0]
              * (labels != -100)).sum(-1)
    res = {"num_pairs": batch["num_pairs"], "image_tokens": int(batch["image_token_mask"].sum()),
           "theirs": theirs.tolist(), "layouts": {}}
    for name, layout in LAYOUTS.items():
        par = ParallelConfig(backend="gloo", **layout)
        groups = init_parallel(par, seed=0)
        model = family_spec(family).hf.build(tok.hf_config, ModelConfig(spec="local"), par, groups)
        load_model_weights(Path(conv_hf).parent, model)
        model.eval()
        # the trainer's own reference/statistics pass: megatron's schedule, log-probs on the last stage; packed, the
        # sequences share rows (M-RoPE positions restarting, images in their slots) and come back per sequence
        rows = pack_rows(batch, 320, 1, tok.pad_id) if name.endswith("_packed") else batch
        logps = run_logps_pass(groups, model, [MicroBatch.from_collated(rows)], Tower("policy", frozen=True))
        ours = broadcast_from_last_stage(None if logps is None else logps[0].seq.tolist(), groups.pp)
        a = torch.tensor(ours)
        res["layouts"][name] = {"ours": ours, "max_rel_err": float(((a - theirs).abs() / theirs.abs()).max())}
        destroy_parallel()
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(res))
        print(res)
    teardown()


if __name__ == "__main__":
    main(*sys.argv[1:])
