"""Qwen2.5-VL conversion parity, two modes (the pytest side is tests/test_hf_qwen2_5_vl.py).

    python hf_qwen2_5_vl_worker.py convert WORK
        HF dirs WORK/hf_untied, WORK/hf_tied -> megatron checkpoints WORK/mc_untied, WORK/mc_tied (the real
        converter, one process), and WORK/mc_untied back to HF in WORK/back_untied.
    torchrun --nproc_per_node 2 hf_qwen2_5_vl_worker.py parity WORK
        For each layout (TP=1 x DP=2, TP=2, TP=2 + SP): builds the family's model, loads the converted
        checkpoint (and, at TP=1, the transformers-module layout straight through hf_rules), runs the batch of
        WORK/case.pt and writes the full-vocabulary logits to WORK/logits_<layout>_<variant>.pt (rank 0).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

LAYOUTS = [("tp1", 1, False), ("tp2", 2, False), ("tp2_sp", 2, True)]


def convert(work: Path) -> None:
    from megatron_po.convert.core import hf_to_megatron, megatron_to_hf

    for variant in ("untied", "tied"):
        hf_to_megatron(work / f"hf_{variant}", work / f"mc_{variant}", family="qwen2_5_vl")
    megatron_to_hf(work / "mc_untied", work / "back_untied")


def _gather_vocab(logits: torch.Tensor, tp_group) -> torch.Tensor:
    parts = [torch.empty_like(logits) for _ in range(dist.get_world_size(tp_group))]
    dist.all_gather(parts, logits.contiguous(), group=tp_group)
    return torch.cat(parts, dim=-1)


def _run(model, case: dict, groups) -> torch.Tensor:
    from megatron_po.models import qwen2_5_vl as fam

    tokens = case["input_ids"]
    s = tokens.shape[1]
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)[None, None]
    with torch.no_grad():
        embeds = model.encode_images(case["images"])  # unique images, [T_img, h]
        per_image = embeds.split(case["images"]["num_tokens"].tolist())
        slots = torch.cat([per_image[i] for row in case["row_images"] for i in row])
        pos = fam.position_ids(case["hf_config"], tokens, case["images"], case["row_images"])
        logits = model(tokens, pos, mask, slots, tokens == fam.image_token_id(case["hf_config"]))
    return _gather_vocab(logits, groups.tp)


def parity(work: Path) -> None:
    from megatron_po.config import ModelConfig, ParallelConfig
    from megatron_po.models import qwen2_5_vl as fam
    from megatron_po.parallel.groups import destroy_parallel, init_parallel, teardown
    from megatron_po.train.checkpoint import load_model_weights

    case = torch.load(work / "case.pt", weights_only=False)
    configs = {v: json.loads((work / f"hf_{v}" / "config.json").read_text()) for v in ("untied", "tied")}
    try:
        for i, (name, tp, sp) in enumerate(LAYOUTS):
            if i:
                destroy_parallel()
            par = ParallelConfig(tp=tp, sp=sp, backend="gloo")
            groups = init_parallel(par, seed=0)
            variants = ["untied"] + (["tied"] if name == "tp2" else []) + (["modules"] if name == "tp1" else [])
            for variant in variants:
                hf_config = configs["tied" if variant == "tied" else "untied"]
                model = fam.build(hf_config, ModelConfig(logprobs="logits"), par, groups).eval()
                if variant == "modules":
                    # the transformers-module layout (model.visual.*, model.language_model.*) through hf_rules
                    from safetensors.torch import load_file

                    hf = load_file(str(work / "hf_modules" / "model.safetensors"))
                    rules = fam.hf_rules(hf_config, hf.keys())
                    sd = {r.megatron: r.to_megatron(*[hf[n] for n in r.hf]) for r in rules}
                    missing, unexpected = model.load_state_dict(sd, strict=False)
                    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
                else:
                    load_model_weights(work / f"mc_{variant}", model)
                logits = _run(model, dict(case, hf_config=hf_config), groups)
                if dist.get_rank() == 0:
                    torch.save(logits, work / f"logits_{name}_{variant}.pt")
                del model
        dist.barrier()
    finally:
        teardown()


if __name__ == "__main__":
    mode, work = sys.argv[1], Path(sys.argv[2])
    {"convert": convert, "parity": parity}[mode](work)
