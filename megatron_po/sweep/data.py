"""The synthetic pairs a point trains on: one data set per distinct (data settings, row length, image slots,
tokenizer), shared by the points that agree on them and written once, atomically (SLURM array tasks may race)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from megatron_po.config import Config
from megatron_po.data.synthetic_lengths import ROW_OVERHEAD
from megatron_po.sweep.spec import DataSpec

HF_ROW_OVERHEAD = 64
"""Tokens an HF chat template adds around a turn (system prompt, role markers): room the response cap leaves."""


def _image_tokens(cfg: Config, family, image_size: int) -> int:
    if not family.from_hf:
        return cfg.model.vision.num_patches
    from megatron_po.models.family import read_hf_configs

    try:
        hf_config, preprocessor = read_hf_configs(cfg.model.hf_path)
    except FileNotFoundError:
        return 0  # the launch will say what is missing
    return family.hf.image_num_tokens(image_size, image_size, preprocessor, hf_config)


def ensure_data(data: DataSpec, cfg: Config, family, root: Path) -> dict[str, Any]:
    """Writes (unless there) the pairs for `cfg`'s family and row length under root/<key>/; returns the data
    overrides of the launch."""
    from megatron_po.data.synthetic_lengths import write_length_pairs

    image_tokens = _image_tokens(cfg, family, data.image_size)
    overhead = HF_ROW_OVERHEAD if family.from_hf else ROW_OVERHEAD
    vocab = None if family.from_hf else data.vocab_size
    key = {**asdict(data), "vocab_size": vocab, "max_seq_length": cfg.model.max_seq_length,
           "image_tokens": image_tokens, "row_overhead": overhead}
    target = root / hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    if not (target / "train.jsonl").is_file():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=".writing-"))
        try:
            write_length_pairs(tmp, data.pairs, data.prompt_tokens, data.response_median, data.response_sigma,
                               cfg.model.max_seq_length, image_tokens, data.image_size, vocab, data.seed, overhead)
            (tmp / "settings.json").write_text(json.dumps(key, indent=1))
            try:
                os.rename(tmp, target)
            except OSError:  # another process wrote it first: theirs is the same data
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    out = {"data.source": "jsonl", "data.format": "jsonl", "data.train_path": str(target / "train.jsonl")}
    if vocab is not None:
        out["data.tokenizer_path"] = str(target / "tokenizer.model")
    return out
