# Sourced by launch/demo.sh and launch/test.sh: creates .venv (if absent) and installs the pinned package into it.
# EXTRAS picks setup.py extras (test.sh: dev,hf,data — the HF conversion tests need transformers, the
# Hugging Face dataset reader needs datasets); constraints.txt
# pins every transitive dependency to the versions CI is measured with.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
EXTRAS=${EXTRAS:-dev}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
STAMP=".venv/.installed-${EXTRAS//,/-}"
# torch first and alone: 2.13.0 resolves to the local CPU wheel; letting a resolver pick torch can pull CUDA builds
if ! .venv/bin/python -c "import torch, megatron.core, megatron_po" >/dev/null 2>&1 || [ ! -e "$STAMP" ] \
    || [ setup.py -nt "$STAMP" ] || [ constraints.txt -nt "$STAMP" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
  .venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[$EXTRAS]"
  touch "$STAMP"
fi
# no OMP_NUM_THREADS here: it would outlive this script in a sourcing shell and pin every later run to one
# thread (1.7x slower single-process); each launcher sets threads per process itself (demo.py, torchrun)
