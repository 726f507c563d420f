#!/usr/bin/env python3
"""Hugging Face <-> megatron checkpoint conversion (InternVL3, Qwen2.5-VL). Needs the `[hf]` extra.

    python tools/convert_hf.py hf-to-megatron HF_DIR OUT_DIR [--family internvl3|qwen2_5_vl] [--dtype auto]
    python tools/convert_hf.py megatron-to-hf CKPT_DIR OUT_DIR

HF_DIR is a local directory (download it yourself; nothing is fetched here). The megatron checkpoint is
TP/PP-agnostic: train from it at any layout with `checkpoint.init_from=OUT_DIR model.family=... model.hf_path=OUT_DIR/hf`.
Every input problem (missing shard, wrong family, shape mismatch, unknown tensors) fails before anything is written.
"""

import argparse
import sys

from megatron_po.convert.core import ConversionError, hf_to_megatron, megatron_to_hf
from megatron_po.models.families import HF_FAMILIES


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("hf-to-megatron")
    a.add_argument("hf_dir")
    a.add_argument("out_dir")
    a.add_argument("--family", choices=sorted(HF_FAMILIES), help="refuse a checkpoint of another family")
    a.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    b = sub.add_parser("megatron-to-hf")
    b.add_argument("ckpt_dir")
    b.add_argument("out_dir")
    b.add_argument("--max-shard-gb", type=float, default=5.0)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "hf-to-megatron":
            out = hf_to_megatron(args.hf_dir, args.out_dir, family=args.family, dtype=args.dtype)
        else:
            out = megatron_to_hf(args.ckpt_dir, args.out_dir, max_shard_bytes=int(args.max_shard_gb * (1 << 30)))
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
