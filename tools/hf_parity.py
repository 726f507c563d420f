#!/usr/bin/env python3
"""Logit parity of a converted checkpoint against transformers' forward, on your text + images.

    python tools/hf_parity.py HF_DIR CONVERTED_DIR --image a.jpg [--image b.png] --prompt "..." [--response "..."]
    torchrun --nproc_per_node 2 tools/hf_parity.py ... --tp 2 [--sp]      # the megatron side sharded

Both sides see the same token ids (the family's chat template with the images' slots, then the response) and the
same pixels (our image processor, proven equal to HF's in tests/test_hf_*.py). Prints the max relative logit error
max|ours - HF| / max|HF| over the real vocabulary and the per-token log-prob error; exits 1 above --tol.
Needs the `[hf]` extra; loads both models in fp32 on the CPU (or the rank's GPU for megatron with NCCL).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("hf_dir")
    ap.add_argument("converted_dir")
    ap.add_argument("--image", action="append", default=[], help="image file (repeatable; slots in this order)")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--response", default="")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--sp", action="store_true")
    ap.add_argument("--spec", default="local", choices=["local", "te", "auto"])
    ap.add_argument("--tol", type=float, default=1e-4)
    args = ap.parse_args(argv)

    import torch.distributed as dist

    from megatron_po.config import ModelConfig, ParallelConfig
    from megatron_po.convert.core import read_conversion
    from megatron_po.data.hf_chat import HFImages, HFTokenizer
    from megatron_po.parallel.groups import init_parallel, teardown
    from megatron_po.train.checkpoint import load_model_weights
    from megatron_po.train.rows import causal_mask

    conv = Path(args.converted_dir)
    fam, hf_config, _ = read_conversion(conv)
    groups = init_parallel(ParallelConfig(tp=args.tp, sp=args.sp), seed=0)
    try:
        module = fam.spec().hf
        tok = HFTokenizer(module, conv / "hf")
        handler = HFImages(tok)
        parts = [handler.load([Path(f)]) for f in args.image]
        images = handler.collate(parts) if parts else None
        counts = [int(p["num_tokens"].sum()) for p in parts]
        ids = tok.prompt_ids(args.prompt, counts) + tok.encode(args.response)
        if args.sp and len(ids) % args.tp:
            ids += [tok.pad_id] * (args.tp - len(ids) % args.tp)  # SP shards the sequence evenly; pads come last
        tokens = torch.tensor([ids])
        # logits out of the output layer: parity is checked on the whole vocabulary, not the trainer's log-probs
        model_cfg = ModelConfig(spec=args.spec, family=fam.name, hf_path=str(conv / "hf"), logprobs="logits")
        model = module.build(hf_config, model_cfg, ParallelConfig(tp=args.tp, sp=args.sp), groups).to(groups.device)
        load_model_weights(conv, model)
        model.eval()
        row_images = [list(range(len(parts)))]
        with torch.no_grad():
            embeds = model.encode_images(images) if parts else None
            flat = embeds if embeds is not None else torch.zeros(0, model.config.hidden_size)
            pos = handler.position_ids(tokens, images, row_images) if parts else torch.arange(len(ids))[None]
            logits = model(tokens.to(groups.device), pos.to(groups.device), causal_mask(len(ids), groups.device),
                           flat, (tokens == tok.image_id).to(groups.device))
            if args.tp > 1:
                shards = [torch.empty_like(logits) for _ in range(args.tp)]
                dist.all_gather(shards, logits.contiguous(), group=groups.tp)
                logits = torch.cat(shards, -1)
        vocab = model.lm_shape.vocab_size
        ours = logits[..., :vocab].float().cpu()
        if dist.get_rank() != 0:
            return 0
        from transformers import AutoModelForImageTextToText

        hf = AutoModelForImageTextToText.from_pretrained(args.hf_dir, dtype=torch.float32).eval()
        kw = {}
        if parts:
            kw = {k: images[k] for k in ("pixel_values", "image_grid_thw") if k in images}
        if "image_grid_thw" in kw:
            # Qwen2.5-VL in transformers 5 takes M-RoPE positions for image tokens only where mm_token_type_ids
            # marks them (its processor's output); without it every position would be a text position
            kw["mm_token_type_ids"] = (tokens == tok.image_id).int()
        with torch.no_grad():
            theirs = hf(input_ids=tokens, attention_mask=torch.ones_like(tokens), **kw).logits.float()
        err = float((ours - theirs).abs().max() / theirs.abs().max())
        lp_err = float((ours.log_softmax(-1) - theirs.log_softmax(-1)).abs().max())
        print(f"family {fam.name}  tp {args.tp}{' +sp' if args.sp else ''}  tokens {len(ids)}  "
              f"image tokens {sum(counts)}  max rel logit err {err:.3e}  max |dlogp| {lp_err:.3e}")
        return 0 if err <= args.tol else 1
    finally:
        teardown()


if __name__ == "__main__":
    sys.exit(main())
