#!/usr/bin/env bash
# One torchrun wrapper for every stage and machine, driven by environment variables; arguments are passed
# through to the trainer as dotted overrides (or --dry-run).
#
#   NPROC       processes per node                       (default 2: the CPU demo; 8 on an H100 node)
#   NNODES      nodes                                    (default 1)
#   NODE_RANK   this node's rank, multi-node only        (default 0)
#   MASTER_ADDR rendezvous host, multi-node only         (required when NNODES > 1)
#   MASTER_PORT rendezvous port, multi-node only         (default 29500)
#   RDZV_ID     rendezvous id shared by all nodes        (default: megatron_po_$MASTER_PORT)
#   CONFIG      YAML config                              (default: none, i.e. the embedded demo defaults)
#   PYTHON      interpreter                              (default: .venv/bin/python of the repo if present, else python3)
#
# Examples:
#   CONFIG=launch/configs/demo_sft.yaml launch/run.sh output_dir=outputs/demo/sft
#   CONFIG=launch/configs/demo_acpo.yaml launch/run.sh --dry-run --world-size 2
#   NNODES=2 NODE_RANK=$R MASTER_ADDR=node0 NPROC=8 CONFIG=... launch/run.sh    # on each node (or use slurm/)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NPROC="${NPROC:-2}"
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_PORT="${MASTER_PORT:-29500}"
CONFIG="${CONFIG:-}"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi

config_args=()
if [[ -n "$CONFIG" ]]; then
    [[ -f "$CONFIG" ]] || { echo "run.sh: CONFIG=$CONFIG: no such file" >&2; exit 2; }
    config_args=(--config "$CONFIG")
fi

# --dry-run validates the config (and the layout for --world-size) in this process, without torchrun
for a in "$@"; do
    if [[ "$a" == "--dry-run" ]]; then
        exec "$PYTHON" -m megatron_po.train ${config_args[@]+"${config_args[@]}"} "$@"
    fi
done

if [[ "$NNODES" == 1 ]]; then
    # --standalone: a private c10d rendezvous on a free local port; two jobs on one machine cannot collide
    launch=(--standalone --nnodes 1)
else
    [[ -n "${MASTER_ADDR:-}" ]] || { echo "run.sh: NNODES=$NNODES needs MASTER_ADDR" >&2; exit 2; }
    # c10d rendezvous on MASTER_ADDR: global ranks are assigned at rendezvous (NODE_RANK is a hint, not a contract)
    launch=(--nnodes "$NNODES" --node_rank "$NODE_RANK" --rdzv_backend c10d
            --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "${RDZV_ID:-megatron_po_$MASTER_PORT}")
fi

# threads follow the processes on this machine (torchrun's default is 1 per process whenever NPROC > 1, which
# leaves cores idle on the CPU backend); a value you export wins
if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
    cores=$(nproc 2>/dev/null || echo 1)
    export OMP_NUM_THREADS=$(( cores / NPROC > 0 ? cores / NPROC : 1 ))
fi
set -x
exec "$PYTHON" -m torch.distributed.run "${launch[@]}" --nproc_per_node "$NPROC" \
    -m megatron_po.train ${config_args[@]+"${config_args[@]}"} "$@"
