"""Tiny random InternVL3 checkpoints written by transformers itself (offline, seeded), for the parity tests.

`make_checkpoint(path, variant)` writes what `save_pretrained` of a real `-hf` InternVL3 checkpoint has:
config.json + model.safetensors (InternVLForConditionalGeneration), a byte-level BPE tokenizer with InternVL's
special tokens (tokenizer.json / tokenizer_config.json), the image processor's preprocessor_config.json and the
processor's processor_config.json / chat template. Variants:
    "vit300m": InternViT-300M style tower (LayerNorm, qkv bias), tied embeddings;
    "vit6b": InternViT-6B style tower (RMSNorm, qk-norm, no qkv bias, final LayerNorm, mask token), untied
        embeddings, dynamic NTK rope scaling (as InternVL3's llm_config has).
Tying is set on the InternVLConfig and its text_config alike, as the real -hf configs have it (transformers 5 ties
by the former, default true; 4.x by the latter).
Every weight is drawn at random (HF's init leaves norms at 1, positions and class token at 0, layer scale
constant: a parity test on such weights would not see half the mistakes it is meant to catch).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import hf_processors

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# the chat template of OpenGVLab/InternVL3-*-hf (chat_template.json; transformers' convert_internvl_weights_to_hf.py)
OFFICIAL_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "{{ '<IMG_CONTEXT>\n' }}{% elif content['type'] == 'video' %}{{ '<video>\n' }}{% elif content['type'] == 'text' %}"
    "{{ content['text'] }}{% endif %}{% endfor %}{% endif %}{{'<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<quad>",
                  "</quad>", "<ref>", "</ref>", "<box>", "</box>", "<video>"]
VARIANTS = ("vit300m", "vit6b")
TEXT_VOCAB = 333  # > tokenizer size, not a multiple of 128: the padded rows are exercised
TILE = 56  # tile side in pixels: 4x4 patches of 14 -> 2x2 tokens per tile after the pixel shuffle
TOKENS_PER_TILE = 4
PREPROCESSOR = {
    "size": {"height": TILE, "width": TILE},
    "crop_to_patches": False,  # as the real checkpoints: InternVLProcessor turns it on anyway
    "min_patches": 1,
    "max_patches": 6,
    "resample": 3,
    "do_resize": True,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
    "do_convert_rgb": True,
}

CORPUS = [
    "Describe the image in one sentence.",
    "What colour is the square? The square is red and the circle is blue.",
    "How many objects are there? There are three objects: a triangle, a square and a circle.",
    "A small green triangle sits to the left of a large yellow circle on a grey background.",
    "Is there a dog in the picture? No, there is no dog.",
    "Compare the two images and say which one is brighter.",
] * 4


def vision_config(variant: str) -> dict:
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  image_size=[TILE, TILE], patch_size=[14, 14], layer_norm_eps=1e-6)
    if variant == "vit300m":
        return dict(common, norm_type="layer_norm", attention_bias=True, use_qk_norm=False, use_mean_pooling=True)
    if variant == "vit6b":
        return dict(common, norm_type="rms_norm", attention_bias=False, use_qk_norm=True, use_mean_pooling=False,
                    use_mask_token=True)
    raise ValueError(variant)


def text_config(variant: str) -> dict:
    return dict(model_type="qwen2", hidden_size=48, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                intermediate_size=96, vocab_size=TEXT_VOCAB, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
                max_position_embeddings=512, tie_word_embeddings=variant == "vit300m",
                # InternVL3's llm_config carries dynamic NTK scaling: plain RoPE up to max_position_embeddings
                rope_scaling={"type": "dynamic", "factor": 2.0} if variant == "vit6b" else None)


def build_tokenizer():
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens={"start_image_token": "<img>", "end_image_token": "</img>",
                              "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"},
    )


def _randomize(model, seed: int) -> None:
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif "lambda_" in name:
                p.copy_(0.5 + 0.2 * noise)
            elif name.endswith("bias") or "norm" in name:
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.08 * noise)


def make_checkpoint(path: str | Path, variant: str = "vit300m", seed: int = 0) -> Path:
    """Writes the tiny checkpoint directory; returns it."""
    import torch
    from transformers import GotOcr2ImageProcessorPil, InternVLConfig, InternVLForConditionalGeneration

    path = Path(path)
    tokenizer = build_tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    cfg = InternVLConfig(vision_config=vision_config(variant), text_config=text_config(variant),
                         image_token_id=image_token_id, image_seq_length=TOKENS_PER_TILE, downsample_ratio=0.5,
                         tie_word_embeddings=text_config(variant)["tie_word_embeddings"])
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(cfg).eval()
    _randomize(model, seed)
    model.save_pretrained(path)
    GotOcr2ImageProcessorPil(**PREPROCESSOR).save_pretrained(path)  # either backend writes the same file
    tokenizer.save_pretrained(path)
    # what InternVLProcessor.save_pretrained adds (it cannot be built here: its video processor needs torchvision)
    (path / "processor_config.json").write_text(json.dumps(
        {"image_seq_length": TOKENS_PER_TILE, "processor_class": "InternVLProcessor"}, indent=2))
    (path / "chat_template.jinja").write_text(OFFICIAL_CHAT_TEMPLATE)
    return path


def image_processor_class(backend: str):
    """transformers 5's GotOcr2 image processor of `backend` ("torchvision" or "pil")."""
    return hf_processors.image_processor_class("GotOcr2ImageProcessor", backend)


def processor(path: str | Path):
    """transformers' InternVLProcessor for `path`, images only (tests/hf_processors.py)."""
    from transformers import InternVLProcessor

    path = Path(path)
    return hf_processors.image_only_processor(
        InternVLProcessor, path, image_seq_length=read_json(path, "processor_config.json")["image_seq_length"],
        chat_template=(path / "chat_template.jinja").read_text())


def load_hf(path: str | Path):
    """(model in fp32 eval mode, processor) from a fixture directory."""
    from transformers import InternVLForConditionalGeneration

    model = InternVLForConditionalGeneration.from_pretrained(path, dtype="float32").eval()
    return model, processor(path)


def read_json(path: Path, name: str) -> dict:
    return json.loads((Path(path) / name).read_text())
