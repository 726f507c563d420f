"""Before a point launches: its resolved config, its layout and whether the memory plan fits it on the device.

Imports the trainer's config at once, the memory plan (and megatron through it) only when a point is screened.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_po.config import Config, ConfigError, load_config
from megatron_po.sweep.spec import Point, SweepSpec, forced_overrides, override_args

GiB = 1024**3


@dataclass
class Screen:
    """What a point is before it runs. status: planned (fits, or no plan to say otherwise), skipped (does not
    fit), invalid (a config or layout error)."""

    status: str
    error: str = ""
    cfg: Config | None = None
    layout: dict[str, Any] = field(default_factory=dict)
    plan: dict[str, Any] = field(default_factory=dict)
    needs_reference: bool = True
    family: Any = None
    """The point's FamilySpec (looked up here, once per point: each point's config names its own)."""


def resolve(spec: SweepSpec, point: Point, output_dir: Path, extra: dict[str, Any] | None = None) -> Config:
    """The config the point's launch trains with (`extra`: the data paths, known once the data is written)."""
    overrides = {**point.overrides, **forced_overrides(spec, point, output_dir), **(extra or {})}
    return load_config(point.config, override_args(overrides))


def describe(cfg: Config) -> dict[str, Any]:
    """The settings the report shows beside the measurements."""
    m = cfg.model
    model = Path(m.hf_path).name if m.hf_path else f"{m.family} h{m.hidden_size} L{m.num_layers}"
    return {"model": model, "seq_len": m.max_seq_length, "micro_batch": cfg.train.micro_batch_size,
            "global_batch": cfg.train.global_batch_size, "packing": cfg.data.packing, "reference": cfg.reference.source,
            "recompute": m.recompute, "objective": cfg.objective.name}


def screen(spec: SweepSpec, point: Point, output_dir: Path) -> Screen:
    """Resolves, checks the layout on `point.nproc` ranks and plans memory (rows: the objective's rows of
    `train.micro_batch_size` samples, each padded to model.max_seq_length: the worst case with or without
    packing). CPU points are planned with the local spec and the CPU's log-prob chunk, GPU points as their
    config selects (Transformer-Engine unless model.spec=local)."""
    try:
        cfg = resolve(spec, point, output_dir)
        dp = cfg.validate_world(point.nproc)
        from megatron_po.kinds import kind_of
        from megatron_po.objectives import build_objective

        objective = build_objective(cfg.objective.name, cfg.objective.params, cfg.objective.batch_stat_scope)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        return Screen("invalid", f"config error: {e}")
    par = cfg.parallel
    out = Screen("planned", cfg=cfg, needs_reference=objective.needs_reference,
                 layout={"tp": par.tp, "pp": par.pp, "cp": par.cp, "dp": dp, "sp": par.sp})
    from megatron_po.families import family_spec
    from megatron_po.memory_plan import build_plan, rows_per_micro_batch
    from megatron_po.models.shapes import MissingShapes

    budget = spec.device_memory_gb * (1 - spec.headroom)
    cpu = spec.device == "cpu"
    out.family = family_spec(cfg.model.family)
    try:
        plan = build_plan(cfg, out.family, point.nproc, spec.device_memory_gb,
                          rows=rows_per_micro_batch(cfg, kind_of(objective).rows_per_sample),
                          needs_reference=objective.needs_reference, headroom=spec.headroom,
                          te=False if cpu else cfg.model.spec != "local", device_type=spec.device)
    except MissingShapes as e:  # before ConfigError's ValueError: a plan we cannot make is no verdict
        out.plan = {"available": False, "note": str(e), "budget_gib": budget}
        return out
    except (ConfigError, ValueError) as e:  # e.g. layers that do not split over the stages
        return Screen("invalid", f"config error: {e}", cfg=cfg, layout=out.layout)
    out.plan = {"available": True, "peak_gib": plan.peak / GiB, "fits": plan.fits, "budget_gib": budget,
                "rows": plan.rows, "micro_batches": plan.micro_batches}
    if not plan.fits:
        out.status = "skipped"
        out.error = f"memory plan: {plan.peak / GiB:.1f} GiB per rank > {budget:.1f} GiB budget"
    return out
