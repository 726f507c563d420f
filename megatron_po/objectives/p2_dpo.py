"""P2-DPO: "Perceptual-Processing DPO", ICLR 2026; code ``ZrpChuang/P2-DPO``
``Training/llava_dpo/train/p2_dpo_loss.py`` (commit 6385a6f) (OBJECTIVES.md §9).

Each sample (one image–question instance) carries a focus pair (y_w^f, y_l^f), a robustness pair (y_w^r, y_l^r)
under the noisy image I_noise, or both, plus two precomputed CLIP scores (§9.1):

    L_dpo_focus = −log σ(β·[(π(y_w^f) − π_ref(y_w^f)) − (π(y_l^f) − π_ref(y_l^f))])
    L_calib     = −log σ(β·[(logπ_θ(y_w^f|I,I_crop,P) − logπ_θ(y_w^f|I_deg,P))
                            − (logπ_ref(y_l^f|I,I_crop,P) − logπ_ref(y_l^f|I_deg,P))])
    L_focus     = L_dpo_focus + λ_calib·L_calib
    L_dpo_rob   = −log σ(β·[Δ_w − Δ_l])                         (both responses under I_noise)
    r = CLIP(P, I_crop) / max(CLIP(P, I), eps),  α = α_max·tanh((r − 1)/τ_ddw)
    w_focus = w_base + α,  w_robust = w_base − α                  (constants; ∈ [0.3, 0.7] at the defaults)
    L_i = w_focus·L_focus + w_robust·L_dpo_rob

Readings (OBJECTIVES.md §12): P2-1 the calibration reference gain is on the *losing* response y_l^f, as the code
docstring's "paper term" (default, ``calib_reference="rejected"``), or on y_w^f (mDPO-style, ``"chosen"``: the
calibration logit is 0 at step 0); P2-2 (visual context of the focus pair, [R] the clean image I) and P2-3 (full
response sums, not V-DPO's divergent suffix) are conventions of the caller's log-probs, not of this function;
P2-4 λ_calib = 0.3. P2-5 (λ_ca = ``cd_alpha``) belongs to robust-pair *generation* (§9.4), so it is not a field here.

Choices where the sources are silent [R]: branches are masked per sample (``has_focus``, ``has_robust``, §9.1
"Missing branches"), and a single-branch sample puts weight 1 on its branch (the code does this only for whole
batches without a branch); a sample with no branch has loss 0 and ``pair_weight`` 0, so the trainer's Σ loss /
Σ pair_weight is the mean over samples that have a branch, exactly over the global batch (§0.2, §11). Values in
absent slots are never read (NaN there is fine and gets a zero gradient). DDW needs finite CLIP scores only where
both branches are present. Calibration inputs may be None only when λ_calib = 0 (the code silently skips the term
whenever they are missing). Reference terms are detached here, although the code leaves that to its trainer.

The trainer feeds it from P2 records (data/p2_records.py): data/p2_collate.py lays the six forwards of every sample
of a micro-batch out as rows of one policy and one reference forward, and train/p2_inputs.py gathers them into
``P2Logps``. The per-branch metric samples are reduced by ``common.summarize_metrics`` over the samples that have
the branch.
"""

from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributed import ProcessGroup

from megatron_po.objectives.common import MetricReductions, ObjectiveContext

CALIB_REFERENCES = ("rejected", "chosen")

FOCUS_FIELDS = ("policy_focus_chosen_logps", "policy_focus_rejected_logps",
                "ref_focus_chosen_logps", "ref_focus_rejected_logps")
CALIB_FIELDS = ("policy_calib_aug_logps", "policy_calib_deg_logps", "ref_calib_aug_logps", "ref_calib_deg_logps")
ROBUST_FIELDS = ("policy_robust_chosen_logps", "policy_robust_rejected_logps",
                 "ref_robust_chosen_logps", "ref_robust_rejected_logps")
CLIP_FIELDS = ("clip_crop_score", "clip_image_score")


