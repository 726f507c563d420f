"""The entry every input kind defines (see megatron_po/kinds/__init__.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class InputKind:
    name: str
    rows_per_sample: int
    """Rows one sample contributes at most (2 for a pair, 6 for a P2-DPO sample)."""
    parser: str
    """data/sources.py parser of its records; "" when data.format decides (preference pairs)."""
    train_file: str
    """The embedded task's training file under output_dir/data."""
    dataset: type
    """data/dataset.PreferenceDataset or a subclass (its ``rules_class`` checks records, its collator lays them out)."""
    build_collator: Callable[..., Any]
    """(tokenizer, CollateConfig, image handler, objective config) -> the collator."""
    generate_synthetic: Callable[..., Any]
    """(data_dir, DataConfig, image_size) -> writes the embedded task's files."""
    texts: Callable[..., Any]
    """records -> their texts (the corpus a tiny_vlm tokenizer is trained on)."""
    settings: Callable[[Any], dict]
    """objective config -> what changes a sample's rows besides the tokenizer (index and cache keys)."""
    loss_inputs: Callable[..., Any]
    """(micro-batch, policy SeqLogps, reference SeqLogps or None) -> the objective's loss inputs."""
    cache_values: Callable[..., dict]
    """(micro-batch, reference SeqLogps) -> the reference sums a cache stores per sample ([B, ...] each)."""
    cache_lookup: Callable[..., Any]
    """(split table, rows of the micro-batch's samples, micro-batch, device) -> the reference SeqLogps."""
    evaluates: bool
    """Held-out pairs are scored with the objective (so their reference values are cached too)."""
