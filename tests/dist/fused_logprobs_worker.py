"""The fused response-only log-probs at TP=2 (vocabulary split over two ranks, the padded tail on rank 1), with
and without sequence parallelism, against one process's full-vocabulary log_softmax (tests/test_fused_logprobs.py).

    torchrun --nproc_per_node 2 fused_logprobs_worker.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_po.logprobs import IGNORE_INDEX, response_token_logps


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank, tp = dist.get_rank(), dist.get_world_size()
    s, r, h, v, vocab = 12, 3, 8, 64, 57  # rows of the weight beyond `vocab` are padding (all on rank 1)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(s, r, h, generator=g)
    weight = torch.randn(v, h, generator=g)
    labels = torch.full((r, s), IGNORE_INDEX)
    labels[0, 2:11] = torch.randint(0, vocab, (9,), generator=g)  # crosses the SP shard boundary at s = 6
    labels[1, 7:9] = torch.randint(0, vocab, (2,), generator=g)   # second shard only
    labels[2, 0:3] = torch.randint(0, vocab, (3,), generator=g)   # first shard only
    upstream = torch.randn(r, s, generator=g)

    full_h, full_w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logits = torch.einsum("srh,vh->rsv", full_h, full_w)[..., :vocab]
    theirs = torch.log_softmax(logits, -1).gather(-1, labels.clamp_min(0)[..., None])[..., 0] * (labels >= 0)
    (theirs * upstream).sum().backward()

    report = {}
    shard_v = v // tp
    for name, sp in (("tp2", False), ("tp2_sp", True)):
        my_h = (hidden.chunk(tp)[rank] if sp else hidden).clone().requires_grad_()
        my_w = weight[rank * shard_v:(rank + 1) * shard_v].clone().requires_grad_()
        ours = response_token_logps(my_h, my_w, labels, dist.group.WORLD, sp, vocab, chunk_tokens=4)
        (ours * upstream).sum().backward()
        want_h = full_h.grad.chunk(tp)[rank] if sp else full_h.grad
        want_w = full_w.grad[rank * shard_v:(rank + 1) * shard_v]

        def rel(a, b):
            return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))

        errs = torch.tensor([rel(ours.detach(), theirs.detach()), rel(my_h.grad, want_h), rel(my_w.grad, want_w)])
        dist.all_reduce(errs, op=dist.ReduceOp.MAX)
        report[name] = dict(zip(("logps", "grad_hidden", "grad_weight"), errs.tolist()))
    if rank == 0:
        (out / "fused.json").write_text(json.dumps(report))
        print(report)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
