#!/usr/bin/env bash
# The test suite on a fresh machine: set up .venv if needed, then pytest (CPU, gloo; GPU-only tests skip).
EXTRAS=${EXTRAS:-dev,hf,data} source "$(dirname "$0")/setup_env.sh"
exec .venv/bin/python -m pytest -q -p no:cacheprovider tests "$@"
