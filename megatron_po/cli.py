"""The driver: `torchrun ... -m megatron_po.train --config FILE [key=value ...]` or `megatron-po train ...`, and
`torchrun ... -m megatron_po.cli precompute-ref --config FILE [key=value ...]` for the reference log-prob cache."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from megatron_po.config import Config, ConfigError, config_to_dict, load_config
from megatron_po.data.records import RecordError
from megatron_po.quiet import quiet_megatron_notes
from megatron_po.train.jobcontrol import EXIT_REQUEUE, NonFiniteStep, Requeue

logger = logging.getLogger("megatron_po")


def _parse(argv: list[str], prog: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__)
    p.add_argument("--config", default=None, help="YAML config (defaults: the embedded demo task)")
    p.add_argument("--dry-run", action="store_true", help="validate the config (and layout, given --world-size)")
    p.add_argument("--world-size", type=int, default=None,
                   help="with --dry-run: the world size to check, and print the memory plan of each rank")
    p.add_argument("--device-memory-gb", type=float, default=80.0,
                   help="with --dry-run --world-size: device memory per rank the plan must fit (GiB)")
    p.add_argument("--rows", type=int, default=None,
                   help="with --dry-run --world-size: sequences per micro-batch (default: those of "
                        "train.micro_batch_size samples, padded to model.max_seq_length)")
    p.add_argument("--json", action="store_true", help="with --dry-run --world-size: the plan as JSON")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.tp=2 objective.name=dpo")
    return p.parse_intermixed_args(argv)  # options may follow the overrides


def dry_run(cfg: Config, objective, args: argparse.Namespace) -> None:
    """Validates the config; with a world size, also the layout and the data (read and decoded as training would),
    and prints the memory plan of each rank (for the Transformer-Engine spec unless model.spec=local: the GPU
    job's, wherever the dry run runs)."""
    if args.world_size is None:
        print(json.dumps(config_to_dict(cfg), indent=1))
        return
    from megatron_po.families import family_spec
    from megatron_po.memory_plan import build_plan, format_plan, rows_per_micro_batch
    from megatron_po.models.shapes import MissingShapes
    from megatron_po.kinds import kind_of
    from megatron_po.train.data import check_data

    # built here, once, rather than with the objective: the config-only dry run imports no model code
    family = family_spec(cfg.model.family)
    dp = cfg.validate_world(args.world_size)
    if not args.json:
        par = cfg.parallel
        print(f"layout ok: world={args.world_size} tp={par.tp} pp={par.pp} cp={par.cp} dp={dp}")
        print(check_data(cfg, objective, family))
    rows = args.rows or rows_per_micro_batch(cfg, kind_of(objective).rows_per_sample)
    try:
        plan = build_plan(cfg, family, args.world_size, args.device_memory_gb, rows=rows,
                          needs_reference=objective.needs_reference, te=cfg.model.spec != "local")
    except MissingShapes as e:
        print(f"no memory plan: {e}")
        return
    print(json.dumps(plan.to_dict(), indent=1) if args.json else format_plan(plan, cfg))


def _distributed(argv: list[str] | None, prog: str, work) -> int:
    """Parses `--config FILE [overrides]`, builds the objective and the model family's spec (once: they are
    passed down, nothing below looks them up by name), starts the process groups (under torchrun or alone), runs
    `work(cfg, objective, family, groups)` and tears the groups down; config problems are one `config error:` line
    and exit code 2, before any process group exists."""
    args = _parse(sys.argv[1:] if argv is None else argv, prog)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    quiet_megatron_notes()
    try:
        from megatron_po.objectives import build_objective

        cfg = load_config(args.config, args.overrides)
        objective = build_objective(cfg.objective.name, cfg.objective.params, cfg.objective.batch_stat_scope)
        if args.dry_run:
            dry_run(cfg, objective, args)
            return 0
        from megatron_po.families import family_spec

        family = family_spec(cfg.model.family)
    except (ConfigError, ValueError, FileNotFoundError) as e:  # RecordError is a ValueError
        return _refuse("data" if isinstance(e, (RecordError, FileNotFoundError)) else "config", e)

    import torch.distributed as dist

    from megatron_po.parallel.groups import init_parallel, init_process_group, teardown

    init_process_group(cfg.parallel)
    try:
        cfg.validate_world(dist.get_world_size())
        from megatron_po.models.specs import have_te

        if dist.get_rank() == 0 and not have_te():
            logger.warning("Transformer-Engine and Apex are not installed: megatron-core's local layers, torch norms "
                           "and torch optimizers are used (expected on CPU; the GPU image has both)")
        work(cfg, objective, family, init_parallel(cfg.parallel, seed=cfg.train.seed))
    except (RecordError, FileNotFoundError, ConfigError) as e:
        # found by every rank alike while the data and the model are prepared, before the first step
        return _refuse("config" if isinstance(e, ConfigError) else "data", e)
    except Requeue as e:  # saved after a step on a signal or the time limit: the launcher requeues the job
        if dist.get_rank() == 0:
            print(f"{e}; exit code {EXIT_REQUEUE}: relaunch to resume", file=sys.stderr, flush=True)
        return EXIT_REQUEUE
    except NonFiniteStep as e:  # every rank stops at the same step; one line for the job
        if dist.get_rank() == 0:
            print(f"training error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        teardown()
    return 0


def _generate_p2(cfg: Config, objective, family, groups, opts: argparse.Namespace) -> None:
    import dataclasses
    import os.path

    import torch.distributed as dist

    from megatron_po.p2_pairs import P2GenConfig, clip_scorer, generate_p2_records, read_questions, write_records
    from megatron_po.train.data import build_tokenizer
    from megatron_po.train.models import build_initial_model

    if not family.generates or cfg.parallel.pp > 1:
        raise ConfigError(f"megatron-po generate-p2 does not run model.family={cfg.model.family} with "
                          f"parallel.pp={cfg.parallel.pp}: it needs a family with generation wired (tiny_vlm; the "
                          "HF families' processors and M-RoPE positions are not yet) and pp=1")
    if not cfg.data.tokenizer_path:
        raise ConfigError("megatron-po generate-p2 needs data.tokenizer_path (the policy's tokenizer)")
    # the output layer's logits, not the fused log-prob path's hidden states
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, logprobs="logits"))
    tokenizer = build_tokenizer(cfg, family, Path(cfg.data.tokenizer_path))
    model = build_initial_model(cfg, family, groups, tokenizer.vocab_size, adapters_ok=True)  # a LoRA run's too
    model.eval()
    questions = read_questions(opts.questions)
    gen = P2GenConfig(max_new_tokens=opts.max_new_tokens, seed=cfg.data.seed)
    records, stats = generate_p2_records(
        model, tokenizer, groups, questions, opts.questions.parent, cfg.model.vision.image_size,
        cfg.model.vision.num_patches, clip_scorer(opts.clip), gen, cfg.parallel.tp if cfg.parallel.sp else 1)
    if dist.get_rank() == 0:
        out = opts.out or opts.questions.parent / "p2_pairs.jsonl"
        for r in records:  # image paths stay relative to the file that names them
            r["image"] = os.path.relpath(opts.questions.parent / r["image"], out.parent)
        write_records(records, out)
        print(json.dumps({"out": str(out), **stats}), flush=True)


