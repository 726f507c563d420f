"""The fused response-only log-probs at TP=2 (vocabulary split over two ranks, the padded tail on rank 1), with
and without sequence parallelism, against one process's full-vocabulary log_softmax (tests/test_fused_logprobs.py);
and what the stage costs in communication and host synchronisation: one collective in forward and one in backward
per call (plus the gather of the response positions under SP), no host sync at all with the rows' `ResponseIndex`.
Case "tp2_rank_all_padding": rank 1's whole vocabulary slice is padding.

    torchrun --nproc_per_node 2 fused_logprobs_worker.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: host_syncs

from host_syncs import count_host_syncs  # noqa: E402
from megatron_po.logprobs import IGNORE_INDEX, ResponseIndex, response_token_logps  # noqa: E402

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "reduce_scatter_tensor")


class CountCollectives:
    """Calls of torch.distributed's collectives while active (the code under test looks them up on `dist`)."""

    def __enter__(self):
        self.count = 0
        self.saved = {n: getattr(dist, n) for n in COLLECTIVES if hasattr(dist, n)}
        for n, fn in self.saved.items():
            setattr(dist, n, self._counted(fn))
        return self

    def _counted(self, fn):
        def call(*args, **kwargs):
            self.count += 1
            return fn(*args, **kwargs)
        return call

    def __exit__(self, *exc):
        for n, fn in self.saved.items():
            setattr(dist, n, fn)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def case(rank: int, tp: int, sp: bool, vocab: int) -> dict[str, float]:
    s, r, h, v = 12, 3, 8, 64  # rows of the weight beyond `vocab` are padding (all on rank 1)
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

    shard_v = v // tp
    my_h = (hidden.chunk(tp)[rank] if sp else hidden).clone().requires_grad_()
    my_w = weight[rank * shard_v:(rank + 1) * shard_v].clone().requires_grad_()
    index = ResponseIndex.of(labels)  # on the host, as train/batch.Rows computes it when a micro-batch is made
    with count_host_syncs() as syncs:
        with CountCollectives() as forward:
            ours = response_token_logps(my_h, my_w, labels, dist.group.WORLD, sp, vocab, chunk_tokens=4,
                                        index=index)
        with CountCollectives() as backward:
            (ours * upstream).sum().backward()
    want_h = full_h.grad.chunk(tp)[rank] if sp else full_h.grad
    want_w = full_w.grad[rank * shard_v:(rank + 1) * shard_v]
    errs = torch.tensor([rel(ours.detach(), theirs.detach()), rel(my_h.grad, want_h), rel(my_w.grad, want_w),
                         len(syncs), forward.count, backward.count], dtype=torch.float64)
    dist.all_reduce(errs, op=dist.ReduceOp.MAX)
    if syncs:
        print(f"rank {rank}: host syncs {[str(x) for x in syncs]}", flush=True)
    return dict(zip(("logps", "grad_hidden", "grad_weight", "host_syncs", "forward_collectives",
                     "backward_collectives"), errs.tolist()))


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank, tp = dist.get_rank(), dist.get_world_size()
    report = {"tp2": case(rank, tp, False, 57), "tp2_sp": case(rank, tp, True, 57),
              "tp2_rank_all_padding": case(rank, tp, False, 30)}
    if rank == 0:
        (out / "fused.json").write_text(json.dumps(report))
        print(report)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
