"""Reward curves of one or more runs from their metrics.jsonl, as a PNG.

Depends on matplotlib and json only (no torch, no other megatron_po module), so it runs on a laptop next to a
copied metrics file; `tools/plot_metrics.py` is its command line. The demo calls `plot_rewards` directly.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping, Optional, Sequence

REWARD_PANELS = (
    ("rewards/chosen", "chosen reward  r_w"),
    ("rewards/rejected", "rejected reward  r_l"),
    ("rewards/margins", "margin  r_w - r_l"),
)
ALPHA_MEAN, ALPHA_MIN, ALPHA_MAX = "acpo/alpha_hat_mean", "acpo/alpha_hat_min", "acpo/alpha_hat_max"
# drawn when any run logged them: displacement share, held-out probe and log-likelihood drift
EXTRA_PANELS = (
    ("rewards/frac_chosen_negative", "share of pairs with r_w < 0"),
    ("acpo/frac_at_hi", "ACPO  share of alpha_hat at hi"),
    ("probe/hallucination_rate", "probe: 'yes' to absent objects"),
    ("probe/accuracy", "probe: yes/no accuracy"),
    ("eval/delta_logp", "held-out chosen log p/token - step 0"),
)
DYNAMICS_PANELS = (
    ("delta:eval/rewards/chosen", "held-out  Δr(y_w) = r_w(t) - r_w(0)"),
    ("eval/rewards/margins", "held-out margin  r_w - r_l"),
    ("eval/delta_logp", "held-out  Δ log p(y_w) / token"),
    (ALPHA_MEAN, "ACPO  alpha_hat (mean, min-max)"),
    ("probe/f1", "POPE F1 (mean of 3 splits)"),
)
"""The ACPO paper's reward-dynamics view (its Fig. 3a/3b) plus likelihood drift and the hallucination probe."""
DELTA = "delta:"
"""A key prefix: the series minus its first value (Δ since the first evaluation)."""
SPARSE_KEYS = {"probe/hallucination_rate", "probe/accuracy", "eval/delta_logp", "probe/f1", "eval/rewards/margins",
               "delta:eval/rewards/chosen"}
FRACTION_KEYS = {"rewards/frac_chosen_negative", "acpo/frac_at_hi", "probe/hallucination_rate", "probe/accuracy"}


def read_metrics(path: Path) -> list[dict]:
    """One dict per optimizer step, sorted by step; a step logged twice (a resumed run) keeps its last record.

    Non-finite values are written as strings ("nan", "inf") by the metrics writer; they come back as floats.
    """
    by_step: dict[int, dict] = {}
    lines = Path(path).read_text().splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            # the last line of a file that is still being written may be cut off; anything else is corruption
            if n == len(lines):
                break
            raise ValueError(f"{path}:{n}: not JSON ({e})") from e
        by_step[int(rec["step"])] = rec
    return [by_step[s] for s in sorted(by_step)]


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    if key.startswith(DELTA):
        steps, values = _series(rows, key[len(DELTA):])
        return steps, [v - values[0] for v in values]
    steps, values = [], []
    for r in rows:
        if key not in r:
            continue
        try:
            v = float(r[key])
        except (TypeError, ValueError):
            continue
        steps.append(int(r["step"]))
        values.append(v)
    return steps, values


