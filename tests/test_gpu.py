"""GPU-only checks (NCCL backend, Transformer-Engine spec). CI has no GPU: these skip there.

Every launch passes gpu=True: run_torchrun hides the devices from CPU tests otherwise.
"""

import json

import pytest
import torch

from conftest import REPO, run_python, run_torchrun
from megatron_po.models.specs import have_te

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (NCCL / TE path)")


@pytest.mark.pure
def test_cpu_backend_refuses_to_run_on_gpu():
    """Unrequested, the CPU backend refuses a CUDA machine, even in a pytest process where an in-process CPU
    test (`groups` fixture, backend="gloo") has already switched it on; `auto` means NCCL here."""
    from megatron_po.config import ParallelConfig
    from megatron_po.parallel.cpu import enable_cpu_backend
    from megatron_po.parallel.groups import resolve_backend

    with pytest.raises(RuntimeError, match="CUDA"):
        enable_cpu_backend()
    assert resolve_backend(ParallelConfig()) == "nccl"


@pytest.mark.pure
def test_explicit_gloo_runs_on_the_cpu_of_a_gpu_machine():
    """parallel.backend=gloo is a request for the CPU: it runs, in a process that sees no CUDA from then on (so
    model.spec=auto takes the local spec); NCCL cannot start in that process any more."""
    code = """
import torch
from megatron_po.config import ModelConfig, ParallelConfig
from megatron_po.models.specs import use_te_spec
from megatron_po.parallel.groups import init_parallel, init_process_group, resolve_backend, teardown
assert torch.cuda.is_available()
groups = init_parallel(ParallelConfig(backend="gloo"), seed=0)
assert groups.device.type == "cpu" and not torch.cuda.is_available() and not use_te_spec(ModelConfig())
assert resolve_backend(ParallelConfig()) == "nccl"
teardown()
try:
    init_process_group(ParallelConfig(backend="nccl"))
except RuntimeError as e:
    assert "already runs on the CPU" in str(e), e
else:
    raise AssertionError("NCCL started in a CPU process")
print("explicit gloo: ok")
"""
    assert "explicit gloo: ok" in run_python(["-c", code])


@pytest.mark.e2e
def test_converter_runs_on_a_gpu_machine(tmp_path):
    """Step 1 of the README's 8B recipe (tools/convert_hf.py hf-to-megatron) on a GPU machine: the converter's
    own 1-rank gloo group is an explicit CPU request."""
    pytest.importorskip("transformers")
    import hf_qwen2_5_vl_fixture as fx

    hf = fx.make_hf_dir(tmp_path / "hf")
    out = run_python([str(REPO / "tools" / "convert_hf.py"), "hf-to-megatron", str(hf), str(tmp_path / "ckpt")])
    assert f"wrote {tmp_path / 'ckpt'}" in out and (tmp_path / "ckpt" / "conversion.json").is_file()


@pytest.mark.multirank
def test_flat_row_rotary_on_te():
    """FlatRowRotarySelfAttention (TE spec, CP = 1) on a packed THD row of 12,288 tokens in 48 sequences with
    restarting M-RoPE positions: the output and input gradient of megatron's THD path (bf16, TE's attention), and
    at least 2·(runs + 2) fewer synchronising CUDA calls per forward (megatron's .tolist / bool / .item per run,
    for q and for k). Prints the timings."""
    pytest.importorskip("transformer_engine")
    out = run_torchrun(["tests/dist/gpu_flat_rotary.py"], nproc=1, gpu=True)
    line = next(l for l in out.splitlines() if l.startswith("FLAT_ROTARY "))
    r = json.loads(line.removeprefix("FLAT_ROTARY "))
    print(line)
    assert r["forward_max_abs_diff"] <= 1e-2 * r["forward_max_abs"], r
    assert r["grad_max_abs_diff"] <= 2e-2 * r["grad_max_abs"], r
    assert r["syncs_per_forward"]["megatron"] - r["syncs_per_forward"]["ours"] >= 2 * (r["runs"] + 2), r


