"""The embedded demo: SFT on the chosen answers (vision tower and projector included), then one preference stage per
objective from the SFT checkpoint, with TP=2 + SP on 2 processes; the ACPO paper's reward-dynamics figure and a
table of end metrics compare them.

Each stage is a normal `torchrun -m megatron_po.train` launch of a config under launch/configs/; the driver only
links the stages (every policy and reference start from the SFT checkpoint and share its tokenizer, seeds and data)
and plots. A stage `X` runs `demo_X.yaml` when there is one, else a named variant (:data:`VARIANTS`, ACPO's Table-2
ablations), else `demo_acpo.yaml` with `objective.name=X` (any registered objective).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "launch" / "configs"
BASE = "demo_acpo.yaml"
"""The preference stages' schedule, data and layout; other objectives change only `objective.name`."""
DEFAULT_OBJECTIVES = "acpo,dpo,dpo_shift,ipo"
VARIANTS: dict[str, list[str]] = {
    "acpo_alpha1": ["objective.name=acpo", "objective.params.alpha_one=true"],      # Table 2: α ≡ 1 (plain DPO)
    "acpo_static_tau": ["objective.name=acpo", "objective.params.tau=static"],     # Table 2: τ → static β (0.1)
}
"""Named ablations: the base config plus these overrides."""


def stage_config(name: str) -> tuple[Path, list[str]]:
    """(config, overrides) of the preference stage `name`.

    Raises:
        ValueError: no demo config, variant or registered objective has that name.
    """
    from megatron_po.objectives import OBJECTIVES

    if (CONFIGS / f"demo_{name}.yaml").is_file():
        return CONFIGS / f"demo_{name}.yaml", []
    if name in VARIANTS:
        return CONFIGS / BASE, list(VARIANTS[name])
    if name in OBJECTIVES:
        return CONFIGS / BASE, [f"objective.name={name}"]
    raise ValueError(f"no stage {name!r}: not a launch/configs/demo_<name>.yaml, a variant {sorted(VARIANTS)} or "
                     f"an objective {sorted(OBJECTIVES)}")


