"""Loads two checkpoints into a TP=1 model (resharding from whatever layout saved them) and compares weights.

Usage: python compare_ckpts.py CONFIG_JSON CKPT_A CKPT_B OUT_JSON (single process, no torchrun).
"""

import json
import sys
from pathlib import Path

import torch

from megatron_po.config import ParallelConfig, config_from_dict
from megatron_po.data.tokenizer import Tokenizer
from megatron_po.models.vlm import build_vlm, padded_vocab_size
from megatron_po.parallel.groups import init_parallel, teardown
from megatron_po.train.checkpoint import load_model_weights


def main(cfg_json: str, a: str, b: str, out: str) -> None:
    raw = json.loads(Path(cfg_json).read_text())
    raw["parallel"] = {"tp": 1}
    cfg = config_from_dict(raw)
    groups = init_parallel(ParallelConfig(), seed=0)
    tok = Path(cfg.data.tokenizer_path or Path(cfg.output_dir) / "data" / "tokenizer.model")
    vocab = padded_vocab_size(Tokenizer(tok).vocab_size, 1)
    states = []
    for path in (a, b):
        model = build_vlm(cfg.model, ParallelConfig(), vocab, groups, seed=123)  # seed differs from training
        load_model_weights(Path(path), model)
        states.append({k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)})
    diffs = {k: float((states[0][k].double() - states[1][k].double()).abs().max()) for k in states[0]}
    Path(out).write_text(json.dumps({"max_abs_diff": max(diffs.values()), "num_tensors": len(diffs),
                                     "keys_match": sorted(states[0]) == sorted(states[1])}))
    teardown()


if __name__ == "__main__":
    main(*sys.argv[1:])
