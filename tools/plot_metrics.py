#!/usr/bin/env python3
"""Plot rewards of runs: `python tools/plot_metrics.py --run LABEL=PATH [--run ...] --out FILE.png`.

PATH is a metrics.jsonl or the output_dir holding one. A thin command line over `megatron_po/plots.py`, loaded by
file path so that it needs neither an installed megatron_po nor torch: matplotlib is enough.

Example (the demo's two preference stages side by side):
    python tools/plot_metrics.py --run acpo=outputs/demo/acpo --run dpo=outputs/demo/dpo --out rewards.png
"""

import importlib.util
import sys
from pathlib import Path

_PLOTS = Path(__file__).resolve().parents[1] / "megatron_po" / "plots.py"


def _load_plots():
    # by path, not `import megatron_po.plots`: a checkout without the package installed (or without torch) works
    spec = importlib.util.spec_from_file_location("megatron_po_plots", _PLOTS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_plots = _load_plots()
plot_rewards = _plots.plot_rewards
read_metrics = _plots.read_metrics

if __name__ == "__main__":
    sys.exit(_plots.main())
