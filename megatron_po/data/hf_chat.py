"""Prompt and response ids for Hugging Face families: their tokenizer.json, chat template and image processor.

`HFTokenizer` offers what the collator asks of our sentencepiece `Tokenizer` (encode, encode_with_offsets, pad
and image ids) plus the chat layout, `prompt_ids` and `response_end_ids`, which the family module defines
(`format_prompt`, `RESPONSE_SUFFIX`). It reads tokenizer.json with the `tokenizers` library (installed with the
`[hf]` extra); transformers itself is not needed to train. Special tokens written by the template
(`<|im_start|>`, `<|image_pad|>`, ...) are added tokens of tokenizer.json, so `encode` maps them to their ids,
while a response that contains such a string verbatim would too: records are plain text, as with TRL.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from megatron_po.models.families import HF_FAMILIES


class HFTokenizer:
    """A HF family's tokenizer and chat layout.

    Args:
        family: a key of HF_FAMILIES.
        hf_path: directory with tokenizer.json, config.json and preprocessor_config.json (a converted
            checkpoint's hf/ directory, or the original HF directory).
    """

    def __init__(self, family: str, hf_path: str | Path):
        from tokenizers import Tokenizer as _Tokenizer

        self.family = HF_FAMILIES[family].load()
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
        self.response_end_ids = self.encode(self.family.RESPONSE_SUFFIX)

    @property
    def files(self) -> list[Path]:
        """The files that decide the token ids, the chat layout and the image processing: every file of hf_path
        but weights (the reference cache hashes them)."""
        weights = (".safetensors", ".bin", ".pt", ".pth", ".distcp")
        return sorted(p for p in self.path.rglob("*") if p.is_file() and not p.name.endswith(weights))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self._tok.encode(text, add_special_tokens=False)
        return list(enc.ids), [tuple(o) for o in enc.offsets]

    def prompt_ids(self, prompt: str, image_tokens: list[int]) -> list[int]:
        """The templated user turn with its images' token slots expanded, and the generation prompt."""
        return self.encode(self.family.format_prompt(prompt, image_tokens, system=None))

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

    def num_tokens(self, path: Path) -> int:
        with Image.open(path) as im:
            width, height = im.size
        return self.family.image_num_tokens(width, height, self.preprocessor_config, self.hf_config)

    def load(self, path: Path) -> dict:
        with Image.open(path) as im:
            return self.family.preprocess_images([im.convert("RGB")], self.preprocessor_config, self.hf_config)

    def collate(self, parts: list[dict]) -> dict:
        return self.family.collate_images(parts)

    def position_ids(self, tokens: torch.Tensor, images: dict, row_images: list[list[int]]) -> torch.Tensor:
        return self.family.position_ids(self.hf_config, tokens, images, row_images)
