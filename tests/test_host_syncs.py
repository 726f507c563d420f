"""tests/host_syncs.py catches each host-synchronising call on the CPU, and only those."""

import pytest
import torch

from host_syncs import assert_no_host_syncs, count_host_syncs

pytestmark = pytest.mark.pure

x = torch.arange(6.0).reshape(2, 3)
mask = x > 2
idx = torch.tensor([0, 2])

SYNCING = {
    "item": lambda: x[0, 0].item(),
    "tolist": lambda: x.tolist(),
    "__bool__": lambda: bool(mask.any()),
    "__bool__ (if)": lambda: 1 if (x > 0).all() else 0,
    "__int__": lambda: int(x.sum()),
    "__float__": lambda: float(x.sum()),
    "__index__": lambda: [0, 1, 2][torch.tensor(1)],
    "nonzero": lambda: mask.nonzero(),
    "torch.nonzero": lambda: torch.nonzero(mask),
    "where(cond)": lambda: torch.where(mask),
    "argwhere": lambda: torch.argwhere(mask),
    "__getitem__[bool]": lambda: x[mask],
    "__getitem__[bool, tuple]": lambda: x[:, mask[0]],
    "__setitem__[bool]": lambda: x.clone().__setitem__(mask, 0.0),
    "masked_select": lambda: x.masked_select(mask),
    "unique": lambda: torch.unique(idx),
    "bincount": lambda: torch.bincount(idx),
    "repeat_interleave": lambda: torch.repeat_interleave(idx, idx),
    "equal": lambda: torch.equal(x, x),
    "allclose": lambda: torch.allclose(x, x),
    "cpu": lambda: x.cpu(),
    "numpy": lambda: x.numpy(),
    "masked_scatter of a source with grad": lambda: x.masked_scatter(mask, torch.zeros(6, requires_grad=True)),
}

NOT_SYNCING = {
    "long index": lambda: x.reshape(-1)[idx],
    "long index assignment": lambda: x.clone().reshape(-1).__setitem__(idx, 1.0),
    "index_select": lambda: x.index_select(1, idx),
    "index_copy": lambda: torch.zeros(6).index_copy(0, idx, torch.ones(2)),
    "masked_fill": lambda: x.masked_fill(mask, 0.0),
    "masked_scatter": lambda: x.masked_scatter(mask, torch.zeros(6)),  # a prefix sum on CUDA, no host count
    "masked_scatter, no grad": lambda: torch.no_grad()(x.masked_scatter)(mask, torch.zeros(6, requires_grad=True)),
    "where(c, a, b)": lambda: torch.where(mask, x, 0.0),
    "cumsum": lambda: mask.cumsum(-1),
    "slices and shapes": lambda: (x[:, 1:], x.shape[0], len(x), x[0]),
    "repeat_interleave(output_size)": lambda: torch.repeat_interleave(idx, idx, output_size=2),
    "_assert_async": lambda: torch._assert_async(x.sum() > 0, "never"),
}


@pytest.mark.parametrize("name", sorted(SYNCING))
def test_catches(name):
    with count_host_syncs() as syncs:
        SYNCING[name]()
    assert len(syncs) >= 1, name
    assert "test_host_syncs.py" in syncs[0].where  # the call site is the caller's line, not torch's


@pytest.mark.parametrize("name", sorted(NOT_SYNCING))
def test_passes(name):
    with assert_no_host_syncs(name):
        NOT_SYNCING[name]()


def test_assert_lists_the_calls():
    with pytest.raises(AssertionError, match=r"2 host sync\(s\):\n  item at .*\n  nonzero at"):
        with assert_no_host_syncs():
            x.sum().item()
            mask.nonzero()


class _Twice(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t):
        return t * 2

    @staticmethod
    def backward(ctx, grad):
        grad.sum().item()  # a sync in a custom backward: autograd runs it with the mode stack cleared
        return grad * 2


def test_catches_custom_backward():
    t = torch.ones(3, requires_grad=True)
    with count_host_syncs() as syncs:
        _Twice.apply(t).sum().backward()
    assert [s.op for s in syncs] == ["item"] and "in backward" in syncs[0].where
    assert torch.autograd.function.BackwardCFunction.apply.__name__ == "apply"  # restored


# ---- the per-micro-batch path: layout on the host, then forward and log-probs without a host sync -----------------


@pytest.fixture(scope="module")
def tiny(groups, tmp_path_factory):
    """The embedded task's dataset and a tiny_vlm (local spec) with packing on."""
    from megatron_po.config import load_config
    from megatron_po.data.tokenizer import Tokenizer
    from megatron_po.families import family_spec
    from megatron_po.models.specs import padded_vocab_size
    from megatron_po.models.tiny_vlm.model import build_vlm
    from megatron_po.objectives import build_objective
    from megatron_po.train.data import build_dataset, prepare_data

    out = tmp_path_factory.mktemp("host_syncs")
    cfg = load_config(None, [f"output_dir={out}", "data.num_train=8", "data.num_eval=2", "data.packing=true"])
    family = family_spec(cfg.model.family)
    train_path, tok_path = prepare_data(cfg, build_objective("aspo", {}), family)
    tokenizer = Tokenizer(tok_path)
    ds = build_dataset(cfg, family, train_path, tokenizer)
    model = build_vlm(cfg.model, cfg.parallel, padded_vocab_size(tokenizer.vocab_size, 1), groups, seed=1)
    return cfg, ds, model


def _packed_host_batch(cfg, ds):
    from megatron_po.data.packing import pack_rows
    from megatron_po.train.batch import MicroBatch

    batch = pack_rows(ds.collator([ds[i] for i in range(4)]), cfg.model.max_seq_length, 1, ds.collator.tokenizer.pad_id)
    return MicroBatch.from_collated(batch)


