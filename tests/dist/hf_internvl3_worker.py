"""InternVL3 conversion parity, two modes (the pytest side is tests/test_hf_internvl3.py).

    python hf_internvl3_worker.py convert WORK
        HF dirs WORK/hf_vit300m (tied embeddings), WORK/hf_vit6b (untied) -> megatron checkpoints WORK/mc_<variant>
        with the real converter (one process), and each back to HF in WORK/back_<variant>.
    torchrun --nproc_per_node 2 hf_internvl3_worker.py parity WORK
        For each layout (TP=1 x DP=2, TP=2, TP=2 + SP): builds the family's model, loads the converted checkpoint
        (and, at TP=1, the transformers-module layout WORK/hf_modules straight through hf_rules), runs the batch
        of WORK/case.pt and writes, on rank 0, the full-vocabulary logits and the image features of the
        interpolated-position tiles to WORK/out_<layout>_<variant>.pt.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

VARIANTS = ("vit300m", "vit6b")
LAYOUTS = [("tp1", 1, False), ("tp2", 2, False), ("tp2_sp", 2, True)]


def convert(work: Path) -> None:
    from megatron_po.convert.core import hf_to_megatron, megatron_to_hf

    for variant in VARIANTS:
        hf_to_megatron(work / f"hf_{variant}", work / f"mc_{variant}", family="internvl3")
        megatron_to_hf(work / f"mc_{variant}", work / f"back_{variant}")


def _gather_last(x: torch.Tensor, group) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def _run(model, case: dict, hf_config: dict, groups) -> dict:
    from megatron_po.models import internvl3 as fam

    tokens = case["input_ids"]
    s = tokens.shape[1]
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)[None, None]
    with torch.no_grad():
        embeds = model.encode_images(case["images"])  # unique images, [T_img, h]
        per_image = embeds.split(case["images"]["num_tokens"].tolist())
        slots = torch.cat([per_image[i] for row in case["row_images"] for i in row])
        image_mask = tokens == fam.image_token_id(hf_config)
        logits = model(tokens, fam.position_ids(hf_config, tokens), mask, slots, image_mask)
        interp = {k: model.encode_images({"pixel_values": v}) for k, v in case["interp_pixels"].items()}
        text_only = model.encode_images({"pixel_values": case["images"]["pixel_values"][:0]})
    return {"logits": _gather_last(logits, groups.tp), "interp": interp, "text_only_shape": tuple(text_only.shape)}


def parity(work: Path) -> None:
    from safetensors.torch import load_file

    from megatron_po.config import ModelConfig, ParallelConfig
    from megatron_po.models import internvl3 as fam
    from megatron_po.parallel.groups import destroy_parallel, init_parallel, teardown
    from megatron_po.train.checkpoint import load_model_weights

    case = torch.load(work / "case.pt", weights_only=False)
    configs = {v: json.loads((work / f"hf_{v}" / "config.json").read_text()) for v in VARIANTS}
    try:
        for i, (name, tp, sp) in enumerate(LAYOUTS):
            if i:
                destroy_parallel()
            par = ParallelConfig(tp=tp, sp=sp, backend="gloo")
            groups = init_parallel(par, seed=0)
            variants = ["vit300m"] + (["vit6b"] if name != "tp2" else []) + (["modules"] if name == "tp1" else [])
            for variant in variants:
                hf_config = configs["vit300m" if variant == "modules" else variant]
                model = fam.build(hf_config, ModelConfig(spec="local", logprobs="logits"), par, groups).eval()
                if variant == "modules":
                    # the layout transformers' _checkpoint_conversion_mapping loads (its state_dict), via hf_rules
                    hf = load_file(str(work / "hf_modules" / "model.safetensors"))
                    rules = fam.hf_rules(hf_config, hf.keys())
                    sd = {r.megatron: r.to_megatron(*[hf[n] for n in r.hf]) for r in rules}
                    missing, unexpected = model.load_state_dict(sd, strict=False)
                    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
                else:
                    load_model_weights(work / f"mc_{variant}", model)
                out = _run(model, case, hf_config, groups)
                if dist.get_rank() == 0:
                    torch.save(out, work / f"out_{name}_{variant}.pt")
                del model
        dist.barrier()
    finally:
        teardown()


if __name__ == "__main__":
    mode, work = sys.argv[1], Path(sys.argv[2])
    {"convert": convert, "parity": parity}[mode](work)
