#!/usr/bin/env bash
# GPU acceptance: one command, under 8 minutes on one H100 / H200 without TE, no network (estimates per step in
# benchmarks/gpu_acceptance.py: a ~90, b ~75, b2 ~50, c 0 (TE: ~50), d ~150, e 0, f ~25 s; a 450 s budget skips
# what would start after it).
#
#   bash benchmarks/gpu_acceptance.sh                       # on a CUDA machine or in the image (docker/)
#   GPU_ACCEPTANCE_CPU=1 bash benchmarks/gpu_acceptance.sh  # the same logic on the CPU (fp32, gloo), for this script
#
# Runs, in order, each printing PASS / FAIL / SKIP with its criterion: a) tests/test_gpu.py; b) a bf16 tiny_vlm
# train-exit-resume with packing, the distributed optimizer and selective recompute (and b2, a SIGTERM stop); c) TE vs
# local spec log-probs (SKIP without TE); d) bench_gpu_step.py at 3 configurations; e) the memory plan against the
# measured peak; f) megatron-po eval with the POPE probe. Writes summary.md, summary.json, acceptance.log and
# bench.json to $OUT if set, else outputs/gpu_acceptance. Exit code 1 if a step failed.
#
# Environment: PYTHON (default python3: the machine's CUDA torch; in CPU mode the repo's .venv if present),
# GPU_ACCEPTANCE_BUDGET_S (default 450), GPU_ACCEPTANCE_KEEP=1 keeps the work directory (checkpoints, data).
# The machine's torch is used as it is: never install torch here, nor `pip install -e .` (setup.py pins the CPU
# wheel). megatron-core, when `import megatron.core` fails, comes from .whl/megatron_core-*.whl (fetch it where a
# registry is reachable: python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12
# --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 -d .whl megatron-core==0.16.1),
# installed without its dependencies into a temporary directory on PYTHONPATH.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
export PYTHONUNBUFFERED=1
OUT_DIR="${OUT:-$REPO/outputs/gpu_acceptance}"
CPU_MODE="${GPU_ACCEPTANCE_CPU:-0}"
if [[ -z "${PYTHON:-}" ]]; then
    PYTHON=python3
    if [[ "$CPU_MODE" == 1 && -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; fi
fi

if [[ "$CPU_MODE" != 1 ]] \
        && ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "SKIP gpu_acceptance: no CUDA device (or no torch) for $PYTHON (GPU_ACCEPTANCE_CPU=1: the logic on the CPU)"
    exit 0
fi

site=""
trap '[[ -z "$site" ]] || rm -rf "$site"' EXIT
if ! "$PYTHON" -c 'import megatron.core' 2>/dev/null; then
    wheels=("$REPO"/.whl/megatron_core-*.whl)
    if [[ ! -f "${wheels[0]}" ]]; then
        echo "FAIL gpu_acceptance: megatron.core does not import and there is no .whl/megatron_core-*.whl" >&2
        exit 1
    fi
    site="$(mktemp -d)"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$site" "${wheels[@]}"
    export PYTHONPATH="$site:$REPO${PYTHONPATH:+:$PYTHONPATH}"
    echo "gpu_acceptance: megatron-core from ${wheels[*]} (PYTHONPATH $PYTHONPATH)"
else
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi

mkdir -p "$OUT_DIR"
rc=0
"$PYTHON" "$REPO/benchmarks/gpu_acceptance.py" --out "$OUT_DIR" || rc=$?
echo "gpu_acceptance: summary in $OUT_DIR/summary.md (exit $rc)"
exit "$rc"
