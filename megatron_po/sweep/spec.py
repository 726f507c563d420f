"""A sweep's YAML, read into typed points: the grid (product of the axes) plus explicit points, each with a stable
id and the overrides its `megatron-po train` launch gets.

    name: cpu_demo
    config: launch/configs/x.yaml     # optional base config of every point (relative to the working directory)
    overrides: {train.global_batch_size: 8}   # common to every point (dotted keys)
    warmup_steps: 2                   # untimed steps, then timed_steps measured ones
    timed_steps: 4
    device: cpu                       # cpu | cuda
    device_memory_gb: 10              # per rank: the memory plan screens each point against it
    nproc: 1                          # processes of a point that names none
    data: {prompt_tokens: 32, response_median: 48, response_sigma: 0.5, pairs: 256}
    axes:                             # the grid; a value: label, optional nproc, config and data (fields of
                                      # `data` for its points), dotted overrides
      width: [{label: h256, model.hidden_size: 256}, {label: h512, model.hidden_size: 512}]
      layout: [{label: tp1}, {label: tp2, nproc: 2, parallel.tp: 2}]
    points: [{label: h512-pack, model.hidden_size: 512, data.packing: true}]   # besides (or instead of) the grid
    anchors: [{point: h512-tp1, source: "where it was published", time/step: 14.0}]

Unknown keys are errors that name the key (as in the trainer's config).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml


class SweepError(ValueError):
    """A problem with the sweep's YAML; the message names the key."""


LABEL = re.compile(r"^[A-Za-z0-9_.+-]+$")
"""Labels name directories: no path separators, no spaces."""


@dataclass(frozen=True)
class DataSpec:
    """The synthetic pairs every point trains on (megatron_po/data/synthetic_lengths.py)."""

    prompt_tokens: int = 32
    response_median: float = 48.0
    response_sigma: float = 0.5
    """Log-space standard deviation of the response lengths (0: every response the median)."""
    pairs: int = 256
    image_size: int = 64
    """Side of the one image in pixels (HF families: decides its tokens; tiny_vlm resizes it anyway)."""
    vocab_size: int = 4096
    """The generated tokenizer's pieces (tiny_vlm; HF families use model.hf_path's tokenizer)."""
    seed: int = 0


@dataclass(frozen=True)
class Choice:
    """One value of an axis, or one explicit point."""

    label: str
    nproc: int | None = None
    config: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    """Fields of the sweep's `data` that change for this value's points (longer rows want longer responses)."""


@dataclass(frozen=True)
class Anchor:
    """A published figure, shown next to our matching point."""

    point: str
    source: str
    metrics: dict[str, Any] = field(default_factory=dict)
    """Metric name (as in metrics.jsonl, e.g. time/step, memory/peak_reserved_gib, mfu) -> value or text."""


@dataclass(frozen=True)
class Point:
    index: int
    """Position in the sweep (what `--point` and SLURM's array task id name)."""
    label: str
    id: str
    config: str | None
    overrides: dict[str, Any]
    """The user's overrides (common, then each axis value's); the forced ones come at launch."""
    nproc: int
    axes: dict[str, str]
    """Axis name -> the label of this point's value ({} for an explicit point)."""
    data: DataSpec = field(default_factory=DataSpec)
    """The synthetic pairs this point trains on (the sweep's `data` with its values' changes)."""

    @property
    def dirname(self) -> str:
        return f"{self.label}-{self.id}"


@dataclass
class SweepSpec:
    name: str
    path: Path
    config: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    warmup_steps: int = 2
    timed_steps: int = 4
    device: str = "cpu"
    device_memory_gb: float = 80.0
    headroom: float = 0.1
    """Share of device_memory_gb the plan leaves for what it does not count (memory_plan.build_plan)."""
    nproc: int = 1
    description: str = ""
    data: DataSpec = field(default_factory=DataSpec)
    axes: dict[str, list[Choice]] = field(default_factory=dict)
    points: list[Choice] = field(default_factory=list)
    anchors: list[Anchor] = field(default_factory=list)

    def __post_init__(self):
        if self.device not in ("cpu", "cuda"):
            raise SweepError(f"{self.path}: device must be cpu|cuda, got {self.device!r}")
        if self.warmup_steps < 0 or self.timed_steps < 1:
            raise SweepError(f"{self.path}: warmup_steps must be >= 0 and timed_steps >= 1")
        if self.nproc < 1 or self.device_memory_gb <= 0:
            raise SweepError(f"{self.path}: nproc must be >= 1 and device_memory_gb > 0")
        if not (self.axes or self.points):
            raise SweepError(f"{self.path}: no points: give axes, points or both")


