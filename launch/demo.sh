#!/usr/bin/env bash
# The demo on a fresh machine: set up .venv if needed, then SFT (the model learns to see) -> ACPO, DPO, DPO-Shift,
# IPO from it on the embedded task (2 CPU processes); --objectives picks others (megatron_po/demo.py).
source "$(dirname "$0")/setup_env.sh"
exec .venv/bin/megatron-po demo "$@"