@pytest.mark.e2e
@pytest.mark.parametrize("spec", ["local", "auto"])
def test_nccl_preference_steps(tmp_path, spec):
    nproc = min(2, torch.cuda.device_count())
    run_torchrun(["-m", "megatron_po.train", f"output_dir={tmp_path}", f"parallel.tp={nproc}",
                  f"parallel.sp={'true' if nproc > 1 else 'false'}", "objective.name=dpo", "train.train_steps=3",
                  f"model.spec={spec}", "train.progress_bar=false", "data.num_train=64"], nproc=nproc, gpu=True)
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert abs(rows[0]["loss"] - 0.6931472) < 1e-5
    assert all(r["grad_norm"] > 0 for r in rows)


@pytest.mark.e2e
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="pipeline parallelism needs 2 GPUs")
@pytest.mark.parametrize("spec", ["local", "auto"])
def test_nccl_pipeline_steps_live_and_cached(tmp_path, spec):
    """PP=2 under NCCL (TE spec when installed): step-0 loss ln 2, and the reference cache precomputed at PP=2
    gives the live reference's losses."""
    common = ["parallel.pp=2", "parallel.tp=1", "objective.name=dpo", "train.train_steps=3", f"model.spec={spec}",
              "train.progress_bar=false", "data.num_train=64", "model.num_layers=4", "checkpoint.save=false",
              f"reference.cache_path={tmp_path / 'cache'}"]
    live, cached = tmp_path / "live", tmp_path / "cached"
    run_torchrun(["-m", "megatron_po.train", f"output_dir={live}", *common], nproc=2, gpu=True)
    run_torchrun(["-m", "megatron_po.cli", "precompute-ref", f"output_dir={cached}", *common], nproc=2,
                 gpu=True)
    run_torchrun(["-m", "megatron_po.train", f"output_dir={cached}", "reference.source=cache", *common], nproc=2,
                 gpu=True)
    a, b = ([json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()] for d in (live, cached))
    assert abs(a[0]["loss"] - 0.6931472) < 1e-5 and all(r["grad_norm"] > 0 for r in a)
    for ra, rb in zip(a, b):
        assert abs(ra["loss"] - rb["loss"]) < 1e-5 * max(1.0, abs(ra["loss"])), (ra, rb)


@pytest.mark.e2e
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="context parallelism needs 2 GPUs")
def test_context_parallel_steps_equal_cp1(tmp_path):
    """CP=2 (TE attention over the two ranks, sums reduced over CP) trains like CP=1 on the same global batch:
    the same losses and gradient norms (to bf16 rounding), with the live reference and ASPO's sentence sums."""
    pytest.importorskip("transformer_engine")
    # bf16: TE's context-parallel attention runs in its fused kernels, which take no fp32
    common = ["parallel.tp=1", "objective.name=aspo", "train.train_steps=3", "model.spec=te", "model.params_dtype=bf16",
              "train.progress_bar=false", "data.num_train=64", "checkpoint.save=false",
              "train.global_batch_size=8", "train.micro_batch_size=2"]
    runs = {}
    for cp in (1, 2):
        out = tmp_path / f"cp{cp}"
        # cp=1 on 2 GPUs is DP=2 with 2 micro-batches per rank; cp=2 is DP=1 with 4: the same global batch
        run_torchrun(["-m", "megatron_po.train", f"output_dir={out}", f"parallel.cp={cp}", *common], nproc=2,
                     gpu=True)
        runs[cp] = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(runs[1], runs[2]):
        for key in ("loss", "grad_norm"):
            assert abs(a[key] - b[key]) < 2e-2 * max(1.0, abs(a[key])), (key, a, b)  # bf16 rounding