def generate_p2_main(argv: list[str] | None = None) -> int:
    """`megatron-po generate-p2 --questions Q.jsonl [--out P.jsonl] [--clip PATH|box] --config C [overrides]`."""
    p = argparse.ArgumentParser(prog="megatron-po generate-p2", add_help=False)
    p.add_argument("--questions", type=Path, required=True,
                   help='JSONL of {"id", "image", "prompt", "bbox"}: images with the object box to focus on')
    p.add_argument("--out", type=Path, default=None, help="P2-DPO records (default: p2_pairs.jsonl beside them)")
    p.add_argument("--clip", default="box", help="CLIP checkpoint directory for the DDW scores, or 'box' (a "
                                                 "stand-in from the box's share of the image)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    opts, rest = p.parse_known_args(sys.argv[1:] if argv is None else argv)
    return _distributed(rest, "megatron-po generate-p2", lambda cfg, objective, family, groups:
                        _generate_p2(cfg, objective, family, groups, opts))


def prepare_data_main(argv: list[str] | None = None) -> int:
    """`megatron-po prepare-data --config F [overrides] [--workers N]`: the prepared index of every split the
    config reads (training data, held-out pairs, probe), alone or under torchrun (ranks share the records). Every
    record is parsed and tokenized and every image of a kept sample decoded, as a training launch without an
    index would; a bad record or image is refused with the same message. Needs no GPU and ignores the layout."""
    p = argparse.ArgumentParser(prog="megatron-po prepare-data", add_help=False)
    p.add_argument("--workers", type=int, default=1, help="processes per rank that examine records")
    opts, rest = p.parse_known_args(sys.argv[1:] if argv is None else argv)
    args = _parse(rest, "megatron-po prepare-data")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    try:
        from megatron_po.families import family_spec
        from megatron_po.objectives import build_objective

        cfg = load_config(args.config, args.overrides)
        objective = build_objective(cfg.objective.name, cfg.objective.params, cfg.objective.batch_stat_scope)
        family = family_spec(cfg.model.family)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        return _refuse("config", e)
    import dataclasses

    from megatron_po.parallel.groups import init_process_group, teardown
    from megatron_po.train.data import prepare_all

    # host work only: a gloo group on any machine, whatever the config's layout
    init_process_group(dataclasses.replace(cfg.parallel, backend="gloo"))
    try:
        summary = prepare_all(cfg, objective, family, max(1, opts.workers))
    except (RecordError, FileNotFoundError, ValueError) as e:
        return _refuse("data", e)
    finally:
        teardown()
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(summary, indent=1), flush=True)
    return 0


