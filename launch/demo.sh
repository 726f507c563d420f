#!/usr/bin/env bash
# The demo on a fresh machine: set up .venv if needed, then SFT -> ACPO on the embedded task (2 CPU processes).
source "$(dirname "$0")/setup_env.sh"
exec .venv/bin/megatron-po demo "$@"
