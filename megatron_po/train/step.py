"""Megatron's step contract for preference pairs: `forward_step(data_iterator, model) -> (output, loss_func)`.

A micro-batch holds B pairs laid out as rows [chosen_0..chosen_{B-1}; rejected_0..rejected_{B-1}]. Each image is
encoded once per pair and serves both rows; the policy runs with grad and the frozen reference runs under
no_grad on bit-identical inputs in the same step. The loss returned to the schedule is the *sum* of per-pair
losses with the pair count as "num_tokens": with `calculate_per_token_loss=True` megatron divides the gradients
once by the global pair count (all-reduced over DP), so any micro-batch split equals one large batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Iterator, Optional

import torch

from megatron_po.logprobs import sequence_logps
from megatron_po.models.vlm import VLMModel
from megatron_po.objectives import OBJECTIVES
from megatron_po.objectives.common import PairLogps
from megatron_po.parallel.groups import ParallelGroups


@dataclass
class PreferenceStep:
    """Everything `forward_step` needs besides the policy, passed explicitly (no globals)."""

    objective_name: str
    objective_cfg: Any
    groups: ParallelGroups
    reference: Optional[VLMModel]
    share_image_embeds: bool = False
    """Encode images once for policy and reference (both towers frozen and identical, see `same_vision`)."""

    def __post_init__(self):
        self.objective = OBJECTIVES[self.objective_name]
        if self.objective.needs_reference and self.reference is None:
            raise ValueError(f"objective {self.objective_name!r} needs a reference model")


def unwrap(model) -> VLMModel:
    while not isinstance(model, VLMModel):
        model = model.module
    return model


def same_vision(policy: VLMModel, reference: Optional[VLMModel]) -> bool:
    """True when the policy's vision tower + projector are frozen and bit-identical to the reference's."""
    if reference is None or not policy.vision_frozen:
        return False
    mine = dict(policy.vision.named_parameters()) | {f"p.{n}": p for n, p in policy.projector.named_parameters()}
    theirs = dict(reference.vision.named_parameters()) | {
        f"p.{n}": p for n, p in reference.projector.named_parameters()
    }
    return mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def causal_mask(seq_len: int, device) -> torch.Tensor:
    # explicit mask: megatron's default causal mask is allocated on "cuda"; True = masked
    return torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool, device=device), diagonal=1)[None, None]


def policy_and_reference_logps(step: PreferenceStep, batch: dict, model) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Runs the policy (with grad) and the reference (no grad) on one micro-batch.

    Returns:
        (policy_logps [2B], ref_logps [2B] or None) per-sequence sums of response-token log-probs.
    """
    policy = unwrap(model)
    b = batch["num_pairs"]
    tokens, labels = batch["tokens"], batch["labels"]
    mask = causal_mask(tokens.shape[1], tokens.device)
    image_index = torch.arange(b, device=tokens.device).repeat(2)
    needs_ref = step.objective.needs_reference

    if step.share_image_embeds:
        # tower and projector are frozen copies of the same weights in policy and reference: encode once
        with torch.no_grad():
            image_embeds = policy.encode_images(batch["images"])
        ref_image_embeds = image_embeds
    else:
        image_embeds = policy.encode_images(batch["images"])
        ref_image_embeds = None
    args = (tokens, batch["position_ids"], mask)
    logits = model(*args, image_embeds, batch["image_token_mask"], image_index)
    policy_logps, _ = sequence_logps(logits, labels, step.groups.tp)

    ref_logps = None
    if needs_ref:
        with torch.no_grad():
            if ref_image_embeds is None:
                ref_image_embeds = step.reference.encode_images(batch["images"])
            ref_logits = step.reference(*args, ref_image_embeds, batch["image_token_mask"], image_index)
            ref_logps, _ = sequence_logps(ref_logits, labels, step.groups.tp)
    return policy_logps, ref_logps


def split_pairs(batch: dict, policy_logps: torch.Tensor, ref_logps: Optional[torch.Tensor]) -> PairLogps:
    b = batch["num_pairs"]
    return PairLogps(
        policy_chosen_logps=policy_logps[:b],
        policy_rejected_logps=policy_logps[b:],
        ref_chosen_logps=None if ref_logps is None else ref_logps[:b],
        ref_rejected_logps=None if ref_logps is None else ref_logps[b:],
        chosen_lengths=batch["chosen_lengths"].to(policy_logps.dtype),
        rejected_lengths=batch["rejected_lengths"].to(policy_logps.dtype),
    )


def loss_func(step: PreferenceStep, batch: dict, ref_logps: Optional[torch.Tensor], policy_logps: torch.Tensor):
    pairs = split_pairs(batch, policy_logps, ref_logps)
    per_pair, samples = step.objective.loss_fn(pairs, step.objective_cfg, group=step.groups.dp)
    num_pairs = torch.tensor(batch["num_pairs"], dtype=torch.int)
    samples = {k: v.detach() for k, v in samples.items()}
    samples["loss"] = per_pair.detach()
    return per_pair.sum(), num_pairs, {"samples": samples}


def forward_step(step: PreferenceStep, data_iterator: Iterator[dict], model):
    batch = next(data_iterator)
    policy_logps, ref_logps = policy_and_reference_logps(step, batch, model)
    return policy_logps, partial(loss_func, step, batch, ref_logps)
