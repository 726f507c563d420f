"""The embedded demo: SFT on the chosen answers, then ACPO from the SFT checkpoint, with TP=2 + SP on 2 processes.

Each stage is a normal `torchrun -m megatron_po.train` launch of a config under launch/configs/; the driver only
links the stages (the ACPO policy and reference start from the SFT checkpoint and share its tokenizer) and plots.
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


def run_stage(name: str, config: Path, out: Path, nproc: int, extra: list[str]) -> float:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "megatron_po.train", "--config", str(config), f"output_dir={out}", *extra]
    print(f"\n== {name}: {' '.join(cmd[2:])}", flush=True)
    t0 = time.perf_counter()
    # the machine's cores shared out over the stage's processes, unless the user chose
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // nproc))
    env = dict(os.environ, OMP_NUM_THREADS=threads)
    subprocess.run(cmd, check=True, env=env)
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
    eval_keys = ("eval/rewards/margins", "eval/rewards/accuracies", "eval/delta_logp", "probe/accuracy",
                 "probe/hallucination_rate")
    if evals:
        out.update({f"step0/{k}": evals[0][k] for k in eval_keys if k in evals[0]})
        out.update({f"end/{k}": evals[-1][k] for k in eval_keys if k in evals[-1]})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="megatron-po demo", description=__doc__)
    p.add_argument("--output-dir", default="outputs/demo")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--objectives", default="acpo",
                   help="comma-separated preference stages from the same SFT checkpoint (launch/configs/demo_<name>.yaml)")
    p.add_argument("--sft-steps", type=int, default=None, help="override the SFT stage length")
    p.add_argument("--steps", type=int, default=None, help="override the preference stages' length")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)

    from megatron_po.plots import plot_rewards

    out = Path(args.output_dir)
    names = [n.strip() for n in args.objectives.split(",") if n.strip()]
    for n in names:
        if not (CONFIGS / f"demo_{n}.yaml").is_file():
            p.error(f"no config {CONFIGS / f'demo_{n}.yaml'} for objective {n!r}")
    sft = out / "sft"
    sft_extra = [f"train.train_steps={args.sft_steps}"] if args.sft_steps else []
    pref_extra = [f"checkpoint.init_from={sft / 'checkpoints'}", f"data.tokenizer_path={sft / 'data' / 'tokenizer.model'}"]
    pref_extra += [f"train.train_steps={args.steps}"] if args.steps else []
    summary = {"sft": {"seconds": round(run_stage("SFT", CONFIGS / "demo_sft.yaml", sft, args.nproc, sft_extra), 1)}}
    for n in names:
        t = run_stage(n.upper(), CONFIGS / f"demo_{n}.yaml", out / n, args.nproc, pref_extra)
        summary[n] = summarize(out / n, t)

    tag = "_vs_".join(names)
    # P2-DPO logs per-branch metrics, not pair rewards: the reward plot shows the other stages
    rewarded = [n for n in names if n != "p2_dpo"]
    png = plot_rewards({n.upper(): out / n / "metrics.jsonl" for n in rewarded}, out / f"{tag}_rewards.png",
                       title=f"{' vs '.join(n.upper() for n in rewarded)} from SFT on the embedded shapes task "
                             "(TP=2 + SP)") if rewarded else "none (P2-DPO logs no pair rewards)"
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print("\n== demo summary")
    for stage, vals in summary.items():
        for k, v in vals.items():
            print(f"  {stage:5s} {k:28s} {v:.4f}" if isinstance(v, float) else f"  {stage:5s} {k:28s} {v}")
    print(f"  plot: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