_FOCUS, _ROBUST = ("p2/has_focus",), ("p2/has_robust",)
METRICS = MetricReductions(
    means={"p2/focus_logit": "p2/focus_logit_mean", "p2/calib_logit": "p2/calib_logit_mean",
           "p2/robust_logit": "p2/robust_logit_mean", "p2/single_branch": "p2/frac_single_branch",
           "p2/has_focus": "p2/frac_focus", "p2/has_robust": "p2/frac_robust", "p2/w_robust": "p2/w_robust_mean"},
    spread=("p2/w_focus",),
    # per-branch values are defined only for the samples that have the branch (OBJECTIVES.md §9.6)
    masks={
        "p2/focus_loss": _FOCUS, "p2/calib_loss": _FOCUS, "p2/focus_logit": _FOCUS, "p2/calib_logit": _FOCUS,
        "p2/focus_accuracy": _FOCUS, "p2/calib_gain_policy": _FOCUS,
        "p2/robust_loss": _ROBUST, "p2/robust_logit": _ROBUST, "p2/robust_accuracy": _ROBUST,
        "p2/single_branch": ("pair_weight",),
        # DDW acts on samples with both branches; single-branch samples weigh their branch 1
        "p2/w_focus": _FOCUS + _ROBUST, "p2/w_robust": _FOCUS + _ROBUST,
    },
)


@dataclass(frozen=True)
class P2DPOConfig:
    beta: float = 0.1
    """β (the code's ``scale_coeff``) of all three logits: focus DPO, calibration and robust DPO."""
    lambda_calib: float = 0.3
    """λ_calib (``lambda_cal``), weight of L_calib inside L_focus (§12 P2-4: 0.3 current code; 0.2 first script)."""
    calib_reference: str = "rejected"
    """Which response the calibration's reference gain is on (§12 P2-1): "rejected" (y_l^f, the code's "paper
    term", default) or "chosen" (y_w^f, mDPO-style; logit 0 at initialisation). The loss formula is the same for
    both: this field tells the caller which response to score in the reference's ``ref_calib_*`` forwards."""
    use_ddw: bool = True
    """Dynamic deficit weighting from the CLIP scores; False is the "w/o DDW" ablation (static w_base / w_base)."""
    w_base: float = 0.5
    """Base weight of each branch for samples with both branches."""
    alpha_max: float = 0.2
    """Largest DDW shift α of the branch weights (weights stay in [w_base − α_max, w_base + α_max])."""
    tau_ddw: float = 0.1
    """Temperature τ of ``tanh((r − 1)/τ)`` on the CLIP ratio r."""
    ddw_eps: float = 1e-8
    """Floor on CLIPScore(P, I) in the ratio's denominator (code ``eps``)."""

    def __post_init__(self):
        if not self.beta > 0:
            raise ValueError(f"p2_dpo.beta must be > 0, got {self.beta}")
        if not self.lambda_calib >= 0:
            raise ValueError(f"p2_dpo.lambda_calib must be >= 0, got {self.lambda_calib}")
        if self.calib_reference not in CALIB_REFERENCES:
            raise ValueError(
                f"p2_dpo.calib_reference must be one of {list(CALIB_REFERENCES)}, got {self.calib_reference!r}"
            )
        if not isinstance(self.use_ddw, bool):
            raise ValueError(f"p2_dpo.use_ddw must be a bool, got {self.use_ddw!r}")
        if not self.w_base > 0:
            raise ValueError(f"p2_dpo.w_base must be > 0, got {self.w_base}")
        # a negative branch weight would turn that branch's minimisation into maximisation
        if not 0 <= self.alpha_max <= self.w_base:
            raise ValueError(f"p2_dpo.alpha_max must be in [0, w_base = {self.w_base}], got {self.alpha_max}")
        if not self.tau_ddw > 0:
            raise ValueError(f"p2_dpo.tau_ddw must be > 0, got {self.tau_ddw}")
        if not self.ddw_eps > 0:
            raise ValueError(f"p2_dpo.ddw_eps must be > 0, got {self.ddw_eps}")