def _mapping(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise SweepError(f"{where} must be a mapping, got {type(value).__name__}")
    return value


def _overrides(value: Any, where: str) -> dict[str, Any]:
    for k in _mapping(value, where):
        if not isinstance(k, str) or "." not in k:
            raise SweepError(f"{where}: '{k}' is not a dotted config key (section.field)")
    return dict(value)


def _choice(raw: Any, where: str) -> Choice:
    """`{label, nproc?, config?, overrides?, <dotted.key>: value ...}`: dotted keys are overrides too."""
    raw = _mapping(raw, where)
    label = raw.get("label")
    if not isinstance(label, str) or not LABEL.match(label):
        raise SweepError(f"{where}.label must be a name of letters, digits and _ . + -, got {label!r}")
    nproc = raw.get("nproc")
    if nproc is not None and (isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1):
        raise SweepError(f"{where} ({label}).nproc must be an integer >= 1, got {nproc!r}")
    config = raw.get("config")
    if config is not None and not isinstance(config, str):
        raise SweepError(f"{where} ({label}).config must be a path, got {config!r}")
    overrides = _overrides(raw.get("overrides", {}), f"{where} ({label}).overrides")
    data = _mapping(raw.get("data", {}), f"{where} ({label}).data")
    _typed(DataSpec, data, f"{where} ({label}).data")  # names an unknown or mistyped field
    for k, v in raw.items():
        if k in ("label", "nproc", "config", "overrides", "data"):
            continue
        if not isinstance(k, str) or "." not in k:
            raise SweepError(f"{where} ({label}): unknown key '{k}' (known: label, nproc, config, overrides, data, "
                             "or a dotted config key such as parallel.tp)")
        overrides[k] = v
    return Choice(label, nproc, config, overrides, dict(data))


def _typed(cls, raw: dict, where: str):
    """A flat dataclass from a mapping: unknown keys named, numbers checked."""
    known = {f.name: f for f in fields(cls)}
    for k in raw:
        if k not in known:
            raise SweepError(f"unknown key '{where}.{k}' (known: {sorted(known)})")
    defaults = cls()
    for k, v in raw.items():
        want = type(getattr(defaults, k))
        if isinstance(v, bool) or not isinstance(v, (int, float) if want is float else want):
            raise SweepError(f"{where}.{k} must be a {want.__name__}, got {v!r}")
    return cls(**{k: (float(v) if known[k].type in ("float", float) else v) for k, v in raw.items()})


TOP_KEYS = {"name", "description", "config", "overrides", "warmup_steps", "timed_steps", "device", "device_memory_gb",
            "headroom", "nproc", "data", "axes", "points", "anchors"}


def load_sweep(path: str | Path) -> SweepSpec:
    """Reads and checks a sweep YAML.

    Raises:
        SweepError: an unknown or mistyped key (named), a bad label, no points.
    """
    path = Path(path)
    raw = yaml.safe_load(path.read_text()) or {}
    raw = _mapping(raw, str(path))
    unknown = sorted(set(raw) - TOP_KEYS)
    if unknown:
        raise SweepError(f"{path}: unknown key '{unknown[0]}' (known: {sorted(TOP_KEYS)})")
    axes = {}
    for name, values in _mapping(raw.get("axes", {}), "axes").items():
        if not isinstance(values, list) or not values:
            raise SweepError(f"axes.{name} must be a non-empty list of values")
        axes[str(name)] = [_choice(v, f"axes.{name}[{i}]") for i, v in enumerate(values)]
    points = raw.get("points", [])
    if not isinstance(points, list):
        raise SweepError("points must be a list")
    anchors = []
    for i, a in enumerate(raw.get("anchors", []) or []):
        a = dict(_mapping(a, f"anchors[{i}]"))
        if not isinstance(a.get("point"), str) or not isinstance(a.get("source"), str):
            raise SweepError(f"anchors[{i}] needs 'point' (a point's label) and 'source' (where it was published)")
        anchors.append(Anchor(a.pop("point"), a.pop("source"), a))
    scalars = {k: raw[k] for k in ("name", "description", "config", "warmup_steps", "timed_steps", "device",
                                   "device_memory_gb", "headroom", "nproc") if k in raw}
    for k, v in scalars.items():
        want = {"name": str, "description": str, "config": str, "device": str}.get(k, (int, float))
        if isinstance(v, bool) or not isinstance(v, want) or (k in ("warmup_steps", "timed_steps", "nproc")
                                                               and not isinstance(v, int)):
            raise SweepError(f"{path}: {k} has the wrong type: {v!r}")
    scalars.setdefault("name", path.stem)
    return SweepSpec(path=path, overrides=_overrides(raw.get("overrides", {}), "overrides"),
                     data=_typed(DataSpec, _mapping(raw.get("data", {}), "data"), "data"), axes=axes,
                     points=[_choice(p, f"points[{i}]") for i, p in enumerate(points)], anchors=anchors, **scalars)


def _point_id(spec: SweepSpec, config: str | None, overrides: dict, nproc: int, data: DataSpec) -> str:
    """A short hash of what decides the measurement: the base config's text (an edited file is a new point),
    the overrides, the processes, the steps, the data and the device; not where the sweep writes."""
    text = Path(config).read_text() if config and Path(config).is_file() else None
    key = {"config": config, "config_text": text, "overrides": overrides, "nproc": nproc,
           "steps": [spec.warmup_steps, spec.timed_steps], "data": asdict(data), "device": spec.device}
    return hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:8]


