"""Greedy decoding of our megatron VLM (tiny_vlm), for P2-DPO's pair generation (OBJECTIVES.md §9.3-9.4).

Each new token re-runs the whole prefix (no KV cache): the models this serves on a CPU are tiny and the answers
short, and the same forward as training (``forward_rows``: image slots spliced into the rows, megatron's TP/SP
layers) means what is generated is what the trainer scores. The last position's vocabulary-sharded logits are
gathered over the TP group before the argmax, so every TP rank picks the same token, and TP=1 and TP=2 pick the
same ones (ties go to the lowest id, as ``torch.argmax`` does).

Contrastive decoding (VCD, §9.4 step 4) takes two sets of rows, expert and amateur, that share their text and
differ in their images: ``z = (1 + λ)·z_E − λ·z_A`` on the expert's plausible head
``{v : p_E(v) ≥ β·max p_E}``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from megatron_po.data.collate import layout_rows
from megatron_po.train.batch import Rows
from megatron_po.train.rows import encode, forward_rows, unwrap


@dataclass
class Generation:
    ids: list[int]
    """The generated ids, without the end token."""
    token_logps: list[float]
    """log p of each generated id (the end token's included) under the (expert's) model distribution."""

    @property
    def mean_logp(self) -> float:
        """Mean token log-prob (HF's ``compute_transition_scores(normalize_logits=True)`` averaged)."""
        return sum(self.token_logps) / max(len(self.token_logps), 1)

    @property
    def ppl(self) -> float:
        return math.exp(-self.mean_logp)


@dataclass
class Prompts:
    """Rows to continue: chat-formatted prefixes whose image slots take ``images`` in ``row_images`` order."""

    prefixes: list[list[int]]
    images: torch.Tensor
    """[N, 3, H, W] pixels in [0, 1] (tiny_vlm's tower normalises them)."""
    row_images: list[list[int]]


def _full_vocab(logits: torch.Tensor, tp_group) -> torch.Tensor:
    """[R, V/tp] shards -> [R, V] on every TP rank."""
    world = dist.get_world_size(tp_group) if tp_group is not None else 1
    if world == 1:
        return logits
    parts = [torch.empty_like(logits) for _ in range(world)]
    dist.all_gather(parts, logits.contiguous(), group=tp_group)
    return torch.cat(parts, dim=-1)


@torch.no_grad()
def next_token_logits(model, tokenizer, prompts: Prompts, embeds: torch.Tensor, responses: Sequence[list[int]],
                      groups, pad_to_multiple_of: int = 1) -> torch.Tensor:
    """[R, V] fp32 logits of the token after ``prefix + response`` of each row (the tokenizer's vocabulary only:
    the padded rows of the output layer are cut off); ``embeds`` = ``encode(model, prompts.images)``."""
    batch = layout_rows(tokenizer, list(zip(prompts.prefixes, responses)), pad_to_multiple_of)
    device = groups.device
    # laid out on the host, then moved, as the trainer's rows are: no host sync per generated token
    rows = Rows.from_collated(batch | {"row_images": prompts.row_images}).to(device)
    logits = forward_rows(model, rows, embeds, prompts.images)  # [R, S, V/tp]
    last = batch["row_lengths"].to(device) - 1
    picked = logits[torch.arange(logits.shape[0], device=device), last].float()
    return _full_vocab(picked, groups.tp)[:, : tokenizer.vocab_size]


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: Prompts, groups, max_new_tokens: int,
                    amateur: Optional[Prompts] = None, cd_alpha: float = 0.1, cd_beta: float = 0.1,
                    pad_to_multiple_of: int = 1) -> list[Generation]:
    """Greedy continuations of every row, until the response end (``<|end|>`` or eos) or ``max_new_tokens``.

    Args:
        model: a tiny_vlm built with ``model.logprobs=logits`` (the forward returns logits), one pipeline stage.
        amateur: contrastive decoding's amateur rows (same prefixes' text, other images), or None.
        cd_alpha, cd_beta: VCD's λ and β (§9.4: 0.1 and 0.1 in the current code).
        pad_to_multiple_of: the TP size under sequence parallelism.
    """
    vlm = unwrap(model)
    if not (vlm.pre_process and vlm.post_process):
        raise ValueError("generation runs the whole model on one pipeline stage: use parallel.pp=1")
    stops = {tokenizer.eos_id, *tokenizer.response_end_ids}
    banned = torch.tensor(sorted(set(tokenizer.control_ids) - stops), dtype=torch.long)
    n = len(prompts.prefixes)
    # the images are encoded once; each step re-runs only the decoder over the rows still generating
    embeds = encode(model, prompts.images.to(groups.device))
    weak_embeds = None if amateur is None else encode(model, amateur.images.to(groups.device))
    out = [Generation([], []) for _ in range(n)]
    live = list(range(n))
    for _ in range(max_new_tokens):
        if not live:
            break
        responses = [out[i].ids for i in live]
        expert = next_token_logits(model, tokenizer, *_subset(prompts, embeds, live), responses, groups,
                                   pad_to_multiple_of)
        logp = torch.log_softmax(expert, dim=-1)
        scores = expert.clone()
        if amateur is not None:
            weak = next_token_logits(model, tokenizer, *_subset(amateur, weak_embeds, live), responses, groups,
                                     pad_to_multiple_of)
            head = expert >= expert.max(dim=-1, keepdim=True).values + math.log(cd_beta)
            scores = torch.where(head, (1 + cd_alpha) * expert - cd_alpha * weak, torch.full_like(expert, -math.inf))
        scores[:, banned] = -math.inf
        picks = scores.argmax(dim=-1).tolist()
        still = []
        for row, (i, token) in enumerate(zip(live, picks)):
            out[i].token_logps.append(float(logp[row, token]))
            if token in stops:
                continue
            out[i].ids.append(token)
            still.append(i)
        live = still
    return out


def _subset(prompts: Prompts, embeds: torch.Tensor, rows: list[int]) -> tuple[Prompts, torch.Tensor]:
    """The rows `rows` of `prompts` with only the images they use (renumbered), and those images' embeddings
    (tiny_vlm's [N, p, h])."""
    used = sorted({k for r in rows for k in prompts.row_images[r]})
    index = {k: j for j, k in enumerate(used)}
    return (Prompts([prompts.prefixes[r] for r in rows], prompts.images[used],
                    [[index[k] for k in prompts.row_images[r]] for r in rows]), embeds[used])