@pytest.mark.e2e
def test_packed_thd_steps_equal_unpacked_on_te(tmp_path):
    """Packed micro-batches on the TE spec (one THD row: flat-row rotary, TE's THD attention) train like the same
    pairs unpacked: the same losses and gradient norms to bf16 rounding."""
    pytest.importorskip("transformer_engine")
    common = ["parallel.tp=1", "objective.name=dpo", "train.train_steps=3", "model.spec=te", "model.params_dtype=bf16",
              "train.progress_bar=false", "data.num_train=64", "checkpoint.save=false", "train.global_batch_size=8",
              "train.micro_batch_size=4"]
    runs = {}
    for packing in ("false", "true"):
        out = tmp_path / f"packing_{packing}"
        run_torchrun(["-m", "megatron_po.train", f"output_dir={out}", f"data.packing={packing}", *common], nproc=1,
                     gpu=True)
        runs[packing] = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert abs(runs["true"][0]["loss"] - 0.6931472) < 1e-3
    for a, b in zip(runs["false"], runs["true"]):
        for key in ("loss", "grad_norm"):
            assert abs(a[key] - b[key]) < 2e-2 * max(1.0, abs(a[key])), (key, a, b)  # bf16 rounding


@pytest.mark.e2e
def test_distributed_optimizer_checkpoint_resumes_on_gpu(tmp_path):
    """The distributed optimizer's checkpoint (megatron's default fully_sharded_model_space format, no gloo
    exchange) saves and resumes under NCCL, where parallel/groups.py creates none of megatron's gloo groups:
    2 steps + exit + relaunch take the 4 straight steps. (On the CPU its checkpoints are refused: train/loop.py.)"""
    nproc = min(2, torch.cuda.device_count())
    common = ["-m", "megatron_po.train", "parallel.tp=1", "parallel.use_distributed_optimizer=true",
              "objective.name=dpo", "train.train_steps=4", "train.progress_bar=false", "data.num_train=64",
              "optim.adam_eps=1e-3", "model.spec=local"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_torchrun([*common, f"output_dir={straight}"], nproc=nproc, gpu=True)
    run_torchrun([*common, f"output_dir={resumed}", "train.exit_interval=2"], nproc=nproc, gpu=True)
    assert "resumed from" in run_torchrun([*common, f"output_dir={resumed}"], nproc=nproc, gpu=True)
    a, b = ([json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()] for d in (straight, resumed))
    assert [m["step"] for m in a] == [m["step"] for m in b] and len(a) >= 4
    for ma, mb in zip(a, b):
        for key in ("loss", "grad_norm"):
            assert abs(ma[key] - mb[key]) <= 1e-6 * max(1.0, abs(ma[key])), (key, ma, mb)


@pytest.mark.multirank
def test_lora_adapters_on_the_te_spec():
    """Each adapter adds (α/r)·B A n(x) on the GPU's spec: with Transformer-Engine, n is the norm TE fuses into qkv
    and fc1 (the adapter's hook sees the un-normed input and applies it itself: models/lora._te_normalize)."""
    out = run_torchrun(["tests/dist/lora_delta_worker.py", "te" if have_te() else "local"], nproc=1, gpu=True)
    line = next(l for l in out.splitlines() if l.startswith("LORA_DELTA "))
    r = json.loads(line.removeprefix("LORA_DELTA "))
    print(line)
    assert r["worst_rel"] < 1e-4 and r["device"].startswith("cuda"), r


@pytest.mark.e2e
@pytest.mark.parametrize("spec", ["local", "auto"])
def test_lora_preference_steps(tmp_path, spec):
    """LoRA DPO in bf16 under NCCL (TE spec when installed), TP=2 + SP where two GPUs exist: the adapters-off
    reference makes step 1's loss ln 2, the adapters train, the checkpoint holds them alone."""
    nproc = min(2, torch.cuda.device_count())
    run_torchrun(["-m", "megatron_po.train", f"output_dir={tmp_path}", f"parallel.tp={nproc}",
                  f"parallel.sp={'true' if nproc > 1 else 'false'}", "objective.name=dpo", "train.train_steps=3",
                  f"model.spec={spec}", "model.params_dtype=bf16", "model.lora.rank=8", "optim.lr=1e-3",
                  "train.progress_bar=false", "data.num_train=64"], nproc=nproc, gpu=True)
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] == pytest.approx(0.6931472, abs=1e-6) and rows[0]["reference/step0_max_gap"] == 0.0
    assert all(r["grad_norm"] > 0 for r in rows) and rows[-1]["loss"] != rows[0]["loss"]

