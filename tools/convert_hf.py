#!/usr/bin/env python3
"""Hugging Face <-> megatron checkpoint conversion (InternVL3, Qwen2.5-VL). Needs the `[hf]` extra.

    python tools/convert_hf.py hf-to-megatron HF_DIR OUT_DIR [--family internvl3|qwen2_5_vl] [--dtype auto]
    python tools/convert_hf.py megatron-to-hf CKPT_DIR OUT_DIR [--dtype source|bf16|fp32]
                                              [--merge-lora | --adapter] [--lora-base BASE_DIR]

CKPT_DIR is a converted checkpoint or a training checkpoint of a run started from one (OUTPUT_DIR/checkpoints/iter_N:
it carries hf/ and conversion.json). --dtype source (default) exports in the original HF checkpoint's dtype and
warns when that rounds the trained weights (e.g. trained in fp32 from a bf16 source); fp32 keeps them.
A LoRA run's checkpoint holds only its adapters and needs one of --merge-lora (a full HF model: the base of
checkpoint.init_from with W + (alpha/r) B A in every adapted weight) or --adapter (a PEFT adapter directory for
`PeftModel.from_pretrained(<the source HF model>, OUT_DIR)`).

HF_DIR is a local directory (download it yourself; nothing is fetched here). The megatron checkpoint is
TP/PP-agnostic: train from it at any layout with `checkpoint.init_from=OUT_DIR model.family=... model.hf_path=OUT_DIR/hf`.
Every input problem (missing shard, wrong family, shape mismatch, unknown tensors) fails before anything is written.
"""

import argparse
import json
import logging
import sys

from megatron_po.quiet import quiet_megatron_notes

quiet_megatron_notes()  # before megatron is imported

from megatron_po.convert.core import ConversionError, hf_to_megatron  # noqa: E402
from megatron_po.convert.lora import export_hf  # noqa: E402
from megatron_po.families import HF_FAMILY_NAMES  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("hf-to-megatron")
    a.add_argument("hf_dir")
    a.add_argument("out_dir")
    a.add_argument("--family", choices=sorted(HF_FAMILY_NAMES), help="refuse a checkpoint of another family")
    a.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    b = sub.add_parser("megatron-to-hf")
    b.add_argument("ckpt_dir")
    b.add_argument("out_dir")
    b.add_argument("--max-shard-gb", type=float, default=5.0)
    b.add_argument("--dtype", default="source", choices=["source", "bf16", "fp32"])
    lora = b.add_mutually_exclusive_group()
    lora.add_argument("--merge-lora", dest="lora", action="store_const", const="merge",
                      help="LoRA checkpoint: export base + adapters merged (W + alpha/r * B A) as a full HF model; "
                           "the base is trainer_state.json's lora_base.init_from")
    lora.add_argument("--adapter", dest="lora", action="store_const", const="adapter",
                      help="LoRA checkpoint: export a PEFT adapter directory (adapter_config.json, "
                           "adapter_model.safetensors) for the source HF model")
    b.add_argument("--lora-base", default=None, metavar="BASE_DIR",
                   help="with --merge-lora: the base checkpoint's directory when it has moved from lora_base.init_from "
                        "(checked against the key the run recorded)")
    args = ap.parse_args(argv)
    if args.cmd == "megatron-to-hf" and args.lora_base and args.lora != "merge":
        b.error("--lora-base goes with --merge-lora")
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    try:
        if args.cmd == "hf-to-megatron":
            out = hf_to_megatron(args.hf_dir, args.out_dir, family=args.family, dtype=args.dtype)
        else:
            out = export_hf(args.ckpt_dir, args.out_dir, max_shard_bytes=int(args.max_shard_gb * (1 << 30)),
                            dtype=args.dtype, lora=args.lora, lora_base=args.lora_base)
    except (ConversionError, ValueError, KeyError, FileNotFoundError, json.JSONDecodeError) as e:
        # what the family code refuses in a config (a missing field, an unsupported setting) is one line too
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