def _rolling_mean(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last `window` finite values (a per-step batch of 8 pairs is noisy)."""
    out, buf = [], []
    for v in values:
        if math.isfinite(v):
            buf.append(v)
            buf = buf[-window:]
        out.append(sum(buf) / len(buf) if buf else math.nan)
    return out


def plot_rewards(
    runs: Mapping[str, Path],
    out_png: Path,
    title: str = "",
    smooth: int = 5,
    panels: Optional[Sequence[tuple[str, str]]] = None,
) -> Path:
    """Draws chosen reward, rejected reward and margin over optimizer steps, one colour per run.

    A fourth panel shows ACPO's α̂ (`acpo/alpha_hat_mean`, with its min-max band over the batch) when any run
    logged it. Runs that logged no reward (e.g. an SFT stage) are left out of the reward panels.
    `panels` replaces that choice: (metric key, title) pairs drawn when any run logged the key (a `delta:` key
    draws the series minus its first value), e.g. :data:`DYNAMICS_PANELS`.

    Args:
        runs: label -> path of a metrics.jsonl (one JSON object per optimizer step).
        out_png: where to write the figure; parent directories are created.
        title: figure title.
        smooth: trailing-mean window drawn bold over the faint raw curve; 1 or less draws the raw curve only.

    Returns:
        `out_png`.

    Raises:
        ValueError: no runs given, or none of them has any reward metric.
    """
    import matplotlib

    # Agg before pyplot is imported: no display on clusters and CI, and never pop up a window
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not runs:
        raise ValueError("plot_rewards: no runs given")
    data = {label: read_metrics(Path(p)) for label, p in runs.items()}
    def logged(key: str) -> bool:
        key = key.removeprefix(DELTA)
        return any(key in r for rows in data.values() for r in rows)

    keys = [k for k, _ in (panels or REWARD_PANELS)]
    if not any(logged(k) for k in keys):
        raise ValueError(f"plot_rewards: none of the runs {list(runs)} logged any of {keys}")
    if panels is None:
        panels = list(REWARD_PANELS) + ([(ALPHA_MEAN, "ACPO  alpha_hat (mean, min-max)")] if logged(ALPHA_MEAN) else [])
        panels += [(k, name) for k, name in EXTRA_PANELS if logged(k)]
    else:
        panels = [(k, name) for k, name in panels if logged(k)]
    ncols = 3 if len(panels) in (5, 6) else min(len(panels), 4)
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.4 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    axes = list(axes.flat)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    for i, (label, rows) in enumerate(data.items()):
        colour = colours[i % len(colours)]
        for ax, (key, _) in zip(axes, panels):
            steps, values = _series(rows, key)
            if not steps:
                continue
            if key == ALPHA_MEAN:
                lo_steps, lo = _series(rows, ALPHA_MIN)
                hi_steps, hi = _series(rows, ALPHA_MAX)
                if lo_steps == steps and hi_steps == steps:
                    ax.fill_between(steps, lo, hi, color=colour, alpha=0.15, linewidth=0)
                ax.plot(steps, values, color=colour, label=label)  # α̂ is a clipped mean: no smoothing
                continue
            if key in SPARSE_KEYS:  # evaluated every few steps: markers, no smoothing
                ax.plot(steps, values, color=colour, marker="o", markersize=3, label=label)
                continue
            if smooth > 1 and len(values) > smooth:
                ax.plot(steps, values, color=colour, alpha=0.25, linewidth=0.8)
                ax.plot(steps, _rolling_mean(values, smooth), color=colour, label=label)
            else:
                ax.plot(steps, values, color=colour, label=label)

    for ax, (key, name) in zip(axes, panels):
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if key == ALPHA_MEAN or key in FRACTION_KEYS:
            lo, hi = ax.get_ylim()
            ax.set_ylim(min(lo, -0.02), max(hi, 1.02))  # the whole [0, 1] window of Eq. 12, not a zoomed-in band
        elif key != "probe/f1":  # an F1 near 0.9: the zero line would squash its changes
            ax.axhline(0.0, color="black", linewidth=0.6)
    axes[0].legend(fontsize=8, loc="best")
    if smooth > 1:
        fig.text(0.005, 0.005, f"bold: trailing mean over {smooth} steps; faint: per step", fontsize=7, alpha=0.7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()

    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def parse_run_arg(text: str) -> tuple[str, Path]:
    """'LABEL=PATH' -> (label, path); a bare PATH is labelled by its run directory's name."""
    label, sep, path = text.partition("=")
    if not sep:
        p = Path(text)
        return (p.parent.name if p.name == "metrics.jsonl" else p.name), p
    if not label or not path:
        raise ValueError(f"--run {text!r}: expected LABEL=PATH")
    return label, Path(path)


def resolve_metrics_path(path: Path) -> Path:
    """Accepts a metrics.jsonl or a run's output_dir holding one."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path}")
    return path


def main(argv: Optional[list[str]] = None) -> int:
    import argparse

    p = argparse.ArgumentParser(
        prog="plot_metrics.py",
        description="Plot chosen/rejected rewards, margins (and ACPO's alpha_hat) of runs' metrics.jsonl.",
    )
    p.add_argument("--run", action="append", required=True, metavar="LABEL=PATH",
                   help="a run: label and its metrics.jsonl (or output_dir); repeat for several runs")
    p.add_argument("--out", required=True, type=Path, help="output PNG")
    p.add_argument("--title", default="")
    p.add_argument("--smooth", type=int, default=5, help="trailing-mean window (1: raw curves only)")
    p.add_argument("--dynamics", action="store_true",
                   help="the reward-dynamics panels instead (held-out Δr(y_w), margin, Δlog p, α̂, POPE F1)")
    args = p.parse_args(argv)
    runs: dict[str, Path] = {}
    try:
        for item in args.run:
            label, path = parse_run_arg(item)
            if label in runs:
                raise ValueError(f"--run label {label!r} given twice")
            runs[label] = resolve_metrics_path(path)
        out = plot_rewards(runs, args.out, title=args.title, smooth=args.smooth,
                           panels=DYNAMICS_PANELS if args.dynamics else None)
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    print(out)
    return 0
