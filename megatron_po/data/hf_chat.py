"""Prompt and response ids for Hugging Face families: their tokenizer.json, chat template and image processor.

`HFTokenizer` offers what the collator asks of our sentencepiece `Tokenizer` (encode, encode_with_offsets, pad
and image ids) plus the chat layout, `prompt_ids` and `response_end_ids`, which the family module defines
(`format_prompt`, `RESPONSE_SUFFIX`). It reads tokenizer.json with the `tokenizers` library (installed with the
`[hf]` extra); transformers itself is not needed to train. Special tokens written by the template
(`<|im_start|>`, `<|image_pad|>`, ...) are added tokens of tokenizer.json. Only the template's own text is
encoded with them parsed; a record's text never is (`encode`: the tokenizer's `encode_special_tokens`), so a
prompt or response that contains `<|image_pad|>` or `<|im_end|>` verbatim cannot forge an image slot or close
its turn: it is text, as the characters it is made of.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import torch

from megatron_po.data.p2_records import vcd_noise
from megatron_po.data.records import ImageFile, image_size, open_rgb, prompt_parts


class HFTokenizer:
    """A HF family's tokenizer and chat layout.

    Args:
        family: the HF family's module (its spec's ``hf``: a models.family.HFFamilyModule), which defines the
            chat layout and the image processing.
        hf_path: directory with tokenizer.json, config.json and preprocessor_config.json (a converted
            checkpoint's hf/ directory, or the original HF directory).
    """

    def __init__(self, family: ModuleType, hf_path: str | Path):
        from tokenizers import Tokenizer as _Tokenizer

        self.family = family
        self.path = Path(hf_path)
        for name in ("tokenizer.json", "config.json", "preprocessor_config.json"):
            if not (self.path / name).is_file():
                raise FileNotFoundError(f"model.hf_path: {self.path / name} not found")
        self._tok = _Tokenizer.from_file(str(self.path / "tokenizer.json"))
        self.hf_config = json.loads((self.path / "config.json").read_text())
        self.preprocessor_config = json.loads((self.path / "preprocessor_config.json").read_text())
        tok_cfg_file = self.path / "tokenizer_config.json"
        tok_cfg = json.loads(tok_cfg_file.read_text()) if tok_cfg_file.is_file() else {}
        self.image_id = self.family.image_token_id(self.hf_config)
        pad = tok_cfg.get("pad_token")
        pad = pad.get("content") if isinstance(pad, dict) else pad
        self.pad_id = self._tok.token_to_id(pad) if pad else None
        if self.pad_id is None:
            self.pad_id = 0  # padded positions are never attended to from real ones nor supervised
        self.response_end_ids = self._template(self.family.RESPONSE_SUFFIX)
        # the added tokens the chat layout is made of (turn markers, image slots and their delimiters)
        layout = self._template(self.family.format_prompt("x", [1], system="x") + self.family.RESPONSE_SUFFIX)
        self._structural = set(self._tok.get_added_tokens_decoder()).intersection(layout) | {self.image_id}

    @property
    def files(self) -> list[Path]:
        """The files that decide the token ids, the chat layout and the image processing: every file of hf_path
        but weights (the reference cache hashes them)."""
        weights = (".safetensors", ".bin", ".pt", ".pth", ".distcp")
        return sorted(p for p in self.path.rglob("*") if p.is_file() and not p.name.endswith(weights))

    def _plain(self, text: str):
        """A record's text: special-token strings are text, never their ids."""
        self._tok.encode_special_tokens = True
        try:
            enc = self._tok.encode(text, add_special_tokens=False)
        finally:
            self._tok.encode_special_tokens = False
        forged = self._structural.intersection(enc.ids)
        if forged:  # a layout token the tokenizer does not mark special: its string still maps to it
            names = sorted(self._tok.id_to_token(i) for i in forged)
            raise ValueError(f"text contains the chat layout's token(s) {names}, which this tokenizer cannot "
                             "encode as text (not marked special in tokenizer.json)")
        return enc

    def _template(self, text: str) -> list[int]:
        """The chat template's own text: its special tokens are parsed."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode(self, text: str) -> list[int]:
        """Token ids of a record's text (no special token is ever produced from it)."""
        return self._plain(text).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self._plain(text)
        return list(enc.ids), [tuple(o) for o in enc.offsets]

    def prompt_ids(self, prompt: str, image_tokens: list[int], image_offsets=None) -> list[int]:
        """The templated user turn with its images' token slots expanded (before the prompt, or at its character
        `image_offsets`, as the chat template lays out an interleaved message), and the generation prompt. The
        template's text is encoded with its special tokens, the prompt's as plain text (the template puts a
        special token or a newline on both sides of each part, where the pre-tokenizer splits anyway)."""
        marker = "\x00PROMPT\x00"
        before, after = self.family.format_prompt(marker, [], system=None).split(marker)
        ids = self._template(before)
        for k, part in enumerate(prompt_parts(prompt, len(image_tokens), image_offsets)):
            ids += self._template(self.family.image_span(image_tokens[k - 1])) if k else []
            ids += self.encode(part) if part else []
        return ids + self._template(after)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)


class HFImages:
    """A HF family's images for the collator: token counts from the file header, the family's processor, its
    collation, and its positions (M-RoPE for Qwen2.5-VL, plain for InternVL3)."""

    def __init__(self, tokenizer: HFTokenizer):
        self.family = tokenizer.family
        self.hf_config = tokenizer.hf_config
        self.preprocessor_config = tokenizer.preprocessor_config

    def num_tokens(self, image: ImageFile) -> int:
        return self.num_tokens_of_size(*image_size(image))

    def num_tokens_of_size(self, width: int, height: int) -> int:
        return self.family.image_num_tokens(width, height, self.preprocessor_config, self.hf_config)

    def load(self, images: list[ImageFile]) -> dict:
        return self.load_pils([open_rgb(f) for f in images])

    def load_pils(self, pils: list) -> dict:
        return self.family.preprocess_images(pils, self.preprocessor_config, self.hf_config)

    def collate(self, parts: list[dict]) -> dict:
        return self.family.collate_images(parts)

    def position_ids(self, tokens: torch.Tensor, images: dict, row_images: list[list[int]]) -> torch.Tensor:
        return self.family.position_ids(self.hf_config, tokens, images, row_images)

    def noised(self, part: dict, noise_step: int, seed: int) -> dict:
        """P2-DPO's I_noise of a loaded part: VCD noise on the processor's normalised pixels (the tower's input)."""
        return {**part, "pixel_values": vcd_noise(part["pixel_values"], noise_step, seed)}