def _merge(spec: SweepSpec, index: int, label: str, choices: list[Choice], axes: dict[str, str]) -> Point:
    overrides, nproc, config, data = dict(spec.overrides), spec.nproc, spec.config, {}
    for c in choices:  # later axes win, as later overrides do on the command line
        overrides.update(c.overrides)
        nproc = c.nproc or nproc
        config = c.config or config
        data.update(c.data)
    data = dataclasses.replace(spec.data, **{k: float(v) if isinstance(getattr(spec.data, k), float) else v
                                             for k, v in data.items()})
    return Point(index, label, _point_id(spec, config, overrides, nproc, data), config, overrides, nproc, axes, data)


def expand_points(spec: SweepSpec) -> list[Point]:
    """The grid's points (the product of the axes, first axis slowest), then the explicit ones.

    Raises:
        SweepError: two points with the same label.
    """
    out: list[Point] = []
    names = list(spec.axes)
    for combo in itertools.product(*spec.axes.values()) if names else ():
        label = "-".join(c.label for c in combo)
        out.append(_merge(spec, len(out), label, list(combo), {n: c.label for n, c in zip(names, combo)}))
    for c in spec.points:
        out.append(_merge(spec, len(out), c.label, [c], {}))
    seen: set[str] = set()
    for p in out:
        if p.label in seen:
            raise SweepError(f"two points are labelled {p.label!r}: labels must be unique")
        seen.add(p.label)
    for a in spec.anchors:
        if a.point not in seen:
            raise SweepError(f"anchors: no point labelled {a.point!r} (points: {sorted(seen)})")
    return out


def override_args(overrides: dict[str, Any]) -> list[str]:
    """`key=value` arguments whose values the trainer's YAML parser reads back as they were."""
    def text(v: Any) -> str:
        return v if isinstance(v, str) else json.dumps(v)  # true/false, numbers, lists: YAML reads JSON
    return [f"{k}={text(v)}" for k, v in overrides.items()]


def forced_overrides(spec: SweepSpec, point: Point, output_dir: Path) -> dict[str, Any]:
    """What every launch of a sweep gets whatever its YAML says: a fixed number of logged steps, no checkpoint,
    no evaluation, its own output_dir; and, unless the point names one, a reference cache path of its own (used
    only with reference.source=cache, and then computed by the sweep before the point trains)."""
    forced = {"train.train_steps": spec.warmup_steps + spec.timed_steps, "train.log_interval": 1,
              "train.progress_bar": False, "train.epochs": 0, "checkpoint.save": False, "checkpoint.resume": False,
              "eval.interval": 0, "output_dir": str(output_dir)}
    if "reference.cache_path" not in point.overrides:
        forced["reference.cache_path"] = str(output_dir / OWN_CACHE)
    return forced


OWN_CACHE = "ref_cache"
"""The reference cache a point computes for itself, in its directory."""
