# Sourced by launch/demo.sh and launch/test.sh: creates .venv (if absent) and installs the pinned package into it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# torch first and alone: 2.13.0 resolves to the local CPU wheel; letting a resolver pick torch can pull CUDA builds
if ! .venv/bin/python -c "import torch, megatron.core, megatron_po" >/dev/null 2>&1 || [ setup.py -nt .venv/.installed ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]"
  touch .venv/.installed
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
