"""megatron-core's import-time notes about a missing Transformer-Engine / Apex (about ten per rank, repeated by every
rank) and a cuda-graph deprecation that concerns no setting of ours: silenced before megatron is imported; a job
says it once instead (cli.py)."""

import warnings

MEGATRON_NOTES = (r".*(Apex is not installed|Transformer Engine and Apex are not installed)",
                  r".*full scope is deprecated")


def quiet_megatron_notes() -> None:
    for message in MEGATRON_NOTES:
        warnings.filterwarnings("ignore", message=message)
