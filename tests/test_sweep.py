"""`megatron-po sweep`: the YAML's grid and ids, screening by the memory plan (the H100 sweeps dry-run here),
resuming after an interrupt or a failure (with an injected launcher), the report on synthetic results, and one
real two-point CPU sweep through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import REPO, subprocess_env
from megatron_po.sweep.collect import error_line, summarize_steps
from megatron_po.sweep.run import Launch, run_sweep
from megatron_po.sweep.spec import SweepError, expand_points, load_sweep

TINY = """
name: tiny
device: cpu
device_memory_gb: 4
warmup_steps: 1
timed_steps: 2
overrides: {model.family: tiny_vlm, model.hidden_size: 64, model.num_layers: 2, model.max_seq_length: 128,
            model.spec: local, objective.name: dpo, train.global_batch_size: 4, train.micro_batch_size: 2,
            data.num_workers: 0}
data: {prompt_tokens: 8, response_median: 16, response_sigma: 0.3, pairs: 32, vocab_size: 256}
"""


def write_spec(tmp_path: Path, body: str, name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


GRID = TINY + """
axes:
  width: [{label: h64}, {label: h96, model.hidden_size: 96, overrides: {model.num_attention_heads: 4}}]
  layout: [{label: tp1}, {label: tp2, nproc: 2, parallel.tp: 2}, {label: dp2, nproc: 2}]
points: [{label: extra, nproc: 1, data.packing: true}]
"""


@pytest.mark.pure
def test_grid_is_the_product_of_the_axes_with_stable_ids_and_forced_overrides(tmp_path):
    from megatron_po.sweep.screen import resolve

    spec = load_sweep(write_spec(tmp_path, GRID))
    points = expand_points(spec)
    assert [p.label for p in points] == ["h64-tp1", "h64-tp2", "h64-dp2", "h96-tp1", "h96-tp2", "h96-dp2", "extra"]
    assert [p.nproc for p in points] == [1, 2, 2, 1, 2, 2, 1]
    assert points[4].overrides["model.hidden_size"] == 96 and points[4].overrides["parallel.tp"] == 2
    assert points[4].overrides["model.num_attention_heads"] == 4 and points[4].axes == {"width": "h96",
                                                                                        "layout": "tp2"}
    assert len({p.id for p in points}) == len(points)
    assert [p.id for p in expand_points(load_sweep(spec.path))] == [p.id for p in points]  # stable
    longer = GRID.replace("timed_steps: 2", "timed_steps: 3")
    changed = expand_points(load_sweep(write_spec(tmp_path, longer, "b.yaml")))
    assert all(a.id != b.id and a.label == b.label for a, b in zip(points, changed))
    cfg = resolve(spec, points[6], tmp_path / "p")
    assert (cfg.train.train_steps, cfg.train.log_interval, cfg.checkpoint.save, cfg.checkpoint.resume,
            cfg.eval.interval, cfg.train.progress_bar, cfg.output_dir) == (3, 1, False, False, 0, False,
                                                                          str(tmp_path / "p"))
    assert cfg.data.packing and cfg.model.hidden_size == 64
    # a value's `data` changes the synthetic pairs of its points only, and so their ids
    longer_rows = expand_points(load_sweep(write_spec(tmp_path, GRID.replace(
        "data.packing: true}", "data.packing: true, data: {response_median: 40}}"), "c.yaml")))
    assert longer_rows[6].data.response_median == 40.0 and longer_rows[0].data.response_median == 16.0
    assert longer_rows[6].id != points[6].id and longer_rows[0].id == points[0].id


@pytest.mark.pure
@pytest.mark.parametrize("body, key", [
    (GRID.replace("timed_steps", "timed_step"), "timed_step"),
    (GRID.replace("prompt_tokens", "prompt_token"), "data.prompt_token"),
    (GRID.replace("nproc: 2, parallel.tp", "nprocs: 2, parallel.tp"), "nprocs"),
    (GRID.replace("data.packing: true", "packing: true"), "packing"),
    (GRID + "anchors: [{point: nowhere, source: x}]\n", "nowhere"),
    (GRID.replace("data.packing: true}", "data: {response_mean: 9}}"), "response_mean"),
])
def test_a_bad_key_is_named(tmp_path, body, key):
    with pytest.raises(SweepError, match=key):
        expand_points(load_sweep(write_spec(tmp_path, body)))


def _no_launch(launch: Launch) -> int:
    raise AssertionError(f"a dry run launched {launch.point.label}")


@pytest.mark.pure
@pytest.mark.parametrize("name", ["h100_qwen2_5_vl_7b", "h100_internvl3"])
def test_gpu_sweeps_dry_run_on_cpu(tmp_path, name, monkeypatch):
    monkeypatch.chdir(REPO)  # the sweeps name their shape configs from the repository root
    spec = load_sweep(REPO / "launch" / "sweeps" / f"{name}.yaml")
    rows = run_sweep(spec, tmp_path, dry_run=True, launcher=_no_launch, log=lambda s: None)
    assert {r["status"] for r in rows} <= {"planned", "skipped"} and "planned" in {r["status"] for r in rows}
    for r in rows:
        assert r["plan"]["available"] and r["plan"]["fits"] == (r["status"] == "planned"), r
        assert r["layout"]["tp"] * r["layout"]["pp"] * r["layout"]["dp"] == r["nproc"]
    assert not (tmp_path / "data").exists()  # nothing prepared either
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == len(rows)
    assert "## Anchors" in (tmp_path / "results.md").read_text() and (tmp_path / "sweep.png").stat().st_size


def _fake_metrics(launch: Launch, warmup: int = 1, timed: int = 2) -> None:
    launch.output_dir.mkdir(parents=True, exist_ok=True)
    with open(launch.output_dir / "metrics.jsonl", "w") as f:
        for step in range(1, warmup + timed + 1):
            f.write(json.dumps({"step": step, "time/step": 0.5 if step > warmup else 9.0, "time/policy": 0.3,
                                "memory/peak_rss_gib": 1.2, "memory/baseline_rss_gib": 1.0,
                                "memory/planned_gib": 0.25, "loss": 0.69}) + "\n")


@pytest.mark.pure
def test_an_interrupted_sweep_resumes_without_rerunning_finished_points_and_failures_are_recorded(tmp_path):
    spec = load_sweep(write_spec(tmp_path, TINY + """
