"""Sequence log-probs of the trainer's own batches: megatron (our collator + family model + row log-probs) vs
transformers' forward on the same token ids and images (the pytest side is tests/test_hf_train.py).

    python hf_train_logps.py FAMILY HF_DIR CONVERTED_HF_DIR TRAIN_JSONL OUT_JSON
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def hf_forward(family: str, hf_dir: Path, batch: dict, row_parts: list[dict]) -> torch.Tensor:
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    tokens = batch["tokens"]
    if family == "qwen2_5_vl":
        kw = {"pixel_values": torch.cat([p["pixel_values"] for p in row_parts]),
              "image_grid_thw": torch.cat([p["image_grid_thw"] for p in row_parts])}
    else:
        kw = {"pixel_values": torch.cat([p["pixel_values"] for p in row_parts])}
    with torch.no_grad():
        return model(input_ids=tokens, attention_mask=torch.ones_like(tokens), **kw).logits


def main(family: str, hf_dir: str, conv_hf: str, train_jsonl: str, out: str) -> None:
    from megatron_po.config import ModelConfig, ParallelConfig
    from megatron_po.data.collate import CollateConfig, PreferenceDataset
    from megatron_po.data.hf_chat import HFImages, HFTokenizer
    from megatron_po.data.records import read_records
    from megatron_po.models.families import HF_FAMILIES
    from megatron_po.parallel.groups import init_parallel, teardown
    from megatron_po.train.checkpoint import load_model_weights
    from megatron_po.train.rows import encode, row_token_logps

    groups = init_parallel(ParallelConfig(backend="gloo"), seed=0)
    try:
        tok = HFTokenizer(family, conv_hf)
        images = HFImages(tok)
        ds = PreferenceDataset(read_records(Path(train_jsonl))[:8], Path(train_jsonl).parent, tok,
                               CollateConfig(max_length=320, num_image_tokens=0), image_size=0, images=images)
        items = [ds[i] for i in range(min(4, len(ds)))]
        batch = ds.collator(items)
        model = HF_FAMILIES[family].load().build(tok.hf_config, ModelConfig(spec="local"), ParallelConfig(), groups)
        load_model_weights(Path(conv_hf).parent, model)
        model.eval()
        with torch.no_grad():
            ours = row_token_logps(model, batch, encode(model, batch["images"]), batch["images"], groups.tp)
        row_parts = [items[r[0]][1] for r in batch["row_images"]]
        logits = hf_forward(family, Path(hf_dir), batch, row_parts)
        labels = batch["labels"]
        mask = labels != -100
        theirs = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp_min(0)[..., None])[..., 0] * mask
        a, b = ours.sum(-1), theirs.sum(-1)
        res = {"num_pairs": batch["num_pairs"], "image_tokens": int(batch["image_token_mask"].sum()),
               "ours": a.tolist(), "theirs": b.tolist(),
               "max_rel_err": float(((a - b).abs() / b.abs()).max())}
        Path(out).write_text(json.dumps(res))
        print(res)
    finally:
        teardown()


if __name__ == "__main__":
    main(*sys.argv[1:])
