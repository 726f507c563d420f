"""`megatron-po sweep --slurm`: one sbatch array per node count instead of running the points here.

Each array task is `megatron-po sweep SWEEP --output DIR --point K --launcher srun`: the sweep's own code screens
point K, writes its data, and starts one megatron_po.torchrun per node under srun with a c10d rendezvous on the
first node (as launch/slurm/train.sbatch does), then writes the point's result.json. submit.sh submits the arrays
and, after all of them, a one-task job that rebuilds the report (`--report`).
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from megatron_po.sweep.spec import Point, SweepSpec

ARRAY = """#!/bin/bash
# Sweep {name}: the points that need {nodes} node(s) of {per_node} GPUs (written by megatron-po sweep --slurm).
# Environment (exported by sbatch): REPO (default: the checkout this was written from), PYTHON (default: python),
# SRUN_ARGS (extra srun options of the training steps, e.g. pyxis --container-image=...; the sweep process itself
# runs in this script's environment, so PYTHON must have megatron_po installed there).
#SBATCH --job-name=sweep-{name}-n{nodes}
#SBATCH --nodes={nodes}
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={per_node}
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time={time}
#SBATCH --array={array}
#SBATCH --output={logs}/%x-%A_%a.out
# site-specific: add --partition / --account / --qos as needed
set -euo pipefail
cd "${{REPO:-{repo}}}"
export PYTHONUNBUFFERED=1
"${{PYTHON:-python}}" -m megatron_po.cli sweep {spec} --output {out} --point "$SLURM_ARRAY_TASK_ID" \\
    --launcher srun --nproc-per-node {per_node}
"""

SUBMIT = """#!/bin/bash
# Submits the sweep's arrays, then the report once every array task has ended (ok or not).
set -euo pipefail
mkdir -p {logs}
ids=()
{submits}
dep=$(IFS=:; echo "${{ids[*]}}")
sbatch --dependency=afterany:"$dep" --nodes=1 --ntasks=1 --job-name=sweep-{name}-report \\
    --output={logs}/%x-%j.out --wrap "cd ${{REPO:-{repo}}} && ${{PYTHON:-python}} -m megatron_po.cli sweep {spec} \\
--output {out} --report"
"""


def nodes_of(point: Point, nproc_per_node: int) -> int:
    return -(-point.nproc // nproc_per_node)


def write_slurm(spec: SweepSpec, out: Path, points: list[Point], nproc_per_node: int,
                time_limit: str = "01:00:00") -> list[Path]:
    """Writes DIR/slurm/nodes<N>.sbatch per node count of `points` and DIR/slurm/submit.sh; returns their paths.

    Raises:
        ValueError: a point that spans nodes with a process count that is no multiple of nproc_per_node.
    """
    groups: dict[int, list[int]] = {}
    for p in points:
        if p.nproc > nproc_per_node and p.nproc % nproc_per_node:
            raise ValueError(f"point {p.label}: {p.nproc} processes do not fill nodes of {nproc_per_node}")
        groups.setdefault(nodes_of(p, nproc_per_node), []).append(p.index)
    d = out / "slurm"
    d.mkdir(parents=True, exist_ok=True)
    q = {"repo": shlex.quote(os.getcwd()), "spec": shlex.quote(str(spec.path)), "out": shlex.quote(str(out)),
         "logs": shlex.quote(str(d / "logs")), "name": spec.name}
    written = []
    for nodes, indices in sorted(groups.items()):
        path = d / f"nodes{nodes}.sbatch"
        path.write_text(ARRAY.format(nodes=nodes, per_node=nproc_per_node, time=time_limit,
                                     array=",".join(map(str, indices)), **q))
        written.append(path)
    submits = "\n".join(f"ids+=($(sbatch --parsable {shlex.quote(str(p))}))" for p in written)
    submit = d / "submit.sh"
    submit.write_text(SUBMIT.format(submits=submits, **q))
    submit.chmod(0o755)
    return written + [submit]