points: [{label: a}, {label: b, model.hidden_size: 96}, {label: c, model.num_layers: 3},
         {label: bad, parallel.tp: 2}]
"""))
    out, launched = tmp_path / "out", []

    def interrupted_at_b(launch: Launch) -> int:
        launched.append(launch.point.label)
        if launch.point.label == "b":
            raise KeyboardInterrupt
        _fake_metrics(launch)
        return 0

    with pytest.raises(KeyboardInterrupt):
        run_sweep(spec, out, launcher=interrupted_at_b, log=lambda s: None)
    assert launched == ["a", "b"]
    first = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["status"] for r in first] == ["ok", "pending", "pending", "pending"]  # written on the way out

    def c_fails(launch: Launch) -> int:
        launched.append(launch.point.label)
        if launch.point.label == "c":
            (launch.log_dir / "stderr.log").write_text("Traceback ...\nRuntimeError: boom\n"
                                                        "data error: train.jsonl:3: chosen is empty\n"
                                                        "torch...ChildFailedError:\n=====\n")
            return 1
        _fake_metrics(launch)
        return 0

    logs: list[str] = []
    rows = run_sweep(spec, out, launcher=c_fails, log=logs.append)
    assert launched == ["a", "b", "b", "c"] and "1 points already done" in logs[0]
    assert [r["status"] for r in rows] == ["ok", "ok", "failed", "invalid"]
    assert rows[2]["error"] == "data error: train.jsonl:3: chosen is empty"
    assert "tp*pp*cp" in rows[3]["error"]  # 1 process cannot hold tp=2
    m = rows[0]["metrics"]
    assert m["time/step"] == 0.5 and m["timed_steps"] == 2 and m["time/policy"] == 0.3
    assert rows[0]["memory"]["measured_gib"] == pytest.approx(0.2) and rows[0]["memory"]["planned_gib"] == 0.25
    run_sweep(spec, out, launcher=c_fails, log=lambda s: None)  # only the failed point is retried
    assert launched[4:] == ["c"]


@pytest.mark.pure
def test_collector_and_error_line():
    rows = [{"step": 1, "step_time_s": 5.0, "tokens_per_s": 10.0}, {"step": 2, "step_time_s": 1.0,
            "tokens_per_s": 100.0, "flag": True}, {"step": 3, "step_time_s": 3.0, "tokens_per_s": 300.0}]
    m = summarize_steps(rows, warmup=1, nproc=2)  # an older trainer's names
    assert m["time/step"] == 2.0 and m["throughput/tokens_per_s_per_device"] == 100.0 and "flag" not in m
    assert error_line("x\nValueError: bad\ntorch.distributed...ChildFailedError: \n====\n") == "ValueError: bad"
    assert error_line("[rank0]: config error: parallel.tp\n") == "config error: parallel.tp"
    assert error_line("just words\n\n") == "just words"


@pytest.mark.pure
def test_report_draws_every_plot_from_results_lacking_metrics(tmp_path):
    from megatron_po.sweep.report import write_outputs

    spec = load_sweep(write_spec(tmp_path, GRID.replace("device: cpu", "device: cuda")))
    points = expand_points(spec)
    full = {"time/step": 1.0, "time/data_wait": 0.01, "time/reference": 0.2, "time/statistics": 0.05,
            "time/policy": 0.6, "time/optimizer": 0.1, "throughput/tokens_per_s_per_device": 5000.0,
            "flops/tflops_per_device": 300.0, "mfu": 0.3, "memory/peak_allocated_gib": 40.0,
            "memory/planned_gib": 38.0}
    results = []
    for p, keep in zip(points, [None, full, {"time/step": 2.0}, {"mfu": 0.2}, {}, full, None]):
        if keep is None:
            results.append(None)
            continue
        results.append({"id": p.id, "index": p.index, "label": p.label, "axes": p.axes, "config": None,
                        "overrides": p.overrides, "nproc": p.nproc, "device": "cuda", "status": "ok", "error": "",
                        "layout": {"tp": 1, "pp": 1, "cp": 1, "dp": p.nproc, "sp": False},
                        "plan": {"available": True, "peak_gib": 30.0, "fits": True},
                        "settings": {"model": f"m{p.index % 2}", "seq_len": 1024 * (1 + p.index % 3),
                                     "micro_batch": 1, "packing": True, "reference": "model"},
                        "metrics": keep, "memory": {"measured_gib": keep.get("memory/peak_allocated_gib"),
                                                    "planned_gib": keep.get("memory/planned_gib"),
                                                    "measured_over_planned": None}})
    rows = write_outputs(spec, tmp_path, points, results)
    assert [r["status"] for r in rows].count("pending") == 2
    md = (tmp_path / "results.md").read_text()
    assert "| h64-tp2 | 2 |" in md and "30.0%" in md and (tmp_path / "sweep.png").stat().st_size > 10_000
    write_outputs(spec, tmp_path / "empty", points, [None] * len(points))  # nothing measured: still drawn
    assert (tmp_path / "empty" / "sweep.png").is_file()


@pytest.mark.pure
def test_slurm_arrays_group_points_by_node_count(tmp_path):
    from megatron_po.sweep.slurm import write_slurm

    spec = load_sweep(write_spec(tmp_path, TINY + """
