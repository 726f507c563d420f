"""P2-DPO samples -> one batch of rows for the six forwards of OBJECTIVES.md §9.2, and their dataset.

Every sample contributes the rows of the branches it has (layout of each row as in :mod:`collate`):

==================  ======================  ==================  =======================================
term                images in the row       prompt              response (policy; reference if other)
==================  ======================  ==================  =======================================
``focus_chosen``    I                       P                   y_w^f
``focus_rejected``  I                       P                   y_l^f
``calib_aug``       I, I_crop               P                   y_w^f; y_l^f with calib_reference
``calib_deg``       I_deg                   P                   y_w^f  ="rejected" (OBJECTIVES.md §12 P2-1)
``robust_chosen``   I_noise                 robust prompt       y_w^r
``robust_rejected`` I_noise                 robust prompt       y_l^r
==================  ======================  ==================  =======================================

Rows are term-major (all ``focus_chosen`` rows, then all ``focus_rejected`` rows, ...), so the rows of one
micro-batch — of any image condition — go through one policy forward; ``p2_rows[t, i]`` is the row of term t of
sample i, -1 where the sample lacks the branch. Under calib_reference="rejected" the reference scores other
responses on the calibration rows: the batch then carries ``ref_rows``, a second view with the same rows, images
and order, whose calibration rows hold y_l^f.

Each condition goes through the family's image handler (``FamilySpec.image_handler``): HF families' processors
take it at its own size, so I_crop takes the slots its crop's size gives; tiny_vlm resizes every condition to its
square with the same slots. I_noise is the handler's ``noised``: VCD noise on the tower's normalised input tensor,
as VCD noises it (the processor's normalised pixels; tiny_vlm's pixels normalised, noised and mapped back).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from megatron_po.data.collate import CollateConfig, layout_rows, prompt_prefix
from megatron_po.data.p2_records import P2Record
from megatron_po.data.tokenizer import Tokenizer

P2_TERMS: tuple[str, ...] = ("focus_chosen", "focus_rejected", "calib_aug", "calib_deg", "robust_chosen",
                             "robust_rejected")
"""Row terms in batch order; also the order of ``p2_rows``."""


class P2Collator:
    """Builds P2-DPO batches from ``(record, image conditions)`` samples.

    Args:
        tokenizer: text ids and special ids.
        cfg: lengths and padding (``max_length`` bounds every row, the two-image calibration row included).
        images: the family's image handler (as :class:`megatron_po.data.collate.PairCollator`'s).
        calib_reference: the response the reference scores on the calibration rows, "rejected" (y_l^f) or
            "chosen" (y_w^f), as ``P2DPOConfig.calib_reference``.
    """

    def __init__(self, tokenizer: Tokenizer, cfg: CollateConfig, images, calib_reference: str = "rejected"):
        if calib_reference not in ("rejected", "chosen"):
            raise ValueError(f"calib_reference must be 'rejected' or 'chosen', got {calib_reference!r}")
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.calib_reference = calib_reference
        self.images = images

    def _rows(self, record: P2Record, image_tokens: dict[str, int] | None = None
              ) -> dict[str, tuple[list[int], tuple[str, ...], list[int], list[int]]]:
        """term -> (prefix ids, image keys, policy response ids, reference response ids), responses + <|end|>;
        `image_tokens`: slots of each condition (None: the config's fixed count for all)."""
        tok = self.tokenizer
        n = image_tokens or {k: self.cfg.num_image_tokens for k in ("image", "crop", "deg", "noise")}
        prefix = lambda prompt, *keys: prompt_prefix(tok, prompt, [n[k] for k in keys])  # noqa: E731
        rows = {}
        if record.focus is not None:
            y_w = tok.encode(record.focus.chosen) + tok.response_end_ids
            y_l = tok.encode(record.focus.rejected) + tok.response_end_ids
            y_ref = y_l if self.calib_reference == "rejected" else y_w
            rows["focus_chosen"] = (prefix(record.prompt, "image"), ("image",), y_w, y_w)
            rows["focus_rejected"] = (prefix(record.prompt, "image"), ("image",), y_l, y_l)
            # the calibration prompt is the plain question under both image conditions (§9.1)
            rows["calib_aug"] = (prefix(record.prompt, "image", "crop"), ("image", "crop"), y_w, y_ref)
            rows["calib_deg"] = (prefix(record.prompt, "deg"), ("deg",), y_w, y_ref)
        if record.robust is not None:
            robust_prefix = prefix(record.robust.prompt, "noise")
            y_w = tok.encode(record.robust.chosen) + tok.response_end_ids
            y_l = tok.encode(record.robust.rejected) + tok.response_end_ids
            rows["robust_chosen"] = (robust_prefix, ("noise",), y_w, y_w)
            rows["robust_rejected"] = (robust_prefix, ("noise",), y_l, y_l)
        return rows

    def num_tokens(self, record: P2Record, image_tokens: dict[str, int] | None = None) -> int:
        """Tokens of the sample's policy rows (what packing balances and fills rows with)."""
        return sum(len(prefix) + len(y) for prefix, _, y, _ in self._rows(record, image_tokens).values())

    def fits(self, record: P2Record, image_tokens: dict[str, int] | None = None) -> tuple[bool, str]:
        """Whether every row of the sample fits as is (a sample is kept whole or dropped, never truncated).

        Returns:
            ``(True, "")`` or ``(False, reason)``, reason one of ``collate.SKIP_REASONS``.
        """
        reason = self._reason(self._rows(record, image_tokens))
        return not reason, reason

    def measure(self, record: P2Record, image_tokens: dict[str, int] | None = None) -> tuple[str, tuple[int, ...]]:
        """``(skip reason or "", tokens of the sample's policy row of each term in P2_TERMS, 0 where absent)``,
        tokenized once (their sum is :meth:`num_tokens`)."""
        rows = self._rows(record, image_tokens)
        return self._reason(rows), tuple(len(rows[t][0]) + len(rows[t][2]) if t in rows else 0 for t in P2_TERMS)

    def _reason(self, rows: dict) -> str:
        for branch in ("focus", "robust"):
            if branch + "_chosen" not in rows:
                continue
            chosen, rejected = rows[branch + "_chosen"][2], rows[branch + "_rejected"][2]
            # whitespace-only text encodes to nothing but <|end|>
            if len(chosen) == 1 or len(rejected) == 1:
                return "empty_response"
            if chosen == rejected:
                return "identical_pair"
        if max(len(prefix) + max(len(y), len(y_ref)) for prefix, _, y, y_ref in rows.values()) > self.cfg.max_length:
            return "too_long"
        return ""

    def __call__(self, samples: Sequence[tuple[P2Record, dict[str, dict]]]) -> dict:
        """Collates B samples.

        Args:
            samples: ``(record, conditions)`` for each sample (`P2Dataset.__getitem__`: the handler's loaded part
                per condition, ``num_tokens`` among them); every sample must fit.

        Returns:
            The policy's rows (``tokens``, ``labels``, ``loss_mask``, ``position_ids``, ``image_token_mask``
            [R, S], ``row_images``), ``images`` the handler's collation (tiny_vlm: [N, 3, H, W]; each
            condition once per sample), ``p2_rows`` [6, B]
            long (row of each term, order ``P2_TERMS``, -1 = branch absent), ``has_focus`` / ``has_robust`` [B]
            bool, ``clip_crop_score`` / ``clip_image_score`` [B] float32 (NaN where not given), ``num_pairs`` B,
            ``ids`` (the B record ids),
            and ``ref_rows`` (the reference's view: same keys and rows) when its calibration responses differ.

        Raises:
            ValueError: empty batch, or a sample that does not fit.
        """
        if not samples:
            raise ValueError("cannot collate an empty batch")
        b = len(samples)
        per_sample, images, image_index = [], [], []
        for record, conditions in samples:
            counts = {k: int(v["num_tokens"].sum()) for k, v in conditions.items()}
            rows = self._rows(record, counts)
            reason = self._reason(rows)
            if reason:
                raise ValueError(f"sample {record.id!r} cannot be collated ({reason}); "
                                 "filter it out beforehand with P2Collator.fits")
            keys = {k for _, row_keys, _, _ in rows.values() for k in row_keys}
            # each condition the rows show enters the batch once, in a fixed order
            shown = [k for k in ("image", "crop", "deg", "noise") if k in keys]
            index = {k: len(images) + j for j, k in enumerate(shown)}
            images += [conditions[k] for k in index]
            per_sample.append(rows)
            image_index.append(index)

        policy, reference, row_images = [], [], []
        p2_rows = torch.full((len(P2_TERMS), b), -1, dtype=torch.long)
        for t, term in enumerate(P2_TERMS):
            for i, rows in enumerate(per_sample):
                if term in rows:
                    prefix, keys, y, y_ref = rows[term]
                    p2_rows[t, i] = len(policy)
                    policy.append((prefix, y))
                    reference.append((prefix, y_ref))
                    row_images.append([image_index[i][k] for k in keys])

        records = [record for record, _ in samples]
        images = self.images.collate(images)
        batch = {
            **self._layout(policy, images, row_images),
            "row_images": row_images,
            "images": images,
            "p2_rows": p2_rows,
            "has_focus": torch.tensor([r.focus is not None for r in records]),
            "has_robust": torch.tensor([r.robust is not None for r in records]),
            "num_pairs": b,
            "ids": [r.id for r in records],
        }
        for name in ("clip_crop_score", "clip_image_score"):
            values = [getattr(r, name) for r in records]
            batch[name] = torch.tensor([math.nan if v is None else v for v in values], dtype=torch.float32)
        if reference != policy:
            batch["ref_rows"] = {**self._layout(reference, images, row_images), "row_images": row_images}
        return batch

    def _layout(self, rows: list, images, row_images: list[list[int]]) -> dict:
        out = layout_rows(self.tokenizer, rows, self.cfg.pad_to_multiple_of)
        # M-RoPE positions (Qwen2.5-VL) follow each row's images
        out["position_ids"] = self.images.position_ids(out["tokens"], images, row_images)
        return out
