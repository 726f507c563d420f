"""What an objective trains on (`ObjectiveSpec.inputs`): one entry per input kind, one file each.

An :class:`InputKind` carries everything the trainer does differently for it: the records it reads (the parser
of data/sources.py, or the data.format's), its rules and dataset (data/dataset.py), its collator, the rows per
sample, the embedded task's files, the loss inputs built from a micro-batch's row sums, the reference values a
cache stores per sample, and whether held-out pairs are scored with the objective. A new kind is one file here and
a line in :data:`INPUT_KINDS`; nothing below the trainer tests a kind's name.
"""

from __future__ import annotations

from megatron_po.kinds import p2, pairs
from megatron_po.kinds.spec import InputKind

INPUT_KINDS: dict[str, InputKind] = {k.KIND.name: k.KIND for k in (pairs, p2)}


def kind_of(objective) -> InputKind:
    """The input kind an objective's registry entry names."""
    return INPUT_KINDS[objective.inputs]
