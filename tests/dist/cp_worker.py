"""Context parallelism's reductions on CPU: the two gloo ranks form one CP group, each holding its half (chunks r and
3 - r of 4) of every row's tokens, as a CP=2 run on GPUs does.

Attention across the CP ranks needs TE (GPU), so the per-token log-probs come from one full-row forward and each
rank keeps its positions of them as a leaf tensor of its own: what TE's CP attention would hand each rank. Checked
against the same computation on whole rows, for objectives whose per-pair quantities use whole-sequence sums (DPO),
per-sentence sums (ASPO) and batch statistics (ACPO's α̂):
  - the CP-reduced sums, the per-pair losses, α̂ and the loss equal the whole-row ones;
  - each rank's gradient w.r.t. its tokens' log-probs equals the whole-row gradient at those positions;
  - the loss normaliser counted once per CP group; the split is megatron's (get_batch_on_this_cp_rank);
  - the decoder's input on each rank (embeddings with image features spliced in) equals the whole rows' at its
    positions: the image slots of a rank's positions get their own images' features.

    torchrun --nproc_per_node 2 tests/dist/cp_worker.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core.utils import get_batch_on_this_cp_rank

from megatron_po.config import ParallelConfig, config_from_dict
from megatron_po.data.tokenizer import Tokenizer
from megatron_po.families import family_spec
from megatron_po.models.tiny_vlm.model import build_vlm
from megatron_po.models.specs import padded_vocab_size
from megatron_po.objectives import build_objective
from megatron_po.objectives.common import ObjectiveContext
from megatron_po.parallel.context import counts_on_one_cp_rank, cp_positions
from megatron_po.parallel.groups import destroy_parallel, init_parallel, init_process_group, teardown
from megatron_po.train.batch import MicroBatch, SeqLogps
from megatron_po.train.data import build_dataset, pad_to_multiple_of, prepare_data
from megatron_po.kinds import kind_of
from megatron_po.train.rows import forward_rows, token_logps
from megatron_po.train.step import Tower, image_embeds, sum_over_cp, token_logps_sums

CP = 2


class StopForward(Exception):
    pass


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def loss_of(objective, mb: MicroBatch, policy: SeqLogps, ref: SeqLogps):
    per_pair, samples = objective.loss(kind_of(objective).loss_inputs(mb, policy, ref), group=None,
                                       ctx=ObjectiveContext())
    return per_pair, samples


def main(out_dir: str) -> None:
    out = Path(out_dir)
    init_process_group(ParallelConfig())
    rank = dist.get_rank()
    cp_group = dist.group.WORLD  # the two ranks as one CP group
    report = {}
    for name in ("dpo", "aspo", "acpo"):
        cfg = config_from_dict({"output_dir": str(out), "data": {"num_train": 16, "num_eval": 2},
                                "parallel": {"cp": CP}, "objective": {"name": name}})
        objective = build_objective(name, {})
        family = family_spec(cfg.model.family)
        train_path, tok_path = prepare_data(cfg, objective, family)
        tokenizer = Tokenizer(tok_path)
        groups = init_parallel(ParallelConfig(), seed=3)  # model layout: one rank (CP itself needs TE attention)
        ds = build_dataset(cfg, family, train_path, tokenizer)
        assert pad_to_multiple_of(cfg) == 2 * CP
        mb = MicroBatch.from_collated(ds.collator([ds[i] for i in range(4)])).to(groups.device)
        vocab = padded_vocab_size(tokenizer.vocab_size, 1)
        model = build_vlm(cfg.model, ParallelConfig(), vocab, groups, seed=7)
        reference = build_vlm(cfg.model, ParallelConfig(), vocab, groups, seed=8)
        tower = Tower("policy", frozen=True)
        with torch.no_grad():
            ref_full = token_logps_sums(token_logps(reference, forward_rows(reference, mb.rows, image_embeds(
                reference, mb, Tower("ref", frozen=True)), mb.images), mb.rows, None), mb.rows, mb)
            full_tok = token_logps(model, forward_rows(model, mb.rows, image_embeds(model, mb, tower), mb.images),
                                   mb.rows, None)

        # whole rows, one process
        whole = full_tok.clone().requires_grad_(True)
        per_pair, samples = loss_of(objective, mb, token_logps_sums(whole, mb.rows, mb), ref_full)
        per_pair.sum().backward()

        # CP: this rank's positions as a leaf of its own, sums reduced over the CP group
        shard = mb.cp_shard(CP, rank)
        pos = cp_positions(mb.rows.shape[1], CP, rank)
        mine = full_tok[:, pos].clone().requires_grad_(True)
        local = token_logps_sums(mine, shard.rows, shard)
        policy = sum_over_cp(local, cp_group)  # the trainer's own reduction (train/step.sequence_logps)
        cp_pair, cp_samples = loss_of(objective, shard, policy, ref_full)
        cp_pair.sum().backward()

        count = torch.tensor(counts_on_one_cp_rank(mb.num_samples, cp_group))
        dist.all_reduce(count)
        grads = [torch.empty_like(mine.grad) for _ in range(CP)]
        dist.all_gather(grads, mine.grad)
        assembled = torch.empty_like(whole.grad)
        for r, g in enumerate(grads):
            assembled[:, cp_positions(mb.rows.shape[1], CP, r)] = g

        # decoder input at this rank's positions: embeddings with the image features of its own slots
        captured = []

        def capture(_module, _args, kwargs):
            captured.append(kwargs["hidden_states"].detach())
            raise StopForward  # the shard's attention would need its CP peers (TE): stop at the decoder's input

        hook = model.language_model.decoder.register_forward_pre_hook(capture, with_kwargs=True)
        with torch.no_grad():
            embeds = image_embeds(model, mb, tower)
            for rows in (mb.rows, shard.rows):
                try:
                    forward_rows(model, rows, embeds, mb.images)
                except StopForward:
                    pass
        hook.remove()
        split = get_batch_on_this_cp_rank({"tokens": mb.rows.tokens, "labels": mb.rows.labels}, cp_group)
        entry = {
            "megatron_split": bool(torch.equal(split["tokens"], shard.rows.tokens)
                                   and torch.equal(split["labels"], shard.rows.labels)),
            "seq_rel": rel(policy.seq, token_logps_sums(full_tok, mb.rows, mb).seq),
            "loss_rel": rel(cp_pair, per_pair),
            "grad_rel": rel(assembled, whole.grad),
            "count": int(count), "num_samples": mb.num_samples,
            "decoder_input_rel": rel(captured[1], captured[0][pos]),
            "image_slots_here": int(shard.rows.image_token_mask.sum()),
            "image_slots_total": int(mb.rows.image_token_mask.sum()),
        }
        if local.segments is not None:
            entry["segments_rel"] = rel(policy.segments, token_logps_sums(full_tok, mb.rows, mb).segments)
        if "acpo/alpha_hat" in samples:
            entry["alpha_rel"] = rel(cp_samples["acpo/alpha_hat"], samples["acpo/alpha_hat"])
        shares = [None] * CP
        dist.all_gather_object(shares, entry)
        report[name] = shares
        destroy_parallel()
    if rank == 0:
        (out / "cp.json").write_text(json.dumps(report, indent=1))
    teardown()


if __name__ == "__main__":
    main(sys.argv[1])
