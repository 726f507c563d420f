"""The reference cache's key and completeness checks, in one process (the pytest side is tests/test_ref_cache.py).

Precomputes a cache for a tiny DPO config whose reference is a saved checkpoint and whose training file holds a
pair too long for max_seq_length, then changes one input at a time and records what `open_cache` says.

    python ref_cache_checks.py OUT_DIR
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import sys
from pathlib import Path

import torch
from megatron.core import dist_checkpointing
from PIL import Image

from megatron_po.config import ParallelConfig, config_from_dict
from megatron_po.data.records import iter_texts, read_records
from megatron_po.data.tokenizer import train_tokenizer
from megatron_po.families import family_spec
from megatron_po.objectives import build_objective
from megatron_po.parallel.groups import init_parallel, teardown
from megatron_po.train.batch import MicroBatch
from megatron_po.train.data import build_eval_datasets, build_tokenizer, build_train_dataset, prepare_data
from megatron_po.train.models import build_model
from megatron_po.train.precompute import precompute_reference
from megatron_po.train.ref_cache import MANIFEST, CacheError, open_cache
from megatron_po.train.step import Tower, run_logps_pass


def main(out: Path) -> None:
    groups = init_parallel(ParallelConfig(backend="gloo"), seed=0)
    base = {"output_dir": str(out / "run"), "data": {"num_train": 12, "num_eval": 4},
            "objective": {"name": "dpo"}, "eval": {"interval": 1, "max_pairs": 4, "probe_images": 4},
            "train": {"micro_batch_size": 2}, "checkpoint": {"init_from": str(out / "ckpt")},
            "reference": {"source": "cache", "cache_path": str(out / "cache")}}

    def config(**changes):
        data = json.loads(json.dumps(base))
        for dotted, value in changes.items():
            *path, last = dotted.split("__")
            node = data
            for p in path:
                node = node.setdefault(p, {})
            node[last] = value
        return config_from_dict(data)

    cfg = config()
    objective = build_objective("dpo", {})
    family = family_spec(cfg.model.family)
    train_path, tok_path = prepare_data(cfg, objective, family)
    # a pair too long for max_seq_length in the middle of the file: skipped (and counted) in every run
    lines = train_path.read_text().splitlines()
    long = json.loads(lines[3])
    long.update(id="too-long", chosen=" ".join(["red square"] * 200))
    train_path.write_text("\n".join(lines[:5] + [json.dumps(long)] + lines[5:]) + "\n")
    # the reference weights to save: drawn (a config with init_from only allocates what the checkpoint will fill)
    drawn = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, init_from=""))
    model = build_model(drawn, family, groups, build_tokenizer(cfg, family, tok_path).vocab_size)
    (out / "ckpt").mkdir()
    dist_checkpointing.save({"model": model.sharded_state_dict(prefix="model.")}, str(out / "ckpt"))

    def datasets(c):
        tok = build_tokenizer(c, family, prepare_data(c, objective, family)[1])
        return {"train": build_train_dataset(c, family, train_path, tok, objective),
                **build_eval_datasets(c, family, tok)}

    def check(c) -> str:
        try:
            open_cache(c, objective, family, datasets(c))
            return "ok"
        except CacheError as e:
            return str(e)

    res = {"before_precompute": check(cfg)}
    precompute_reference(cfg, objective, family, groups)
    manifest = json.loads((out / "cache" / MANIFEST).read_text())
    ds = datasets(cfg)["train"]
    res["ids"] = manifest["splits"]["train"]["ids"]
    res["kept"] = [r.id for r in ds.records]
    res["skipped"] = dict(ds.skipped)
    res["fresh"] = check(cfg)

    # lookups by id, in any order, equal a live reference pass over the same pairs
    cache = open_cache(cfg, objective, family, datasets(cfg))
    order = list(range(len(ds)))
    random.Random(0).shuffle(order)
    mb = MicroBatch.from_collated(ds.collator([ds[i] for i in order[:4]]))
    live = run_logps_pass(groups, model.eval(), [mb], Tower("reference", frozen=True), reference_rows=True)[0]
    cached = cache.lookup("train", mb, torch.device("cpu"))
    res["lookup_seq_rel"] = float(((cached.seq - live.seq).abs() / live.seq.abs()).max())
    res["lookup_segments_equal"] = bool(torch.allclose(cached.segments, live.segments, rtol=1e-6, atol=0))

    def changed(name, mutate, restore, c=cfg):
        mutate()
        try:
            res[name] = check(c)
        finally:
            restore()

    text = train_path.read_text()
    changed("data", lambda: train_path.write_text(text.replace("Describe the image.", "Describe this image.", 1)),
            lambda: train_path.write_text(text))
    image = sorted((out / "run" / "data" / "images").glob("train_*.png"))[0]
    pixels, stat = image.read_bytes(), image.stat()

    def restore_image():  # the index keys images by path, size and mtime (data/index.py): all three restored
        image.write_bytes(pixels)
        os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    changed("image", lambda: Image.new("RGB", (32, 32), (1, 2, 3)).save(image), restore_image)
    other_tok = out / "tok2" / "tokenizer"
    train_tokenizer(list(iter_texts(read_records(train_path))), other_tok, vocab_size=400, seed=1)
    res["tokenizer"] = check(config(data__tokenizer_path=str(other_tok.with_suffix(".model"))))
    shutil.copytree(out / "ckpt", out / "ckpt2")
    with torch.no_grad():
        next(model.language_model.parameters()).add_(1e-3)
    shutil.rmtree(out / "ckpt2")
    (out / "ckpt2").mkdir()
    dist_checkpointing.save({"model": model.sharded_state_dict(prefix="model.")}, str(out / "ckpt2"))
    res["checkpoint"] = check(config(checkpoint__init_from=str(out / "ckpt2")))
    res["setting"] = check(config(model__max_seq_length=170))
    res["objective_kind_same"] = check(config(objective__name="aspo"))  # pairs either way: the cache serves both
    manifest_file = out / "cache" / MANIFEST
    saved = manifest_file.read_text()
    partial = json.loads(saved)
    partial["splits"]["train"]["ids"] = partial["splits"]["train"]["ids"][:-1]
    changed("partial", lambda: manifest_file.write_text(json.dumps(partial)), lambda: manifest_file.write_text(saved))
    changed("interrupted", manifest_file.unlink, lambda: manifest_file.write_text(saved))
    res["restored"] = check(cfg)
    (out / "result.json").write_text(json.dumps(res, indent=1))
    teardown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
