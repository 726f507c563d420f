"""SFT on the chosen response of each pair (the TRL ``sft`` loss type; OBJECTIVES.md §1)."""

from dataclasses import dataclass
from typing import Optional

from torch import Tensor
from torch.distributed import ProcessGroup

from megatron_po.objectives.common import ObjectiveContext, PairLogps, check_pair_logps


@dataclass(frozen=True)
class SFTConfig:
    """SFT has no hyper-parameters; the class exists so every objective is built the same way."""


def loss_fn(
    logps: PairLogps,
    cfg: SFTConfig,
    group: Optional[ProcessGroup] = None,
    ctx: Optional[ObjectiveContext] = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-pair NLL of the chosen response as a per-token mean: ``−pol_w / max(len_w, 1)``.

    The mean is per sequence, not per token of the batch: the trainer averages per-pair losses over the global
    pair count, so each pair weighs the same however pairs are split over DP ranks and micro-batches, whereas a
    token-level mean would need a global token count to be layout-invariant. ``clamp_min(1)`` follows TRL for
    empty responses (§0.4). Reference log-probs and the rejected response are not read (they may be None/garbage).

    Args:
        logps: the batch; only ``policy_chosen_logps`` and ``chosen_lengths`` are used.
        cfg: unused.
        group: unused.
        ctx: only ``inputs_checked`` is read.

    Returns:
        ``(per_pair_loss [B] with grad, per-pair metric samples: name -> detached [B])``.
    """
    check_pair_logps(logps, "sft", logp_fields=("policy_chosen_logps",), length_fields=("chosen_lengths",),
                     ctx=ctx)
    pol_w = logps.policy_chosen_logps
    loss = -pol_w / logps.chosen_lengths.clamp_min(1).to(pol_w.dtype)
    return loss, {
        "sft/nll": loss.detach(),
        "logps/chosen": pol_w.detach(),
        "lengths/chosen": logps.chosen_lengths.detach().to(pol_w.dtype),
    }