def _refuse(kind: str, e: Exception) -> int:
    """One line for the job (from global rank 0 under torchrun, which starts every rank with the same input), exit
    code 2."""
    if os.environ.get("RANK", "0") == "0":
        print(f"{kind} error: {e}", file=sys.stderr)
    return 2


def _train(cfg: Config, objective, family, groups) -> None:
    import torch.distributed as dist

    from megatron_po.train.loop import run_training

    if dist.get_rank() == 0:
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.output_dir) / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=1))
    last = run_training(cfg, objective, family, groups)
    if dist.get_rank() == 0 and last:
        keys = ("step", "loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")
        print("final: " + " ".join(f"{k}={last[k]:.4g}" for k in keys if k in last), flush=True)


def _precompute(cfg: Config, objective, family, groups) -> None:
    import torch.distributed as dist

    from megatron_po.train.precompute import precompute_reference

    path = precompute_reference(cfg, objective, family, groups)
    if dist.get_rank() == 0:
        print(f"reference cache written: {path} (train with reference.source=cache reference.cache_path={path})",
              flush=True)


def _evaluate(cfg: Config, objective, family, groups) -> None:
    import torch.distributed as dist

    from megatron_po.train.evaluate import run_evaluation

    out = run_evaluation(cfg, objective, family, groups)
    if dist.get_rank() == 0:
        print(json.dumps(out, indent=1, sort_keys=True), flush=True)


def train_main(argv: list[str] | None = None) -> int:
    return _distributed(argv, "megatron-po train", _train)


def precompute_main(argv: list[str] | None = None) -> int:
    return _distributed(argv, "megatron-po precompute-ref", _precompute)


def eval_main(argv: list[str] | None = None) -> int:
    return _distributed(argv, "megatron-po eval", _evaluate)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: megatron-po {prepare-data,train,precompute-ref,eval,generate-p2,demo,sweep} ...\n"
              "  prepare-data    read and check a config's data once: the prepared index training starts from\n"
              "  train           run one training stage (under torchrun)\n"
              "  precompute-ref  write the reference log-prob cache of a config (under torchrun, any layout)\n"
              "  eval            score held-out pairs and the probe with checkpoint.init_from (any layout)\n"
              "  generate-p2     P2-DPO focus and robustness pairs from checkpoint.init_from's greedy answers\n"
              "  demo            the embedded SFT -> preference stages demo on this machine\n"
              "  sweep           a grid of short training launches; their step costs as a table and plots")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "prepare-data":
        return prepare_data_main(rest)
    if cmd == "train":
        return train_main(rest)
    if cmd == "precompute-ref":
        return precompute_main(rest)
    if cmd == "eval":
        return eval_main(rest)
    if cmd == "generate-p2":
        return generate_p2_main(rest)
    if cmd == "demo":
        from megatron_po.demo import main as demo_main

        return demo_main(rest)
    if cmd == "sweep":
        from megatron_po.sweep import main as sweep_main

        return sweep_main(rest)
    print(f"unknown command {cmd!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
