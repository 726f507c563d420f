"""The CPU backend on a machine with CUDA: an explicit `parallel.backend=gloo` (the converter's own process, the
in-process CPU tests) runs on the CPU; `backend=auto` and an unrequested `enable_cpu_backend()` never do.

A CPU machine plays the GPU machine: tests/dist/fake_cuda.py makes `torch.cuda.is_available()` answer True before
megatron_po is imported (what a GPU host says), then runs the real entry point. tests/test_gpu.py checks the same
on a real GPU.
"""

from __future__ import annotations

import subprocess

import pytest

import conftest
from conftest import REPO, run_python

FAKE_CUDA = str(REPO / "tests" / "dist" / "fake_cuda.py")


@pytest.mark.e2e
def test_converter_runs_where_cuda_is_present(tmp_path):
    """tools/convert_hf.py hf-to-megatron (step 1 of the 8B recipe) on a "CUDA machine": its 1-rank gloo group is
    an explicit CPU request. It used to stop at `enable_cpu_backend() called on a machine with CUDA`."""
    pytest.importorskip("transformers")
    import hf_qwen2_5_vl_fixture as fx

    hf = fx.make_hf_dir(tmp_path / "hf")
    out = run_python([FAKE_CUDA, str(REPO / "tools" / "convert_hf.py"), "hf-to-megatron", str(hf),
                      str(tmp_path / "ckpt")])
    assert out.count("guard: refused") == 2, out  # before and after the CPU run: auto still means NCCL
    assert "cpu process: CUDA hidden" in out, out
    assert f"wrote {tmp_path / 'ckpt'}" in out, out
    assert (tmp_path / "ckpt" / "conversion.json").is_file() and (tmp_path / "ckpt" / "hf" / "config.json").is_file()


@pytest.mark.pure
def test_in_process_gloo_tests_run_where_cuda_is_present():
    """The `groups` fixture (backend="gloo") and a model built in-process, under pytest on a "CUDA machine"."""
    out = run_python([FAKE_CUDA, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:warnings",
                      "tests/test_flat_rotary.py", "-k", "gradients"])
    assert out.count("guard: refused") == 2 and "1 passed" in out and "cpu process: CUDA hidden" in out, out


@pytest.mark.pure
@pytest.mark.parametrize("gpu", [False, True])
def test_run_torchrun_hides_cuda_unless_asked(gpu, monkeypatch):
    """CPU launches keep their ranks on the CPU on a GPU host (CUDA_VISIBLE_DEVICES=""); GPU tests ask for the
    devices with gpu=True and inherit the caller's CUDA_VISIBLE_DEVICES."""
    seen = {}

    def fake_run(cmd, env, **kwargs):
        seen.update(cmd=cmd, env=env)
        return subprocess.CompletedProcess(cmd, 0, stdout="", stderr="")

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    monkeypatch.setattr(conftest.subprocess, "run", fake_run)
    conftest.run_torchrun(["-m", "megatron_po.train"], nproc=2, gpu=gpu)
    assert seen["env"]["CUDA_VISIBLE_DEVICES"] == ("3,5" if gpu else "")
    assert "--nproc_per_node=2" in seen["cmd"]
