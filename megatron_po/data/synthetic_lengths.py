"""Preference pairs of chosen lengths, for measurements (sweeps, benchmarks): what costs a step is how many tokens
it holds, not what they say.

Every pair shows one random image and has a prompt of `prompt_tokens` text tokens and two responses of log-normal
length (median `response_median`, log-space sigma `response_sigma`), capped so that a whole row (chat markers,
image slots, prompt, response, end marker) fits `max_seq_length`. The text is drawn from :data:`WORDS`, two-letter
words that the tokenizer written here learns as one piece each, so with it a text of n words is exactly n tokens.
HF families bring their own tokenizer (model.hf_path's): there the counts are close, not exact.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path

WORDS = ["".join(p) for p in itertools.product("abcdefghijklmnopqrst", repeat=2)]
"""400 words; the tokenizer of :func:`write_length_pairs` holds each as one piece."""

ROW_OVERHEAD = 4
"""Tokens of a tiny_vlm row besides image slots, prompt and response: <bos> <|user|> ... <|assistant|> and <|end|>."""


def response_lengths(rng: random.Random, n: int, median: float, sigma: float, longest: int) -> list[int]:
    """n log-normal lengths in [1, longest]."""
    return [int(min(longest, max(1, round(math.exp(rng.gauss(math.log(median), sigma)))))) for _ in range(n)]


def write_length_pairs(out_dir: Path, num_pairs: int, prompt_tokens: int, response_median: float,
                       response_sigma: float, max_seq_length: int, image_tokens: int, image_size: int = 64,
                       vocab_size: int | None = 4096, seed: int = 0,
                       row_overhead: int = ROW_OVERHEAD) -> tuple[Path, Path | None]:
    """Writes `out_dir/train.jsonl`, its image and (unless `vocab_size` is None) `out_dir/tokenizer.model`.

    Args:
        image_tokens: LLM slots the family gives the image (tiny_vlm: model.vision.num_patches); with the
            prompt and `row_overhead` it is the row's prefix that the response cap leaves room for.
        image_size: the image's side in pixels (HF families derive their image tokens from it).
        vocab_size: pieces of the generated SentencePiece tokenizer (padded with reserved pieces, so a model
            can be sized at a real vocabulary); None for HF families, which read model.hf_path's.
        row_overhead: tokens of a row besides image, prompt and response (an HF chat template's are more).

    Returns:
        (the JSONL path, the tokenizer's .model path or None).

    Raises:
        ValueError: the prefix alone leaves no room for a response.
    """
    longest = max_seq_length - row_overhead - image_tokens - prompt_tokens
    if longest < 1:
        raise ValueError(f"a prompt of {prompt_tokens} tokens, {image_tokens} image slots and {row_overhead} chat "
                         f"tokens leave no room for a response in max_seq_length={max_seq_length}")
    rng = random.Random(seed)
    chosen = response_lengths(rng, num_pairs, response_median, response_sigma, longest)
    rejected = response_lengths(rng, num_pairs, response_median, response_sigma, longest)
    return write_pairs(out_dir, list(zip(chosen, rejected)), prompt_tokens, image_size, vocab_size, seed)


def write_pairs(out_dir: Path, lengths: list[tuple[int, int]], prompt_tokens: int, image_size: int = 64,
                vocab_size: int | None = 4096, seed: int = 0) -> tuple[Path, Path | None]:
    """Writes one pair per (chosen, rejected) response length, in order (see write_length_pairs)."""
    import numpy as np
    from PIL import Image

    rng = random.Random(seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(out_dir / "image.png")

    def text(n: int, first: list[str]) -> str:
        # the first word comes from disjoint halves for chosen and rejected: never the same response
        return " ".join([rng.choice(first)] + [rng.choice(WORDS) for _ in range(n - 1)])

    train = out_dir / "train.jsonl"
    with open(train, "w") as f:
        for i, (c, r) in enumerate(lengths):
            f.write(json.dumps({"id": f"pair{i:06d}", "image": "image.png", "prompt": text(prompt_tokens, WORDS),
                                "chosen": text(c, WORDS[:200]), "rejected": text(r, WORDS[200:])}) + "\n")
    if vocab_size is None:
        return train, None
    from megatron_po.data.tokenizer import train_tokenizer

    corpus = [" ".join(rng.choice(WORDS) for _ in range(64)) for _ in range(200)]
    return train, train_tokenizer(corpus, out_dir / "tokenizer", vocab_size=vocab_size)
