"""A finished launch's metrics.jsonl -> one number per metric: the median over the timed steps."""

from __future__ import annotations

import json
import math
import os
import re
import statistics
from pathlib import Path
from typing import Any

LEGACY = {"step_time_s": "time/step", "tokens_per_s": "throughput/tokens_per_s"}
"""Names older trainers write, read as today's when today's are absent."""

RANK_PREFIX = re.compile(r"^\[(default)?rank\d+\]:\s*")


def read_steps(path: Path) -> list[dict]:
    """metrics.jsonl's rows (a torn last line, from a killed run, is dropped)."""
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else ():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def summarize_steps(rows: list[dict], warmup: int, nproc: int) -> dict[str, float]:
    """Medians of every numeric metric over the steps after `warmup`; memory/* the largest value instead (a
    peak is a peak, not a typical step).

    A metric only some steps carry (time/eval) is summarised over those. Missing per-device throughput is the
    total's share of `nproc`.
    """
    timed = [r for r in rows if isinstance(r.get("step"), (int, float)) and r["step"] > warmup]
    values: dict[str, list[float]] = {}
    for r in timed:
        for k, v in r.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                values.setdefault(k, []).append(float(v))
    out = {k: (max(v) if k.startswith("memory/") else statistics.median(v)) for k, v in values.items()}
    for old, new in LEGACY.items():
        if old in out and new not in out:
            out[new] = out[old]
    if "throughput/tokens_per_s" in out and "throughput/tokens_per_s_per_device" not in out:
        out["throughput/tokens_per_s_per_device"] = out["throughput/tokens_per_s"] / nproc
    out["timed_steps"] = float(len(timed))
    return out


def memory_comparison(metrics: dict[str, float], device: str, plan_peak_gib: float | None) -> dict[str, Any]:
    """Measured memory the plan counts (CUDA: peak allocated; CPU: peak RSS above the RSS before the models,
    which the plan does not count) against the plan for the rows the steps had (else the screening's plan)."""
    if device == "cuda":
        measured = metrics.get("memory/peak_allocated_gib")
    elif "memory/peak_rss_gib" in metrics and "memory/baseline_rss_gib" in metrics:
        measured = metrics["memory/peak_rss_gib"] - metrics["memory/baseline_rss_gib"]
    else:
        measured = None
    planned = metrics.get("memory/planned_gib", plan_peak_gib)
    ratio = measured / planned if measured is not None and planned else None
    return {"measured_gib": measured, "planned_gib": planned, "measured_over_planned": ratio}


def error_line(stderr: str) -> str:
    """The line that says why a launch failed: the trainer's own one-line refusal if there is one, else the last
    exception of a traceback, else the last line with words in it."""
    # torchrun may prefix a worker's lines with its rank
    lines = [RANK_PREFIX.sub("", ln).strip() for ln in stderr.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith(("config error", "data error", "training error")):
            return ln
    for ln in reversed(lines):
        head = ln.split(":", 1)[0]
        # torchrun's own summary ends in ChildFailedError: the worker's exception above it says more
        if (head.endswith(("Error", "Exception", "Interrupt")) and " " not in head
                and not head.endswith("ChildFailedError")):
            return ln
    return next((ln for ln in reversed(lines) if any(c.isalnum() for c in ln)), "")


def write_atomic(path: Path, text: str) -> None:
    """`text` into `path` whole or not at all (a killed sweep leaves no half-written result)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