def torchrun(name: str, nproc: int, args: list[str], **kw) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=nproc ARGS`, announced, failing the demo if it fails."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    print(f"\n== {name}: {' '.join(cmd[2:])}", flush=True)
    # the machine's cores shared out over the stage's processes, unless the user chose
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // nproc))
    return subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS=threads), **kw)


def run_stage(name: str, config: Path, out: Path, nproc: int, extra: list[str]) -> float:
    t0 = time.perf_counter()
    torchrun(name, nproc, ["-m", "megatron_po.train", "--config", str(config), f"output_dir={out}", *extra])
    return time.perf_counter() - t0


def summarize(run: Path, seconds: float) -> dict:
    from megatron_po.plots import read_metrics

    rows = read_metrics(run / "metrics.jsonl")
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval/delta_logp" in r or "probe/accuracy" in r]
    keys = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
            "rewards/frac_chosen_negative", "p2/focus_accuracy", "p2/robust_accuracy", "p2/calib_gain_policy")
    out = {"seconds": round(seconds, 1), "steps": train[-1]["step"],
           **{f"first/{k}": train[0][k] for k in keys if k in train[0]},
           **{f"final/{k}": train[-1][k] for k in keys if k in train[-1]}}
    eval_keys = ("eval/rewards/chosen", "eval/rewards/margins", "eval/rewards/accuracies", "eval/delta_logp",
                 "probe/accuracy", "probe/f1", "probe/adversarial/f1", "probe/hallucination_rate")
    if evals:
        out.update({f"step0/{k}": evals[0][k] for k in eval_keys if k in evals[0]})
        out.update({f"end/{k}": evals[-1][k] for k in eval_keys if k in evals[-1]})
        if "eval/rewards/chosen" in evals[-1]:
            out["end/delta_reward_chosen"] = evals[-1]["eval/rewards/chosen"] - evals[0]["eval/rewards/chosen"]
    alphas = [r["acpo/alpha_hat_mean"] for r in train if "acpo/alpha_hat_mean" in r]
    if alphas:
        out["final/acpo/alpha_hat_mean"] = alphas[-1]
    return out


TABLE = (("end/delta_reward_chosen", "Δr(y_w)"), ("end/eval/rewards/margins", "margin"),
         ("end/eval/rewards/accuracies", "pair acc."), ("end/eval/delta_logp", "Δlog p/token"),
         ("end/probe/f1", "POPE F1"), ("end/probe/adversarial/f1", "F1 adversarial"),
         ("end/probe/accuracy", "probe acc."), ("final/acpo/alpha_hat_mean", "α̂"))
"""The end-metrics table: held-out values at the last evaluation (Δ: since step 0, the SFT model)."""


def metrics_table(summary: dict) -> str:
    """A markdown table of :data:`TABLE` per preference stage (the SFT row: its probe at the end)."""
    lines = ["| stage | " + " | ".join(t for _, t in TABLE) + " |", "|---" * (len(TABLE) + 1) + "|"]
    for stage, vals in summary.items():
        if "steps" not in vals:  # not a training stage (the P2 pair generation)
            continue
        # the SFT stage starts from random weights: only its probe compares
        shown = {k for k, _ in TABLE if k in vals and (stage != "sft" or k.startswith("end/probe"))}
        cells = [f"{vals[k]:+.3f}" if k in shown and k.startswith(("end/delta", "end/eval/delta", "end/eval/rewards/m"))
                 else f"{vals[k]:.3f}" if k in shown else "" for k, _ in TABLE]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def generate_pairs(out: Path, config: Path, nproc: int, links: list[str], num_questions: int) -> tuple[Path, dict]:
    """P2-DPO pairs from the SFT model's own greedy answers (`megatron-po generate-p2`, in the stage's layout) to
    questions about new images of the task with the asked object's box."""
    from megatron_po.data.synthetic_p2 import generate_p2_questions

    questions = generate_p2_questions(out, num_questions, seed=4242)
    run = torchrun("P2 pairs", nproc, ["-m", "megatron_po.cli", "generate-p2", "--questions", str(questions),
                                       "--config", str(config), f"output_dir={out}", *links],
                   stdout=subprocess.PIPE, text=True)
    stats = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"   {stats['pairs_kept']} of {stats['pairs_generated']} pairs kept (yield {stats['yield']:.2f}): "
          f"focus {stats['focus_kept']}, robust {stats['robust_kept']}", flush=True)
    return Path(stats.pop("out")), stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="megatron-po demo", description=__doc__)
    p.add_argument("--output-dir", default="outputs/demo")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--objectives", default=DEFAULT_OBJECTIVES,
                   help="comma-separated preference stages from the same SFT checkpoint: demo_<name>.yaml, a variant "
                        f"({', '.join(VARIANTS)}) or any registered objective")
    p.add_argument("--sft-steps", type=int, default=None, help="override the SFT stage length")
    p.add_argument("--steps", type=int, default=None, help="override the preference stages' length")
    p.add_argument("--p2-questions", type=int, default=384,
                   help="with p2_dpo: images (one question each) the SFT model generates P2 pairs for")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)

    from megatron_po.plots import DYNAMICS_PANELS, plot_rewards

    out = Path(args.output_dir)
    names = [n.strip() for n in args.objectives.split(",") if n.strip()]
    try:
        stages = {n: stage_config(n) for n in names}
    except ValueError as e:
        p.error(str(e))
    sft = out / "sft"
    sft_extra = [f"train.train_steps={args.sft_steps}"] if args.sft_steps else []
    # every stage scores the SFT stage's held-out pairs and POPE probe: one yardstick for the table
    pref_extra = [f"checkpoint.init_from={sft / 'checkpoints'}",
                  f"data.tokenizer_path={sft / 'data' / 'tokenizer.model'}",
                  f"eval.path={sft / 'data' / 'eval.jsonl'}", f"eval.probe_path={sft / 'data' / 'pope' / 'pope.jsonl'}"]
    pref_extra += [f"train.train_steps={args.steps}"] if args.steps else []
    t = run_stage("SFT", CONFIGS / "demo_sft.yaml", sft, args.nproc, sft_extra)
    summary = {"sft": summarize(sft, t)}
    for n, (config, overrides) in stages.items():
        if n == "p2_dpo":  # trained on pairs the SFT model generates for itself
            t0 = time.perf_counter()
            pairs, stats = generate_pairs(out / "p2_pairs", config, args.nproc, pref_extra[:2], args.p2_questions)
            summary["p2_generation"] = {"seconds": round(time.perf_counter() - t0, 1), **stats}
            overrides = overrides + ["data.source=jsonl", f"data.train_path={pairs}"]
        t = run_stage(n.upper(), config, out / n, args.nproc, overrides + pref_extra)
        summary[n] = summarize(out / n, t)

    # P2-DPO logs per-branch metrics, not pair rewards: the reward plots show the other stages
    rewarded = {n.upper(): out / n / "metrics.jsonl" for n in names if n != "p2_dpo"}
    title = f"{' vs '.join(rewarded)} from one SFT checkpoint, shapes task (TP=2 + SP)"
    pngs = [plot_rewards(rewarded, out / "rewards.png", title=title),
            plot_rewards(rewarded, out / "reward_dynamics.png", title=title, panels=DYNAMICS_PANELS)
            ] if rewarded else []
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text(metrics_table(summary) + "\n")
    print("\n== demo summary (held-out, at the last evaluation)")
    print(metrics_table(summary))
    print(f"  per-stage values: {out / 'summary.json'}; plots: {', '.join(map(str, pngs)) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
