"""A small sentencepiece tokenizer trained on the dataset, and the wrapper the collator uses.

The chat markers (``<image>``, ``<|user|>``, ``<|assistant|>``, ``<|end|>``) are sentencepiece *control*
symbols: they own fixed ids but ``encode`` never produces them from text, so a prompt that happens to
contain the string "<image>" cannot forge an image slot. The collator inserts them by id.

Fixed ids: pad=0, unk=1, bos=2, eos=3, ``<image>``=4, ``<|user|>``=5, ``<|assistant|>``=6, ``<|end|>``=7.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

from megatron_po.data.records import prompt_parts

logger = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
USER_TOKEN = "<|user|>"
ASSISTANT_TOKEN = "<|assistant|>"
END_TOKEN = "<|end|>"
SPECIAL_TOKENS: tuple[str, ...] = (IMAGE_TOKEN, USER_TOKEN, ASSISTANT_TOKEN, END_TOKEN)
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


def _train_model_proto(texts: list[str], vocab_size: int, num_reserved: int) -> bytes:
    writer = io.BytesIO()
    reserved = [f"<|reserved_{i}|>" for i in range(num_reserved)]
    # model_writer instead of model_prefix: the prefix would be serialised into the model, and the same
    # corpus written to two directories would give two different files
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=writer,
        model_type="bpe",
        vocab_size=vocab_size,
        control_symbols=list(SPECIAL_TOKENS) + reserved,
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        character_coverage=1.0,
        byte_fallback=False,  # 256 byte pieces would take half of a 512-piece vocabulary
        # identity + kept whitespace: decode(encode(text)) == text for every character seen in training
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        # reproducibility: no sampling, no shuffling, no thread-order effects
        input_sentence_size=0,
        shuffle_input_sentence=False,
        num_threads=1,
        # a small corpus runs out of merges before vocab_size; the caller pads with reserved ids instead
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return writer.getvalue()


def train_tokenizer(texts: Iterable[str], out_prefix: Path, vocab_size: int = 512, seed: int = 0) -> Path:
    """Trains a BPE sentencepiece model with the chat control symbols.

    A corpus too small to fill ``vocab_size`` with merges gets unused ``<|reserved_k|>`` control symbols,
    so the vocabulary is exactly ``vocab_size`` whatever the data: model configs can fix it in advance.

    Args:
        texts: training sentences (e.g. :func:`megatron_po.data.records.iter_texts`); consumed once.
        out_prefix: writes ``{out_prefix}.model`` and a human-readable ``{out_prefix}.vocab``.
        vocab_size: total pieces, specials included.
        seed: seeds sentencepiece's global RNG. BPE training with the settings above is deterministic anyway:
            the same texts give a byte-identical model file.

    Returns:
        The path of the ``.model`` file.
    """
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("train_tokenizer needs at least one non-empty text")
    if vocab_size <= 8:
        raise ValueError(f"vocab_size must exceed the 8 fixed ids, got {vocab_size}")
    spm.set_random_generator_seed(seed)
    num_reserved = 0
    for _ in range(3):
        proto = _train_model_proto(texts, vocab_size, num_reserved)
        size = spm.SentencePieceProcessor(model_proto=proto).get_piece_size()
        if size >= vocab_size:
            break
        num_reserved += vocab_size - size
    if size != vocab_size:
        logger.warning("tokenizer has %d pieces, not the requested %d", size, vocab_size)
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    model_file = out_prefix.with_name(out_prefix.name + ".model")
    model_file.write_bytes(proto)
    sp = spm.SentencePieceProcessor(model_proto=proto)
    vocab_lines = [f"{sp.id_to_piece(i)}\t{sp.get_score(i)}\n" for i in range(sp.get_piece_size())]
    out_prefix.with_name(out_prefix.name + ".vocab").write_text("".join(vocab_lines), encoding="utf-8")
    return model_file


class Tokenizer:
    """A sentencepiece model with the chat control symbols of :func:`train_tokenizer`.

    Args:
        model_file: a ``.model`` file that defines pad/bos/eos and the four chat control symbols.
    """

    def __init__(self, model_file: Path):
        self.model_file = Path(model_file)
        self._sp = spm.SentencePieceProcessor(model_file=str(self.model_file))
        self._special = {}
        for token in SPECIAL_TOKENS:
            i = self._sp.piece_to_id(token)
            if i == self._sp.unk_id() or not self._sp.is_control(i):
                raise ValueError(f"{self.model_file}: no control symbol {token!r}; train it with train_tokenizer")
            self._special[token] = i
        for name, i in (("pad", self._sp.pad_id()), ("bos", self._sp.bos_id()), ("eos", self._sp.eos_id())):
            if i < 0:
                raise ValueError(f"{self.model_file}: the model defines no {name} id")

    @property
    def files(self) -> list[Path]:
        """The files that decide the token ids (the reference cache hashes them)."""
        return [self.model_file]

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no bos/eos, and never a control id."""
        return self._sp.encode(text, out_type=int)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of ``text`` (the same as :meth:`encode`) and each token's character span in ``text``.

        Offsets are *character* offsets (sentencepiece's ``offset_mapping`` with ``return_bytes=False``; its
        proto pieces' ``begin``/``end`` count UTF-8 bytes instead). A piece that carries the whitespace before
        a word ("▁There") starts on that whitespace; the dummy prefix before leading whitespace is zero-width.

        Returns:
            ``(ids, offsets)`` with ``offsets[t] = (start, end)``, ``0 <= start <= end <= len(text)``.
        """
        out = self._sp.encode(text, out_type="offset_mapping", return_bytes=False)
        return [int(i) for i in out["ids"]], [(int(s), int(e)) for s, e in out["offsets"]]

    def prompt_ids(self, prompt: str, image_tokens: Sequence[int], image_offsets=None) -> list[int]:
        """``[bos] <|user|> <image> x sum(image_tokens) prompt_ids <|assistant|>``: the images' slots in order,
        before the prompt or at its character ``image_offsets``."""
        ids = [self.bos_id, self.user_id]
        for k, part in enumerate(prompt_parts(prompt, len(image_tokens), image_offsets)):
            ids += [self.image_id] * image_tokens[k - 1] if k else []
            ids += self.encode(part) if part else []
        return ids + [self.assistant_id]

    @property
    def response_end_ids(self) -> list[int]:
        """What closes a supervised response: ``<|end|>``."""
        return [self.end_id]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; control ids (pad, bos, eos, chat markers) decode to nothing."""
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        """The piece of one id, control symbols included (for printing collated rows)."""
        return self._sp.id_to_piece(int(i))

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def image_id(self) -> int:
        return self._special[IMAGE_TOKEN]

    @property
    def user_id(self) -> int:
        return self._special[USER_TOKEN]

    @property
    def assistant_id(self) -> int:
        return self._special[ASSISTANT_TOKEN]

    @property
    def end_id(self) -> int:
        return self._special[END_TOKEN]

    @property
    def control_ids(self) -> list[int]:
        """Ids that are no text (pad, bos, eos, unk, chat markers, image slots, reserved): never generated except
        the response's end."""
        sp = self._sp
        return [i for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i)]
