"""tiny_vlm's images for the collators: every image resized to one square and worth one fixed number of slots.

:class:`FixedSizeImages` answers what the HF families' handler (:class:`megatron_po.data.hf_chat.HFImages`) answers,
so the collators and datasets treat every family alike: slots per image, loading, collation into what the model
takes, positions, and P2-DPO's I_noise. Nothing here needs an image's header: the slots do not depend on its size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from megatron_po.data.p2_records import noised_pixels
from megatron_po.data.records import ImageFile, load_image, to_tensor


class FixedSizeImages:
    """Pixels ``[3, image_size, image_size]`` in [0, 1] (the tower normalises them), ``num_patches`` slots each.

    Args:
        image_size: side every image is resized to (bicubic, aspect ratio not kept): ``model.vision.image_size``.
        num_patches: decoder slots per image, the tower's patch count: ``model.vision.num_patches``.
    """

    def __init__(self, image_size: int, num_patches: int):
        if image_size < 1 or num_patches < 0:
            raise ValueError(f"image_size must be >= 1 and num_patches >= 0, got {image_size} and {num_patches}")
        self.image_size = image_size
        self.num_patches = num_patches

    def num_tokens(self, image: ImageFile) -> int:
        return self.num_patches

    def num_tokens_of_size(self, width: int, height: int) -> int:
        return self.num_patches

    def load(self, images: Sequence[ImageFile]) -> dict:
        """k image files -> ``{"pixel_values": [k, 3, S, S] float32, "num_tokens": [k] long}``."""
        return self._part([load_image(f, self.image_size) for f in images])

    def load_pils(self, pils: Sequence) -> dict:
        """k decoded RGB images -> the part :meth:`load` gives."""
        return self._part([to_tensor(p, self.image_size) for p in pils])

    def _part(self, pixels: list[torch.Tensor]) -> dict:
        return {"pixel_values": torch.stack(pixels),
                "num_tokens": torch.full((len(pixels),), self.num_patches, dtype=torch.long)}

    def collate(self, parts: Sequence[dict]) -> torch.Tensor:
        """The parts' images in order, ``[N, 3, S, S]`` float32: what tiny_vlm's ``encode_images`` takes."""
        return torch.cat([p["pixel_values"] for p in parts]).float()

    def position_ids(self, tokens: torch.Tensor, images: torch.Tensor, row_images: list[list[int]]) -> torch.Tensor:
        """[R, S] plain positions 0..S-1 (rotary over the row, image slots included)."""
        rows, seq_len = tokens.shape
        return torch.arange(seq_len, dtype=torch.long).unsqueeze(0).expand(rows, -1).contiguous()

    def noised(self, part: dict, noise_step: int, seed: int) -> dict:
        """P2-DPO's I_noise of a loaded part: VCD noise on the tower's normalised input, in pixel units
        (p2_records.noised_pixels, which the pair generator also applies)."""
        return {**part, "pixel_values": noised_pixels(part["pixel_values"], noise_step, seed)}
