"""A sweep's results as results.jsonl, a markdown table (results.md) and one figure (sweep.png).

Every number may be missing (a skipped or failed point, an older trainer's metrics, "-" for MFU on the CPU): the
table shows "-", the plots leave the point out.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from megatron_po.sweep.collect import write_atomic
from megatron_po.sweep.spec import Point, SweepSpec

PARTS = ("time/data_wait", "time/reference", "time/statistics", "time/policy", "time/optimizer")
"""The step's timed parts; what the step takes beyond their sum is 'other'."""


def pending_row(spec: SweepSpec, p: Point) -> dict[str, Any]:
    return {"id": p.id, "index": p.index, "label": p.label, "axes": p.axes, "config": p.config,
            "overrides": p.overrides, "nproc": p.nproc, "device": spec.device, "status": "pending", "error": "",
            "layout": {}, "plan": {}, "settings": {}, "metrics": {},
            "memory": {"measured_gib": None, "planned_gib": None, "measured_over_planned": None}}


def write_outputs(spec: SweepSpec, out: Path, points: list[Point], results: list[dict | None]) -> list[dict]:
    """Writes results.jsonl (one row per point, in sweep order), results.md and sweep.png; returns the rows."""

    rows = [r or pending_row(spec, p) for p, r in zip(points, results)]
    write_atomic(out / "results.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    write_atomic(out / "results.md", markdown(spec, rows))
    plot(spec, rows, out / "sweep.png")
    return rows


# ---- the table ------------------------------------------------------------------------------------------------------

def _num(v: Any, fmt: str, scale: float = 1.0) -> str:
    return "-" if v is None else format(v * scale, fmt)


def _cells(row: dict) -> list[str]:
    m, lay, st, mem = row["metrics"], row["layout"], row["settings"], row["memory"]
    layout = (f"{lay['tp']}/{lay['pp']}/{lay['dp']}/{'sp' if lay['sp'] else '-'}" + (f" cp{lay['cp']}"
              if lay.get("cp", 1) > 1 else "")) if lay else "-"
    planned = mem["planned_gib"] if mem["planned_gib"] is not None else row["plan"].get("peak_gib")
    return [row["label"], str(row["nproc"]), layout, str(st.get("seq_len", "-")), str(st.get("micro_batch", "-")),
            {True: "on", False: "off"}.get(st.get("packing"), "-"), st.get("reference", "-"), row["status"],
            _num(m.get("time/step"), ".0f", 1e3), _num(m.get("throughput/tokens_per_s_per_device"), ",.0f"),
            _num(m.get("flops/tflops_per_device"), ".3g"), _num(m.get("mfu"), ".1%"),
            *(_num(m.get(k), ".0f", 1e3) for k in ("time/data_wait", "time/reference", "time/policy",
                                                   "time/optimizer")),
            _num(mem["measured_gib"], ".2f"), _num(planned, ".2f"), _num(mem["measured_over_planned"], ".2f")]


HEAD = ["point", "nproc", "tp/pp/dp/sp", "seq len", "micro-batch", "packing", "reference", "status", "ms/step",
        "tokens/s/device", "TFLOP/s/device", "MFU", "data-wait ms", "reference ms", "policy ms", "optimizer ms",
        "measured GiB", "planned GiB", "measured/planned"]


def markdown(spec: SweepSpec, rows: list[dict]) -> str:
    memory = ("CUDA: peak allocated" if spec.device == "cuda" else
              "CPU: peak RSS minus the RSS before the models were built")
    lines = [f"# Sweep {spec.name}", "", spec.description.strip(), "",
             f"{spec.device}, {spec.warmup_steps} warm-up + {spec.timed_steps} timed steps per point: medians of the "
             f"timed steps (memory: the largest). Measured memory = {memory}; planned = the memory plan for the rows "
             f"the steps had (else the screening plan: every row padded to the sequence length). Budget "
             f"{spec.device_memory_gb:g} GiB per rank, {spec.headroom:.0%} headroom.", "",
             "| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    notes = [f"- {r['label']}: {r['status']}: {r['error']}" for r in rows if r["error"]]
    notes += [f"- {r['label']}: no memory plan: {r['plan']['note']}" for r in rows
              if r["plan"].get("available") is False]
    if notes:
        lines += ["", "## Notes", "", *notes]
    if spec.anchors:
        by_label = {r["label"]: r for r in rows}
        lines += ["", "## Anchors", "", "Published figures next to our matching point (ours: the same metric names, "
                  "'-' where we have not measured it yet; and our memory plan's peak per rank).", "",
                  "| point | source | metric | published | ours | our plan GiB |", "|---|---|---|---|---|---|"]
        for a in spec.anchors:
            row = by_label.get(a.point, {})
            ours, plan = row.get("metrics", {}), _num(row.get("plan", {}).get("peak_gib"), ".1f")
            for k, v in a.metrics.items() or {"-": "-"}.items():
                lines.append(f"| {a.point} | {a.source} | {k} | {v} | {_num(ours.get(k), '.4g')} | {plan} |")
    return "\n".join(lines) + "\n"


# ---- the figure -----------------------------------------------------------------------------------------------------

def _flops_key(spec: SweepSpec) -> tuple[str, str]:
    """MFU where the device's peak is known; on the CPU, TFLOP/s per device."""
    return ("flops/tflops_per_device", "TFLOP/s per device") if spec.device == "cpu" else ("mfu", "MFU")


def _line_parts(row: dict) -> dict[str, str]:
    """What tells a point's line apart: its model, row length, layout and the step's settings."""
    st, lay = row.get("settings") or {}, row.get("layout") or {}
    layout = (f"tp{lay.get('tp', 1)}{'sp' if lay.get('sp') else ''} pp{lay.get('pp', 1)} cp{lay.get('cp', 1)} "
              f"dp{lay.get('dp', 1)}" if lay else "")
    return {"model": str(st.get("model", "")), "seq": f"s{st.get('seq_len')}" if st.get("seq_len") else "",
            "layout": layout, "micro_batch": f"mb{st.get('micro_batch')}" if st.get("micro_batch") else "",
            "packing": "packed" if st.get("packing") else "padded", "reference": str(st.get("reference", "")),
            "recompute": str(st.get("recompute", ""))}


def _lines(ax, rows: list[dict], x_of, along: str, y_key: str, ylabel: str, xlabel: str) -> None:
    """Every point as a marker; a line through the points that differ only along x (`along`: the part of
    `_line_parts` that x follows), through the best point at each x (several layouts may share a world size: the
    best is the scaling curve). Lines are named by the parts that differ between them. Points without x or y are
    left out."""
    parts = [_line_parts(r) for r in rows]
    varying = [k for k in (parts[0] if parts else {}) if k != along and len({p[k] for p in parts}) > 1]
    groups: dict[str, list[tuple[float, float, str]]] = {}
    for r, p in zip(rows, parts):
        x, y = x_of(r), r["metrics"].get(y_key)
        if x is not None and y is not None:
            groups.setdefault(" ".join(p[k] for k in varying if p[k]) or "all", []).append((x, y, r["label"]))
    for key, pts in sorted(groups.items()):
        best: dict[float, float] = {}
        for x, y, _ in pts:
            best[x] = max(y, best.get(x, y))
        xs = sorted(best)
        line, = ax.plot(xs, [best[x] for x in xs], marker="o", label=key)
        ax.scatter([x for x, _, _ in pts], [y for _, y, _ in pts], s=10, color=line.get_color())
        for x, y, label in pts:
            ax.annotate(label, (x, y), fontsize=5, xytext=(3, 2), textcoords="offset points")
    if groups:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)


def _memory(ax, rows: list[dict]) -> None:
    pts = [(r["memory"]["planned_gib"], r["memory"]["measured_gib"], r["label"]) for r in rows
           if r["memory"]["planned_gib"] and r["memory"]["measured_gib"] is not None]
    if pts:
        top = max(max(p, m) for p, m, _ in pts) * 1.15
        xs = [0, top]
        ax.plot(xs, xs, "k-", lw=0.8, label="measured = planned")
        ax.fill_between(xs, [0, 0.8 * top], [0, 1.2 * top], color="grey", alpha=0.2, label="±20%")
        for p, m, label in pts:
            ax.scatter(p, m, s=14)
            ax.annotate(label, (p, m), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xlim(0, top)
        ax.set_ylim(0, top)
        ax.legend(fontsize=7, loc="upper left")
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("planned GiB per rank")
    ax.set_ylabel("measured GiB per rank")
    ax.set_title("(c) memory: measured vs planned", fontsize=9)


def _breakdown(ax, rows: list[dict]) -> None:
    timed = [r for r in rows if "time/step" in r["metrics"]]
    if not timed:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    bottom = [0.0] * len(timed)
    for key in (*PARTS, "other"):
        if key == "other":
            vals = [max(0.0, r["metrics"]["time/step"] - sum(r["metrics"].get(k, 0.0) for k in PARTS)) for r in timed]
        else:
            vals = [r["metrics"].get(key, 0.0) for r in timed]
        vals = [1e3 * v for v in vals]
        ax.bar(range(len(timed)), vals, bottom=bottom, label=key.removeprefix("time/"))
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xticks(range(len(timed)), [r["label"] for r in timed], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("ms per step")
    ax.set_title("(d) step time by part (other = step - the parts)", fontsize=9)
    if timed:
        ax.legend(fontsize=7, ncol=3)


def plot(spec: SweepSpec, rows: list[dict], path: Path) -> None:
    """(a) tokens/s per device and MFU (CPU: TFLOP/s per device) vs world size, a line through the points that
    differ only in layout (same model: strong scaling; a model that grows with the world is a line of its own per
    size, its best points side by side: weak scaling); (b) the latter vs sequence length, a line through the points
    that differ only in it; (c) measured vs planned memory with y = x and a ±20% band; (d) each point's step time
    by part."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, name = _flops_key(spec)
    fig = plt.figure(figsize=(12, 13))
    grid = fig.add_gridspec(3, 2)
    world, seq = (lambda r: r["nproc"]), (lambda r: (r.get("settings") or {}).get("seq_len"))
    ax = fig.add_subplot(grid[0, 0])
    _lines(ax, rows, world, "layout", "throughput/tokens_per_s_per_device", "tokens/s per device", "world size")
    ax.set_title("(a) throughput per device vs world size", fontsize=9)
    ax = fig.add_subplot(grid[0, 1])
    _lines(ax, rows, world, "layout", key, name, "world size")
    ax.set_title(f"(a) {name} vs world size", fontsize=9)
    ax = fig.add_subplot(grid[1, 0])
    _lines(ax, rows, seq, "seq", key, name, "sequence length (model.max_seq_length)")
    ax.set_title(f"(b) {name} vs sequence length", fontsize=9)
    _memory(fig.add_subplot(grid[1, 1]), rows)
    _breakdown(fig.add_subplot(grid[2, :]), rows)
    fig.suptitle(f"sweep {spec.name} ({spec.device})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