@dataclass
class P2Logps:
    """Per-sample sequence log-prob sums of P2-DPO's three terms for a batch of B samples (§9.2).

    Policy fields carry grad; reference fields are detached by ``loss_fn``. A whole branch may be None (no sample
    of the batch has it); otherwise entries of absent samples (mask False) are ignored and may hold any value.
    """

    # focus pair: (y_w^f, y_l^f) under the clean image I and the plain question P ([R] §12 P2-2)
    policy_focus_chosen_logps: Optional[Tensor]
    """[B] logπ_θ(y_w^f | I, P), summed over response tokens."""
    policy_focus_rejected_logps: Optional[Tensor]
    """[B] logπ_θ(y_l^f | I, P)."""
    ref_focus_chosen_logps: Optional[Tensor]
    """[B] logπ_ref(y_w^f | I, P)."""
    ref_focus_rejected_logps: Optional[Tensor]
    """[B] logπ_ref(y_l^f | I, P)."""
    # calibration: plain question P under the two-image context [I, I_crop] and the degraded image I_deg
    policy_calib_aug_logps: Optional[Tensor]
    """[B] logπ_θ(y_w^f | I, I_crop, P)."""
    policy_calib_deg_logps: Optional[Tensor]
    """[B] logπ_θ(y_w^f | I_deg, P)."""
    ref_calib_aug_logps: Optional[Tensor]
    """[B] logπ_ref(y | I, I_crop, P) with y = y_l^f (``calib_reference="rejected"``, default) or y_w^f."""
    ref_calib_deg_logps: Optional[Tensor]
    """[B] logπ_ref(y | I_deg, P), same y."""
    # robustness pair: (y_w^r, y_l^r), both under the same I_noise tensor for policy and reference
    policy_robust_chosen_logps: Optional[Tensor]
    """[B] logπ_θ(y_w^r | I_noise, robust prompt)."""
    policy_robust_rejected_logps: Optional[Tensor]
    """[B] logπ_θ(y_l^r | I_noise, robust prompt)."""
    ref_robust_chosen_logps: Optional[Tensor]
    """[B] logπ_ref(y_w^r | I_noise, robust prompt)."""
    ref_robust_rejected_logps: Optional[Tensor]
    """[B] logπ_ref(y_l^r | I_noise, robust prompt)."""
    # DDW inputs and branch masks
    clip_crop_score: Optional[Tensor] = None
    """[B] precomputed CLIPScore(P, I_crop) (raw cosine, §9.5); needed where both branches are present and DDW
    is on."""
    clip_image_score: Optional[Tensor] = None
    """[B] precomputed CLIPScore(P, I)."""
    has_focus: Optional[Tensor] = None
    """[B] bool, the sample has a focus pair (and its calibration forwards); None = all True if the focus fields
    are given, all False if they are None."""
    has_robust: Optional[Tensor] = None
    """[B] bool, the sample has a robustness pair; None likewise."""


def _branch_mask(logps: P2Logps, name: str, tensors: tuple, b: int, device) -> Tensor:
    """The branch's [B] bool mask; a branch whose log-prob fields are None must be absent from every sample."""
    mask = getattr(logps, name)
    given = [t is not None for t in tensors]
    if any(given) and not all(given):
        raise ValueError(f"objective 'p2_dpo': {name[4:]} branch fields must all be given or all be None")
    if mask is None:
        return torch.full((b,), all(given), dtype=torch.bool, device=device)
    if mask.dtype != torch.bool or mask.shape != (b,):
        raise ValueError(f"objective 'p2_dpo': {name} must be a bool tensor of shape [{b}], got "
                         f"{mask.dtype} {list(mask.shape)}")
    if not all(given) and bool(mask.any()):
        raise ValueError(f"objective 'p2_dpo': {name} is set for some samples but the branch's log-probs are None")
    return mask


def _present(t: Tensor, mask: Tensor, dtype) -> Tensor:
    # zero-filled absent slots keep NaN/inf placeholders out of both the forward and the backward (0·NaN = NaN)
    return torch.where(mask, t.to(dtype), torch.zeros((), dtype=dtype, device=t.device))


