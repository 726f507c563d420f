"""Loads checkpoints into a TP=1, PP=1 model (resharding from whatever layout saved them) and compares weights.

Usage: python compare_ckpts.py CONFIG_JSON CKPT_A CKPT_B [CKPT_C ...] OUT_JSON (single process, no torchrun).
Every checkpoint after the first is compared with the first (one process for all: start-up dominates).
OUT_JSON: max_abs_diffs (per compared checkpoint, in argument order), max_abs_diff (the largest of them),
num_tensors and keys_match (every checkpoint has the first one's tensors).
"""

import json
import sys
from pathlib import Path

import torch

from megatron_po.config import ParallelConfig, config_from_dict
from megatron_po.data.tokenizer import Tokenizer
from megatron_po.models.tiny_vlm.model import build_vlm
from megatron_po.models.specs import padded_vocab_size
from megatron_po.parallel.groups import init_parallel, teardown
from megatron_po.train.checkpoint import load_model_weights


def main(cfg_json: str, *args: str) -> None:
    *ckpts, out = args
    if len(ckpts) < 2:
        raise SystemExit(__doc__)
    raw = json.loads(Path(cfg_json).read_text())
    raw["parallel"] = {"tp": 1}  # and pp=1: one process holds the whole model, whatever layout wrote the files
    cfg = config_from_dict(raw)
    groups = init_parallel(ParallelConfig(), seed=0)
    tok = Path(cfg.data.tokenizer_path or Path(cfg.output_dir) / "data" / "tokenizer.model")
    vocab = padded_vocab_size(Tokenizer(tok).vocab_size, 1)
    states = []
    for path in ckpts:
        # a fresh model per checkpoint (seed differs from training): nothing carries over from the previous load
        model = build_vlm(cfg.model, ParallelConfig(), vocab, groups, seed=123)
        load_model_weights(Path(path), model)
        states.append({k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)})
    ref, others = states[0], states[1:]
    diffs = [max(float((ref[k].double() - s[k].double()).abs().max()) for k in ref.keys() & s.keys())
             for s in others]
    Path(out).write_text(json.dumps({"max_abs_diff": max(diffs), "max_abs_diffs": diffs, "num_tensors": len(ref),
                                     "keys_match": all(sorted(ref) == sorted(s) for s in others)}))
    teardown()


if __name__ == "__main__":
    main(*sys.argv[1:])