def test_thd_layout_comes_from_the_host(groups, tiny):
    """The THD runs and supervised positions are computed on the host with the rows (what `thd_params` and the
    log-prob stage would otherwise read off the device), moved with them, and equal to a computation on the moved
    tensors."""
    from megatron_po.logprobs import ResponseIndex
    from megatron_po.train.batch import ThdRuns
    from megatron_po.train.rows import thd_params

    cfg, ds, _ = tiny
    host = _packed_host_batch(cfg, ds).as_thd()
    with assert_no_host_syncs("MicroBatch.to + thd_params"):
        mb = host.to(groups.device)
        params = thd_params(mb.rows)
    runs = ThdRuns.of(mb.rows.sequence_ids)
    assert torch.equal(params.cu_seqlens_q, runs.cu_seqlens) and params.max_seqlen_kv == runs.max_seqlen
    assert params.cu_seqlens_q.dtype == torch.int32 and int(params.cu_seqlens_q[-1]) == mb.rows.shape[1]
    want = ResponseIndex.of(mb.rows.labels)
    assert torch.equal(mb.rows.response.flat, want.flat) and mb.rows.response.positions == want.positions


@pytest.mark.parametrize("packed", [False, True])
def test_make_micro_batch_reads_nothing_after_the_move(groups, tiny, packed):
    """Every value the host needs is read before the micro-batch moves: moved to the meta device (tensors without
    values, where any read raises), it still comes out whole."""
    import dataclasses

    from megatron_po.train.data import make_micro_batch

    cfg, ds, _ = tiny
    meta = dataclasses.replace(groups, device=torch.device("meta"))
    mb = make_micro_batch(ds, [0, 1, 2], meta, packing=cfg if packed else None)
    assert mb.rows.tokens.is_meta and mb.rows.response.flat.is_meta and mb.images.is_meta
    assert len(mb.rows.response.positions) == mb.rows.response.flat.numel() > 0
    assert (mb.rows.thd is not None) == packed and mb.num_segment_slots >= 1


@pytest.mark.parametrize("trained_tower", [False, True])
def test_packed_forward_and_logps_make_no_host_syncs(groups, tiny, trained_tower):
    """A packed micro-batch in the one-row THD layout on the local spec (its block-diagonal mask; TE's THD
    attention needs a GPU): image splice and decoder forward (`VLMBase.decode`), the fused response log-probs,
    the per-sequence and per-sentence sums, and the backward through all of it (into the image embeddings too
    when the tower trains)."""
    from megatron_po.logprobs import response_token_logps
    from megatron_po.train.rows import forward_rows, token_logps
    from megatron_po.train.step import Tower, image_embeds, token_logps_sums

    cfg, ds, model = tiny
    mb = _packed_host_batch(cfg, ds).as_thd().to(groups.device)
    embeds = image_embeds(model, mb, Tower("policy", True))  # the frozen tower's pass: once per step, not here
    if trained_tower:
        embeds = embeds.detach().requires_grad_()
    with assert_no_host_syncs("packed forward"):
        out = forward_rows(model, mb.rows, embeds, mb.images)
        sums = token_logps_sums(token_logps(model, out, mb.rows, None), mb.rows, mb)
        (sums.seq.sum() + sums.segments.sum()).backward()
    # the same sums as from bare labels (the stage then finds the supervised positions itself)
    lm = model.language_model
    with torch.no_grad():
        hidden = forward_rows(model, mb.rows, embeds, mb.images)
        bare = response_token_logps(hidden, lm.output_weight(), mb.rows.labels, None, model.sequence_parallel,
                                    None, lm.logprob_chunk_tokens)
        again = token_logps_sums(bare, mb.rows, mb)
    assert torch.equal(sums.seq.detach(), again.seq)


def test_decode_still_refuses_a_slot_mismatch(groups, tiny):
    from megatron_po.train.rows import causal_mask, slot_embeds
    from megatron_po.train.step import Tower, image_embeds

    cfg, ds, model = tiny
    mb = _packed_host_batch(cfg, ds).to(groups.device)
    rows = mb.rows
    flat = slot_embeds(image_embeds(model, mb, Tower("policy", True)), rows.row_images, order=rows.image_order)
    mask = causal_mask(rows.shape[1], rows.tokens.device)
    with pytest.raises(ValueError, match=f"has {flat.shape[0] - 1} embeddings for {flat.shape[0]} image slots"):
        model(rows.tokens, rows.position_ids, mask, flat[1:], rows.image_token_mask)


def test_trained_image_embeddings_splice_like_masked_scatter():
    """`splice_image_embeds` for embeddings with a gradient (a trained tower): masked_scatter's values and
    gradients exactly, without its backward's masked_select."""
    from megatron_po.models.base import splice_image_embeds

    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[0, 2:4] = mask[1, 0] = mask[1, 5:7] = True
    emb = torch.randn(2, 7, 3, generator=g).requires_grad_()
    images = torch.randn(5, 3, generator=g).requires_grad_()
    upstream = torch.randn(2, 7, 3, generator=g)
    with assert_no_host_syncs("splice"):
        ours = splice_image_embeds(emb, mask, images)
        mine = torch.autograd.grad((ours * upstream).sum(), (emb, images))
    theirs = emb.masked_scatter(mask.unsqueeze(-1).expand_as(emb), images)
    want = torch.autograd.grad((theirs * upstream).sum(), (emb, images))
    assert torch.equal(ours, theirs) and all(torch.equal(a, b) for a, b in zip(mine, want))
