"""A tiny random Qwen2.5-VL in Hugging Face format, built offline with transformers (the parity reference).

`make_hf_dir(path)` writes what `Qwen2_5_VLForConditionalGeneration.save_pretrained` + the processor write:
config.json, model.safetensors, tokenizer.json / tokenizer_config.json (a byte-level BPE trained here, with
Qwen2.5-VL's special tokens), preprocessor_config.json and the official chat template. Shapes are chosen to
exercise every path of the conversion: GQA (4 query heads, 2 key/value groups), a vocabulary that is not a
multiple of 128 (padding), M-RoPE sections that differ per axis, windowed and full-attention vision blocks,
and images whose merged grids do not divide into windows.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import hf_processors

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Qwen2.5-VL-*-Instruct's chat_template.json (public), verbatim
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)

# in Qwen's order (151643 ... 151656 in the real vocabulary), appended after the trained BPE vocabulary
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
BPE_VOCAB = 400
VOCAB_SIZE = 500  # not a multiple of 128: the megatron side pads to 512

CORPUS = [
    "You are a helpful assistant.", "Describe the image in one sentence.", "What colour is the square?",
    "There are two circles and a red triangle on a blue background.", "How many objects can you see?",
    "The answer is yes.", "No, there is no dog in the picture.", "Compare the two pictures.",
    "A green square sits left of a yellow circle.", "Count the stars: one, two, three, four, five.",
]

PREPROCESSOR = {
    "min_pixels": 56 * 56,
    "max_pixels": 28 * 28 * 40,  # ~40 LLM tokens per image at most: keeps the tests fast, exercises downscaling
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2_5_VLProcessor",
}


def text_config(tie: bool) -> dict:
    return dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0,
                rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, tie_word_embeddings=tie)


VISION_CONFIG = dict(depth=4, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                     fullatt_block_indexes=[1, 3], window_size=112, patch_size=14, spatial_merge_size=2,
                     temporal_patch_size=2, tokens_per_second=2)


def build_tokenizer(out: Path):
    """Byte-level BPE trained on CORPUS + Qwen2.5-VL's special tokens, saved as a Qwen2TokenizerFast."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    first = tok.get_vocab_size()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    assert ids["<|endoftext|>"] == first and max(ids.values()) < VOCAB_SIZE, ids
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    fast = Qwen2TokenizerFast(tokenizer_file=str(out / "tokenizer.json"), eos_token="<|im_end|>",
                              pad_token="<|endoftext|>", unk_token=None, bos_token=None)
    return fast, ids


def make_hf_dir(out: Path, tie: bool = False, seed: int = 0) -> Path:
    """Writes the tiny model + tokenizer + processor files to `out` and returns it."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

    out = Path(out)
    tokenizer, ids = build_tokenizer(out)
    cfg = Qwen2_5_VLConfig(
        text_config=text_config(tie), vision_config=VISION_CONFIG,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        # random init leaves norms at 1 and biases at 0: make every tensor count in the parity check
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "norm1" in name or "norm2" in name or "ln_q" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.05 * torch.randn_like(p))
        # larger patch/embedding weights so that images move the logits visibly
        model.model.visual.patch_embed.proj.weight.mul_(10.0)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    kwargs = {k: v for k, v in PREPROCESSOR.items() if k not in ("image_processor_type", "processor_class")}
    Qwen2VLImageProcessorPil(**kwargs).save_pretrained(out)  # either backend writes the same file
    (out / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}, indent=1))
    return out


def load_hf_model(path: Path):
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32,
                                                              attn_implementation="eager").eval()


def make_images(seed: int = 0, sizes=((60, 90), (120, 47), (200, 210))):
    """RGB PIL images of the given (height, width), random pixels (different aspect ratios and grids)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB") for h, w in sizes]


def image_processor_class(backend: str):
    """transformers 5's Qwen2-VL image processor of `backend` ("torchvision" or "pil")."""
    return hf_processors.image_processor_class("Qwen2VLImageProcessor", backend)


def load_processor(path: Path):
    """transformers' Qwen2_5_VLProcessor for `path`, images only (tests/hf_processors.py)."""
    from transformers import Qwen2_5_VLProcessor

    return hf_processors.image_only_processor(Qwen2_5_VLProcessor, path, chat_template=CHAT_TEMPLATE)


def to_module_layout(src: Path, out: Path) -> Path:
    """A copy of `src` with the tensor names of transformers' modules (model.visual.*, model.language_model.*),
    the in-memory state_dict of transformers >= 4.52 (save_pretrained of 4.57.1 and 5.x writes the hub names);
    transformers loads it like the hub layout."""
    import re
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, out)
    tensors = load_file(str(src / "model.safetensors"))
    renamed = {}
    for name, t in tensors.items():
        name = re.sub(r"^visual\.", "model.visual.", name)
        name = re.sub(r"^model\.(?!visual\.|language_model\.)", "model.language_model.", name)
        renamed[name] = t
    save_file(renamed, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
