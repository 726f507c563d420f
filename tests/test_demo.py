"""The demo driver's pieces that need no training: stage resolution (configs, ACPO's ablation variants, any
registered objective), the end-metrics table, the reward-dynamics figure, and the SFT data mix."""

from __future__ import annotations

import json

import pytest

from megatron_po.demo import BASE, CONFIGS, VARIANTS, metrics_table, stage_config, summarize
from megatron_po.plots import DYNAMICS_PANELS, _series, plot_rewards

pytestmark = pytest.mark.pure


def test_stages_resolve_to_configs_variants_and_objectives():
    assert stage_config("acpo") == (CONFIGS / "demo_acpo.yaml", [])
    assert stage_config("p2_dpo") == (CONFIGS / "demo_p2_dpo.yaml", [])
    assert stage_config("ipo") == (CONFIGS / BASE, ["objective.name=ipo"])
    assert stage_config("acpo_alpha1") == (CONFIGS / BASE, VARIANTS["acpo_alpha1"])
    with pytest.raises(ValueError, match="no stage 'nope'"):
        stage_config("nope")


def test_ablation_variants_build_the_table_2_objectives():
    """The variants' overrides give ACPO with α ≡ 1 and with the static τ (OBJECTIVES.md §7, Table 2)."""
    from megatron_po.config import load_config

    for name, field, value in (("acpo_alpha1", "alpha_one", True), ("acpo_static_tau", "tau", "static")):
        config, overrides = stage_config(name)
        cfg = load_config(config, overrides)
        assert cfg.objective.name == "acpo" and cfg.objective.params == {field: value}


def _metrics(path, chosen, f1, alpha=None):
    rows = []
    for step, (c, f) in enumerate(zip(chosen, f1)):
        rows.append({"step": step * 10, "eval/rewards/chosen": c, "eval/rewards/margins": 0.1 * step,
                     "eval/delta_logp": -0.01 * step, "probe/accuracy": f, "probe/f1": f})
        rows.append({"step": step * 10 + 1, "loss": 0.69 - 0.01 * step,
                     **({"acpo/alpha_hat_mean": alpha, "acpo/alpha_hat_min": 0.3, "acpo/alpha_hat_max": 0.95}
                        if alpha is not None else {})})
    path.mkdir()
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_summary_table_and_dynamics_figure(tmp_path):
    acpo = _metrics(tmp_path / "acpo", [0.5, 0.3, 0.1], [0.9, 0.88, 0.85], alpha=0.8)
    dpo = _metrics(tmp_path / "dpo", [0.0, -0.2, -0.4], [0.9, 0.86, 0.8])
    summary = {"acpo": summarize(acpo, 1.0), "dpo": summarize(dpo, 1.0)}
    # Δr(y_w) is since the first evaluation, not the last value itself
    assert summary["acpo"]["end/delta_reward_chosen"] == pytest.approx(-0.4)
    assert summary["dpo"]["end/probe/f1"] == 0.8 and summary["acpo"]["final/acpo/alpha_hat_mean"] == 0.8
    table = metrics_table(summary).splitlines()
    assert table[0].startswith("| stage | Δr(y_w) | margin") and len(table) == 4
    assert table[2].startswith("| acpo | -0.400 | +0.200 |") and "0.800" in table[2]
    rows = [json.loads(line) for line in (acpo / "metrics.jsonl").read_text().splitlines()]
    assert _series(rows, "delta:eval/rewards/chosen") == ([0, 10, 20], [0.0, pytest.approx(-0.2), pytest.approx(-0.4)])
    png = plot_rewards({"ACPO": acpo / "metrics.jsonl", "DPO": dpo / "metrics.jsonl"}, tmp_path / "dyn.png",
                       panels=DYNAMICS_PANELS)
    assert png.stat().st_size > 10_000


def test_sft_mix_has_balanced_yes_no_and_near_misses(tmp_path):
    """data.yesno_share sets the share of yes/no pairs (half present, half absent); near_miss = 1 draws every absent
    object among those sharing a colour or a shape with a drawn one."""
    from megatron_po.data.records import read_records
    from megatron_po.data.synthetic import generate_synthetic_dataset

    generate_synthetic_dataset(tmp_path / "mix", 400, 0, seed=2, yesno_share=0.5, near_miss=1.0)
    records = read_records(tmp_path / "mix" / "train.jsonl")
    yesno = [r for r in records if r.meta["kind"] == "yesno"]
    assert 0.4 < len(yesno) / len(records) < 0.6
    absent = [r for r in yesno if not r.meta["present"]]
    assert 0.4 < len(absent) / len(yesno) < 0.6
    for r in absent:
        q = r.meta["query"]
        assert any(q["colour"] == o["colour"] or q["shape"] == o["shape"] for o in r.meta["objects"])