def ddw_weights(clip_crop_score: Tensor, clip_image_score: Tensor, cfg: P2DPOConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Dynamic deficit weights from the CLIP scores (§9.1; code ``dynamic_deficit_weights``), detached.

    ``r = s_crop / max(s_image, eps)``, ``α = α_max·tanh((r − 1)/τ_ddw)``; a crop that matches the question
    better than the whole image (r > 1) shifts weight to the focus branch.

    Returns:
        ``(w_focus [B], w_robust [B], r [B])``.
    """
    ratio = clip_crop_score.detach() / clip_image_score.detach().clamp_min(cfg.ddw_eps)
    alpha = cfg.alpha_max * torch.tanh((ratio - 1.0) / cfg.tau_ddw)
    return cfg.w_base + alpha, cfg.w_base - alpha, ratio


def loss_fn(
    logps: P2Logps,
    cfg: P2DPOConfig,
    group: Optional[ProcessGroup] = None,
    ctx: Optional[ObjectiveContext] = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-sample P2-DPO loss ``L_i = w_focus·(L_dpo_focus + λ_calib·L_calib) + w_robust·L_dpo_rob`` (§9.1).

    Single-branch samples weight their branch by 1; samples with no branch give 0. The weights are constants, so
    e.g. ``∂L/∂logπ_θ(y_w^f|I,I_crop) = −w_focus·λ_calib·β·σ(−z_calib) = −∂L/∂logπ_θ(y_w^f|I_deg)``. At step 0
    (policy == reference in every forward) both DPO losses are ln 2, and L_calib is
    ``softplus(−β·(G_ref(y_w^f) − G_ref(y_l^f)))`` with G = aug − deg log-prob gain, i.e. ln 2 only under
    ``calib_reference="chosen"`` or when the two gains agree.

    Metric samples (detached ``[B]``; branch values are 0 where the branch is absent — ``summarize_metrics``
    averages them over the samples that have the branch): ``pair_weight`` (1 if the sample has any branch; the
    trainer divides Σ loss by its global sum), ``p2/has_focus``, ``p2/has_robust`` (per-branch counts),
    ``p2/single_branch``, ``p2/{focus,calib,robust}_loss``, ``p2/{focus,calib,robust}_logit`` (β-margins),
    ``p2/{focus,robust}_accuracy`` (logit > 0), ``p2/calib_gain_policy`` (Δπ_θ(y_w^f) = aug − deg),
    ``p2/w_focus`` and ``p2/w_robust`` (the weights applied: DDW or w_base with both branches, else 1 or 0).

    Args:
        logps: the batch (see ``P2Logps``).
        cfg: hyper-parameters.
        group: unused (no batch statistics, §11); accepted so every objective has one signature.
        ctx: only ``inputs_checked`` is read.

    Returns:
        ``(per_pair_loss [B] with grad, per-pair metric samples: name -> detached [B])``.

    Raises:
        ValueError: mis-shaped inputs, a branch's fields partly None, a mask set for a branch without inputs,
            calibration inputs None with λ_calib > 0, missing CLIP scores where DDW needs them, or non-finite
            values in present slots.
    """
    focus_t = tuple(getattr(logps, n) for n in FOCUS_FIELDS)
    calib_t = tuple(getattr(logps, n) for n in CALIB_FIELDS)
    robust_t = tuple(getattr(logps, n) for n in ROBUST_FIELDS)
    first = next((t for t in (*focus_t, *robust_t) if t is not None), None)
    if first is None:
        raise ValueError("objective 'p2_dpo': needs the focus or the robust branch's log-probs, both are None")
    for f in fields(logps):
        t = getattr(logps, f.name)
        # a [B, 1] tensor next to a [B] one would silently broadcast every per-sample quantity to [B, B]
        if t is not None and (t.dim() != 1 or t.shape != first.shape):
            raise ValueError(f"objective 'p2_dpo': {f.name} must have shape [B] = {list(first.shape)}, "
                             f"got {list(t.shape)}")
    b, device, dtype = first.shape[0], first.device, first.dtype
    has_f = _branch_mask(logps, "has_focus", focus_t, b, device)
    has_r = _branch_mask(logps, "has_robust", robust_t, b, device)
    if any(t is None for t in calib_t) and not all(t is None for t in calib_t):
        raise ValueError("objective 'p2_dpo': calibration fields must all be given or all be None")
    use_calib = calib_t[0] is not None
    if not use_calib and cfg.lambda_calib > 0 and focus_t[0] is not None:
        raise ValueError(f"objective 'p2_dpo': calibration log-probs are None but p2_dpo.lambda_calib = "
                         f"{cfg.lambda_calib} > 0 (set it to 0 for the ablation without L_calib)")
    both = has_f & has_r
    # DDW only matters for samples with both branches, so only batches holding both need the CLIP scores
    use_ddw = cfg.use_ddw and focus_t[0] is not None and robust_t[0] is not None
    if use_ddw and (logps.clip_crop_score is None or logps.clip_image_score is None):
        raise ValueError("objective 'p2_dpo': p2_dpo.use_ddw needs clip_crop_score and clip_image_score")

    checks = [(n, t, has_f) for n, t in zip(FOCUS_FIELDS, focus_t) if t is not None]
    checks += [(n, t, has_f) for n, t in zip(CALIB_FIELDS, calib_t) if t is not None]
    checks += [(n, t, has_r) for n, t in zip(ROBUST_FIELDS, robust_t) if t is not None]
    if use_ddw:
        checks += [(n, getattr(logps, n), both) for n in CLIP_FIELDS]
    # one host sync for all finiteness checks (none when the trainer checks them per step); the per-field search
    # runs only on failure
    checked = ctx is not None and ctx.inputs_checked
    ok = None if checked else torch.stack([(torch.isfinite(t.detach()) | ~m).all() for _, t, m in checks])
    if ok is not None and not ok.all():
        bad = [n for (n, _, _), good in zip(checks, ok.tolist()) if not good]
        raise ValueError(f"objective 'p2_dpo': non-finite values in present samples of {bad}")

    zeros = torch.zeros(b, dtype=dtype, device=device)

    def dpo(tensors, mask):
        if tensors[0] is None:
            return zeros, zeros
        pol_w, pol_l, ref_w, ref_l = (_present(t, mask, dtype) for t in tensors)
        z = cfg.beta * ((pol_w - ref_w.detach()) - (pol_l - ref_l.detach()))
        return torch.where(mask, -F.logsigmoid(z), zeros), z

    focus_dpo, z_focus = dpo(focus_t, has_f)
    robust_dpo, z_robust = dpo(robust_t, has_r)
    if use_calib:
        pol_aug, pol_deg, ref_aug, ref_deg = (_present(t, has_f, dtype) for t in calib_t)
        gain_policy = pol_aug - pol_deg
        z_calib = cfg.beta * (gain_policy - (ref_aug.detach() - ref_deg.detach()))
        calib = torch.where(has_f, -F.logsigmoid(z_calib), zeros)
    else:
        gain_policy = z_calib = calib = zeros
    focus = focus_dpo + cfg.lambda_calib * calib

    if use_ddw:
        crop, image = (_present(getattr(logps, n), both, dtype) for n in CLIP_FIELDS)
        ddw_f, ddw_r, _ = ddw_weights(crop, image, cfg)
    else:
        ddw_f = ddw_r = torch.full_like(zeros, cfg.w_base)
    w_f = torch.where(both, ddw_f, has_f.to(dtype))
    w_r = torch.where(both, ddw_r, has_r.to(dtype))
    loss = w_f * focus + w_r * robust_dpo

    f_mask, r_mask = has_f.to(dtype), has_r.to(dtype)
    metrics = {
        "pair_weight": (has_f | has_r).to(dtype),
        "p2/has_focus": f_mask,
        "p2/has_robust": r_mask,
        "p2/single_branch": (has_f ^ has_r).to(dtype),
        "p2/focus_loss": focus_dpo,
        "p2/calib_loss": calib,
        "p2/robust_loss": robust_dpo,
        "p2/focus_logit": z_focus * f_mask,
        "p2/calib_logit": z_calib * f_mask,
        "p2/robust_logit": z_robust * r_mask,
        "p2/focus_accuracy": ((z_focus > 0) & has_f).to(dtype),
        "p2/robust_accuracy": ((z_robust > 0) & has_r).to(dtype),
        "p2/calib_gain_policy": gain_policy * f_mask,
        "p2/w_focus": w_f,
        "p2/w_robust": w_r,
    }
    return loss, {name: value.detach() for name, value in metrics.items()}