points: [{label: one, nproc: 4}, {label: two, nproc: 16}, {label: one-b, nproc: 8}, {label: four, nproc: 32}]
"""))
    files = write_slurm(spec, tmp_path / "out", expand_points(spec), nproc_per_node=8)
    assert [f.name for f in files] == ["nodes1.sbatch", "nodes2.sbatch", "nodes4.sbatch", "submit.sh"]
    one = files[0].read_text()
    assert "#SBATCH --array=0,2" in one and "#SBATCH --nodes=1" in one and '--point "$SLURM_ARRAY_TASK_ID"' in one
    assert "--launcher srun" in one and "afterany" in files[-1].read_text()


@pytest.mark.e2e
def test_a_real_two_point_cpu_sweep_writes_results_and_a_rerun_launches_nothing(tmp_path):
    spec = write_spec(tmp_path, TINY + "points: [{label: tp1}, {label: dp2, nproc: 2}]\n")
    cmd = [sys.executable, "-m", "megatron_po.cli", "sweep", str(spec), "--output", str(tmp_path / "out")]
    first = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    rows = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [r["status"] for r in rows] == ["ok", "ok"], rows
    assert all(r["metrics"]["time/step"] > 0 and r["metrics"]["timed_steps"] == 2 for r in rows)
    assert rows[1]["layout"]["dp"] == 2 and "| dp2 | 2 |" in (tmp_path / "out" / "results.md").read_text()
    assert (tmp_path / "out" / "sweep.png").stat().st_size > 0
    again = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "2 points already done" in again.stdout and "launching" not in again.stdout


@pytest.mark.e2e
@pytest.mark.slow
def test_a_sweep_killed_during_a_point_resumes_without_rerunning_the_finished_one(tmp_path):
    """SIGTERM (`kill`) while the second point trains: the running launch is stopped, the first point's result
    stays, and the rerun launches the second point only."""
    import os
    import signal
    import time

    spec = write_spec(tmp_path, TINY + "points: [{label: first}, {label: second, model.hidden_size: 96}]\n")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "megatron_po.cli", "sweep", str(spec), "--output", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    points = expand_points(load_sweep(spec))
    first = out / "points" / points[0].dirname / "result.json"
    second = out / "points" / points[1].dirname
    deadline = time.monotonic() + 240
    while not (first.is_file() and (second / "stdout.log").is_file()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert first.is_file(), "the first point never finished"
    time.sleep(3)  # the second point's launch is under way
    os.kill(proc.pid, signal.SIGTERM)
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, log
    assert not (second / "result.json").is_file()
    kept = first.read_text()
    again = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "1 points already done" in again.stdout and again.stdout.count("launching") == 1, again.stdout
    assert "second: launching" in again.stdout
    assert first.read_text() == kept
    assert json.loads((second / "result.json").read_text())["status"] == "ok"
