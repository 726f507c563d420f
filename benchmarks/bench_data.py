"""The data layer at scale: preparing an index, launching from one, and keeping the step fed.

    python benchmarks/bench_data.py [--parts prep,launch,today,wait,bcast] [--quick] [--work DIR] [--json F]
        [--prep-records 4096] [--sizes 10000,100000,1000000] [--today-sizes 10000,100000] [--nproc 2] [--profile]

Everything generated (images, JSON lines, tokenizer, indexes, HF processor directories, runs) goes under `--work`
(default /tmp/megatron_po_bench_data) and is reused by later runs; the indexes are prepared again each run unless
`--reuse-index`. Default options: ~8 min on 2 cores once the data exist (+1 min to generate them); `--quick`: ~5
min. Each part's progress goes to stderr, the tables to stdout. The machine's speed is probed before and after each
part (a fixed Python loop, and how much of a second core two copies of it get): on a shared host it drifts.

prep     Preparation throughput: `megatron-po prepare-data --workers 1` and `--workers 2` (subprocesses, the two
         alternated `--prep-repeats` times so a drift of the machine falls on both alike) on `--prep-records`
         JSON-lines preference records, each with its own 512x384 JPEG (smooth random colour fields plus noise,
         ~60 kB), tiny_vlm (our sentencepiece tokenizer, trained on the embedded shapes task's text, which the
         records carry). Rate = records / seconds of `prepare_all` (the CLI's summary: scan, hashes, examine,
         save; the interpreter's start and imports are in the command's wall time only). A record costs: one
         `os.pread`, a JSON parse and schema check; its image paths resolved and checked against the data root
         (`Path.resolve`: an lstat per path component) and stat'ed (`is_file`); prompt, chosen and rejected
         tokenized (sentencepiece) for the fit and the rows' token counts; and a full decode of each image file
         once per worker process (each forked worker remembers what it decoded: an image whose records fall in
         several workers' chunks is decoded by each of them). Serial around that: the fork, the parent's line
         scan, the data file's sha256, the gather of the workers' lists, the id check and the save.
launch   Launch to the end of step 1, and peak RSS per rank, of a real `megatron-po train` under torchrun
         (`--nproc` ranks; tiny_vlm at its default tiny shapes, objective acpo with its live reference,
         data.source=jsonl, data.index=require, data.num_workers=2, train.train_steps=1, 8 pairs per step in
         micro-batches of 2, checkpoint.save=false, eval off) on sets of `--sizes` records, each set's index
         prepared first by `megatron-po prepare-data --workers 2` (its time, rate and peak RSS are reported). Sets
         larger than `--distinct-images` reuse that many image files: record i reads file i mod D. A 16-record set
         is the baseline: "beyond base" is a launch's time minus the baseline's (what the records add beyond
         interpreter start, imports and model build), "growth" its peak RSS minus the baseline's. Each rank runs
         `megatron_po.cli.main(["train", ...])` after this script wrapped `loop.prepare_data`,
         `loop.build_train_dataset`, `loop.build_models` and `loop.train_step` with timers (nothing else changes),
         so the launch is also split: imports, data (tokenizer, the key: data file sha256 and image stats, the
         index, the dataset), models, models->step (reference, DDP, optimizer, the DataLoader's fork and step 1's
         batches), step 1. "launch->step 1" runs from the torchrun command's start to the slowest rank's end of
         step 1; "after imports" from the end of `import megatron_po.cli` (free of the import-time noise of a
         shared machine). RSS: each rank's kernel high-water mark (VmHWM) at the end of step 1, and its
         DataLoader workers' USS (private pages) then; one `gc.collect()` is timed on each rank after step 1.
         Launches go round-robin over the sizes, `--launch-repeats` times (medians), after one untimed launch.
         `--profile`: one more launch at the largest size with rank 0 under cProfile, its data functions printed.
today    What every rank did before the index: the same launch with data.index=auto, an empty index directory and
         data.num_workers=0, which reads, tokenizes and decodes every record before step 1 (now shared out over the
         ranks, each examining 1/world of them inline: before the index each rank read all of them). Sizes
         `--today-sizes`; a size whose estimate (from the previous size's rate) exceeds `--today-limit-s` is
         skipped and its estimate shown.
wait     `time/data_wait` with DataLoader workers and inline, for Qwen2.5-VL and InternVL3 at their released
         checkpoints' pixel bounds (Qwen2.5-VL-*-Instruct: min_pixels 3136, max_pixels 12845056, so no image here
         is downscaled; InternVL3-*-hf: 448-px tiles, up to 12 plus a thumbnail, 256 tokens each), on
         `--wait-images` random-content JPEGs of random sizes between 512x384 and 1280x960. Tokenizer and processor
         files come from the tests' HF fixtures (tests/hf_*_fixture.py) with the pixel bounds rewritten; their tiny
         weights are never loaded. `train/loader.step_batches` (one rank, `--wait-global-batch` pairs per step in
         micro-batches of `--wait-micro-batch`) runs first inline with no step: the median wait is P, the host's
         preprocessing of one optimizer step; then with `time.sleep(S)` standing in for the step, S = `--ratio` x
         P, with num_workers 0 and 2. The default ratio 4 is conservative: an 8B step on a GPU takes several
         seconds per micro-batch of a few pairs while the host preprocessing of their images is ~0.1-0.5 s (a
         ratio of 10 or more); the smaller the ratio, the less slack the workers have (here the two workers also
         share 2 cores with the loop). Reported per configuration: step 1's wait (the workers' fork and first
         batches), then over the later steps the mean, median and max wait, the part of the mean spent in this
         process's full (generation-2) garbage collections, and mean wait / (mean wait + S).
bcast    One Qwen2.5-VL micro-batch of `--wait-micro-batch` pairs on two TP peers (a 2-process gloo group on this
         host): each peer making its own copy (what the trainer does, in its DataLoader workers, off the critical
         path), against rank 0 broadcasting its tensors after a broadcast of their shapes (on the training thread),
         one collective per tensor or one per dtype over the flattened tensors (megatron's `broadcast_data`).

Needs the [hf] extra (transformers, tokenizers) for `wait` and `bcast`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

warnings.filterwarnings("ignore", category=UserWarning)
warnings.filterwarnings("ignore", category=FutureWarning)

REPO = Path(__file__).resolve().parents[1]
MiB = 2**20
BASELINE_RECORDS = 16


def env_for_children() -> dict:
    """One thread per process and no GPU (as the tests' subprocesses), warnings off."""
    return dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONWARNINGS="ignore",
                CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false")


# ---- generated data ----------------------------------------------------------------------------------------------

def random_jpeg(path: Path, width: int, height: int, rng: np.random.Generator) -> None:
    """A JPEG of smooth random colour fields plus pixel noise (sizes like photos: ~60 kB at 512x384, q=90)."""
    from PIL import Image

    small = rng.integers(0, 256, (max(2, height // 32), max(2, width // 32), 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)
    pixels = np.asarray(image, dtype=np.int16) + rng.integers(-12, 13, (height, width, 3), dtype=np.int16)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, format="JPEG", quality=90)


def _write_images(job: tuple) -> None:
    directory, names, sizes, seed = job
    rng = np.random.default_rng(seed)
    for name, (w, h) in zip(names, sizes):
        random_jpeg(Path(directory) / name, w, h, rng)


def write_images(directory: Path, count: int, sizes, seed: int, procs: int = 2) -> list[str]:
    """`count` JPEGs `img_NNNNNN.jpg` in `directory` (sizes[i] = (w, h)); the ones already there are kept."""
    import multiprocessing

    directory.mkdir(parents=True, exist_ok=True)
    names = [f"img_{i:06d}.jpg" for i in range(count)]
    todo = [i for i in range(count) if not (directory / names[i]).is_file()]
    if todo:
        step = max(1, -(-len(todo) // (4 * procs)))
        jobs = [(str(directory), [names[i] for i in todo[a:a + step]], [sizes[i] for i in todo[a:a + step]],
                 seed + a) for a in range(0, len(todo), step)]
        with multiprocessing.get_context("fork").Pool(procs) as pool:
            pool.map(_write_images, jobs)
    return names


def synthetic_texts(work: Path, count: int) -> list[dict]:
    """`count` prompt / chosen / rejected / meta of the embedded shapes task (data/synthetic.py), its 16-px images
    discarded: the text of real-looking records."""
    from megatron_po.data.synthetic import generate_synthetic_dataset

    out = work / "texts"
    path = out / "train.jsonl"
    if not path.is_file() or sum(1 for _ in open(path)) != count:
        shutil.rmtree(out, ignore_errors=True)
        generate_synthetic_dataset(out, num_train=count, num_eval=0, seed=1234, image_size=16)
        shutil.rmtree(out / "images", ignore_errors=True)
    return [json.loads(line) for line in path.read_text().splitlines()]


def tokenizer_file(work: Path, texts: list[dict]) -> Path:
    from megatron_po.data.tokenizer import train_tokenizer

    path = work / "spm.model"
    if not path.is_file():
        corpus = [t[k] for t in texts for k in ("prompt", "chosen", "rejected")]
        train_tokenizer(corpus, work / "spm", vocab_size=512, seed=0)
    return path


def write_set(data: Path, records: int, images: list[str], texts: list[dict]) -> Path:
    """`<data>/pairs_<records>.jsonl`: record i reads images/images[i mod len(images)] and text i mod len(texts)
    (written once; a later run with the same counts reuses it)."""
    path = data / f"pairs_{records}.jsonl"
    done = data / f"pairs_{records}.complete"
    if done.is_file() and done.read_text() == f"{len(images)} {len(texts)}":
        return path
    # each record's JSON after its id and image: the synthetic text and meta, serialised once per distinct text
    tails = [json.dumps({k: t[k] for k in ("prompt", "chosen", "rejected", "meta")}, sort_keys=True)[1:]
             for t in texts]
    with open(path, "w", encoding="utf-8") as f:
        for a in range(0, records, 65536):
            f.write("".join(f'{{"id": "r{i:07d}", "image": "images/{images[i % len(images)]}", '
                            f'{tails[i % len(tails)]}\n' for i in range(a, min(records, a + 65536))))
    done.write_text(f"{len(images)} {len(texts)}")
    return path


# ---- one rank of a timed `megatron-po train` launch ---------------------------------------------------------------

def launch_child(out_dir: Path, profile: bool, argv: list[str]) -> int:
    """Under torchrun: `megatron_po.cli.main(["train", *argv])` with timers around the loop's data, model and step
    functions; writes `<out_dir>/rank<r>.json` (and rank 0's cProfile stats with `profile`)."""
    import gc

    import psutil

    proc = psutil.Process()
    marks = {"start": proc.create_time()}
    import megatron_po.cli as cli
    import megatron_po.train.loop as loop

    marks["imported"] = time.time()

    def timed(name, fn):
        """`fn`, its first call's start and end marked (after step 1: this rank's memory)."""
        def wrapper(*args, **kwargs):
            marks.setdefault(name + "_start", time.time())
            out = fn(*args, **kwargs)
            if name + "_end" not in marks:
                marks[name + "_end"] = time.time()
                if name == "step":
                    marks.update(memory_now(proc))
                    # what a full collection costs the training thread at this point (after the marks)
                    t0 = time.perf_counter()
                    gc.collect()
                    marks.update(full_gc_s=time.perf_counter() - t0, gc_objects=len(gc.get_objects()))
            return out
        return wrapper

    loop.prepare_data = timed("data", loop.prepare_data)
    loop.build_train_dataset = timed("dataset", loop.build_train_dataset)
    loop.build_models = timed("models", loop.build_models)
    loop.train_step = timed("step", loop.train_step)
    profiler = None
    if profile and os.environ.get("RANK", "0") == "0":
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    rc = cli.main(["train", *argv])
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(str(out_dir / "rank0.pstats"))
    rank = int(os.environ.get("RANK", "0"))
    (out_dir / f"rank{rank}.json").write_text(json.dumps({"rc": rc, **marks}))
    return rc


def memory_now(proc) -> dict:
    """This rank's high-water mark (VmHWM) and current RSS, and its DataLoader workers' USS and RSS."""
    status = Path("/proc/self/status").read_text()
    hwm = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024
    rss = int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024
    workers = proc.children()
    uss = rss_w = 0
    for w in workers:
        try:
            info = w.memory_full_info()
            uss, rss_w = uss + info.uss, rss_w + info.rss
        except Exception:  # a worker that just exited
            pass
    return {"hwm": hwm, "rss": rss, "workers": len(workers), "workers_uss": uss, "workers_rss": rss_w}


# ---- launches -----------------------------------------------------------------------------------------------------

def launch_overrides(work: Path, data: Path, tok: Path, index_dir: Path, out: Path, index: str,
                     num_workers: int) -> list[str]:
    return [f"output_dir={out}", "data.source=jsonl", f"data.train_path={data}", f"data.tokenizer_path={tok}",
            f"data.index_dir={index_dir}", f"data.index={index}", f"data.num_workers={num_workers}",
            "train.train_steps=1", "train.global_batch_size=8", "train.micro_batch_size=2",
            "train.progress_bar=false", "checkpoint.save=false", "checkpoint.resume=false", "eval.interval=0"]


def prepare_index_cli(overrides: list[str], workers: int) -> dict:
    """`megatron-po prepare-data --workers N` in a subprocess: its JSON summary plus the command's wall time."""
    cmd = [sys.executable, "-m", "megatron_po.cli", "prepare-data", "--workers", str(workers), *overrides]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env_for_children(), cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)  # its own rusage: the peak RSS of its largest process
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode:
        raise RuntimeError(f"prepare-data exited {proc.returncode}:\n{(stdout + stderr)[-4000:]}")
    summary = json.loads(stdout[stdout.index("{"):])
    return {**summary, "wall_s": wall, "peak_rss_bytes": usage.ru_maxrss * 1024}


def timed_launch(overrides: list[str], out_dir: Path, nproc: int, profile: bool = False,
                 timeout: float = 1800) -> dict:
    """A `megatron-po train` launch under torchrun, each rank timed (launch_child); the slowest rank's marks."""
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", __file__,
           "--launch-child", str(out_dir), *(["--profile-child"] if profile else []), "--", *overrides]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env_for_children(), cwd=REPO, timeout=timeout)
    wall = time.time() - t0
    ranks = [json.loads(p.read_text()) for p in sorted(out_dir.glob("rank*.json"))]
    if proc.returncode or len(ranks) != nproc or any(r["rc"] for r in ranks):
        raise RuntimeError(f"launch exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-4000:]}")
    run_dir = Path(next(o.split("=", 1)[1] for o in overrides if o.startswith("output_dir=")))
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    def span(a, b):
        return max(r[b] for r in ranks) - min(r[a] for r in ranks) if all(a in r and b in r for r in ranks) else None

    return {
        "launch_to_step1_s": max(r["step_end"] for r in ranks) - t0,
        "command_wall_s": wall,
        "torchrun_to_rank_s": min(r["start"] for r in ranks) - t0,
        "imports_s": max(r["imported"] - r["start"] for r in ranks),
        "after_imports_s": max(r["step_end"] - r["imported"] for r in ranks),
        "data_s": max(r["dataset_end"] - r["data_start"] for r in ranks),
        "models_s": max(r["models_end"] - r["models_start"] for r in ranks),
        "models_to_step_s": span("models_end", "step_start"),
        "step1_s": max(r["step_end"] - r["step_start"] for r in ranks),
        "data_wait_step1_s": metrics[0].get("time/data_wait"),
        "hwm_bytes": [r["hwm"] for r in ranks],
        "workers_uss_bytes": [r["workers_uss"] for r in ranks],
        "workers_rss_bytes": [r["workers_rss"] for r in ranks],
        "workers": [r["workers"] for r in ranks],
        "full_gc_s": max(r["full_gc_s"] for r in ranks),
        "gc_objects": max(r["gc_objects"] for r in ranks),
    }



# ---- time/data_wait: HF families' processors, workers against inline ---------------------------------------------

QWEN_BOUNDS = {"min_pixels": 56 * 56, "max_pixels": 12845056}
"""Qwen2.5-VL-*-Instruct's preprocessor_config.json (the class default's max is 28 * 28 * 1280)."""
INTERNVL_TILES = {"size": {"height": 448, "width": 448}, "min_patches": 1, "max_patches": 12}
"""InternVL3-*-hf's preprocessor_config.json: 448-px tiles, up to 12 (+ a thumbnail), 256 tokens each."""


def hf_dir(work: Path, family: str) -> Path:
    """The tests' tiny HF fixture of `family` with the released checkpoints' pixel bounds (tokenizer, chat
    template and processor files are what the data path reads; the weights are never loaded)."""
    out = work / "hf" / family
    if (out / "bench.complete").is_file():
        return out
    sys.path.insert(0, str(REPO / "tests"))
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # the fixtures' tiny vocabularies draw warnings
    shutil.rmtree(out, ignore_errors=True)
    if family == "qwen2_5_vl":
        from hf_qwen2_5_vl_fixture import make_hf_dir

        make_hf_dir(out)
        pre = json.loads((out / "preprocessor_config.json").read_text())
        pre.update(QWEN_BOUNDS, size={"shortest_edge": QWEN_BOUNDS["min_pixels"],
                                      "longest_edge": QWEN_BOUNDS["max_pixels"]})
        (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=1))
    else:
        from hf_internvl3_fixture import make_checkpoint

        make_checkpoint(out)
        pre = json.loads((out / "preprocessor_config.json").read_text())
        pre.update(INTERNVL_TILES)
        (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=1))
        cfg = json.loads((out / "config.json").read_text())
        cfg["vision_config"]["image_size"] = [448, 448]
        cfg["image_seq_length"] = 256
        (out / "config.json").write_text(json.dumps(cfg, indent=1))
        proc = json.loads((out / "processor_config.json").read_text())
        (out / "processor_config.json").write_text(json.dumps({**proc, "image_seq_length": 256}, indent=1))
    (out / "bench.complete").write_text("ok")
    return out


def hf_pairs(work: Path, texts: list[dict], records: int, images: int, seed: int = 7) -> Path:
    """`records` pairs over `images` random-content JPEGs of random sizes in [512, 1280] x [384, 960]."""
    data = work / "hf_data"
    rng = np.random.default_rng(seed)
    sizes = [(int(rng.integers(512, 1281)), int(rng.integers(384, 961))) for _ in range(images)]
    names = write_images(data / "images", images, sizes, seed)
    return write_set(data, records, names, texts)


def hf_config(work: Path, family: str, data: Path, micro_batch: int, global_batch: int, index: str = "auto"):
    from megatron_po.config import load_config

    return load_config(None, [
        f"output_dir={work / 'runs' / family}", f"model.family={family}", f"model.hf_path={hf_dir(work, family)}",
        # the converted weights are never loaded here: the data path reads only hf_path's files
        f"checkpoint.init_from={work / 'no_checkpoint'}", "model.max_seq_length=8192", "data.source=jsonl",
        f"data.train_path={data}", f"data.index_dir={work / 'index'}", f"data.index={index}",
        f"train.micro_batch_size={micro_batch}", f"train.global_batch_size={global_batch}"])


def hf_dataset(cfg):
    """The training split of `cfg` over its index (prepared here, in this process, the first time)."""
    from megatron_po.families import family_spec
    from megatron_po.train.data import build_dataset, build_tokenizer

    family = family_spec(cfg.model.family)
    tokenizer = build_tokenizer(cfg, family, Path(cfg.data.tokenizer_path))
    return build_dataset(cfg, family, Path(cfg.data.train_path), tokenizer)


def wait_loop(ds, sampler, layout, steps: int, workers: int, step_s: float,
              prefetch: int = 2) -> tuple[list[float], list[float]]:
    """data_wait of each of `steps` optimizer steps through train/loader.step_batches, the step a sleep; and the
    seconds of each wait that this process spent in full (generation 2) garbage collections."""
    import gc

    import torch

    from megatron_po.train.loader import step_batches

    in_gc = {"start": 0.0, "total": 0.0}

    def on_gc(phase, info):
        if info["generation"] == 2:
            if phase == "start":
                in_gc["start"] = time.perf_counter()
            else:
                in_gc["total"] += time.perf_counter() - in_gc["start"]

    gc.callbacks.append(on_gc)
    waits, gcs = [], []
    try:
        before = 0.0
        for batches, wait in step_batches(ds, sampler, layout, torch.device("cpu"), 0, steps, workers, prefetch):
            waits.append(wait)
            gcs.append(in_gc["total"] - before)
            del batches
            time.sleep(step_s)
            before = in_gc["total"]
    finally:
        gc.callbacks.remove(on_gc)
    return waits, gcs


def bench_wait(work: Path, texts: list[dict], args) -> list[dict]:
    import torch

    from megatron_po.train.data import build_sampler
    from megatron_po.train.loader import BatchLayout

    torch.set_num_threads(1)  # as a rank under torchrun (OMP_NUM_THREADS=1), and as the DataLoader's workers
    data = hf_pairs(work, texts, args.wait_records, args.wait_images)
    for f in (data.parent / "images").glob("*.jpg"):  # in the page cache: P is the host's work, not the disk's
        f.read_bytes()
    rows = []
    for family in ("qwen2_5_vl", "internvl3"):
        cfg = hf_config(work, family, data, args.wait_micro_batch, args.wait_global_batch)
        ds = hf_dataset(cfg)
        sampler = build_sampler(cfg, len(ds), 0, 1)
        layout = BatchLayout(cfg.train.micro_batch_size, False, cfg.model.max_seq_length, 1, False)
        # P: this rank's micro-batches of one step made inline, nothing else running (first step apart)
        inline, _ = wait_loop(ds, sampler, layout, args.wait_steps, 0, 0.0)
        p = statistics.median(inline[1:])
        step_s = args.ratio * p
        one = ds[0][1]
        pixels = one["pixel_values"]
        row = {"family": family, "P_s": p, "inline_s": inline, "S_s": step_s,
               "pixel_mib_per_pair": pixels.numel() * 4 / MiB,
               "tokens_first_image": int(one["num_tokens"].sum())}
        for workers in (0, 2):
            waits, gcs = wait_loop(ds, sampler, layout, args.wait_steps, workers, step_s)
            mean = statistics.mean(waits[1:])
            row[f"w{workers}"] = {"first_s": waits[0], "mean_s": mean, "median_s": statistics.median(waits[1:]),
                                  "max_s": max(waits[1:]),
                                  "share": mean / (mean + step_s), "waits_s": waits, "gc_s": gcs,
                                  "gc_mean_s": statistics.mean(gcs[1:])}
            print(f"  wait {family} workers={workers}: data_wait {mean:.3f} s/step (P {p:.3f} s, S {step_s:.3f} s)",
                  file=sys.stderr, flush=True)
        rows.append(row)
    return rows


# ---- a TP peer's copy against a broadcast ----------------------------------------------------------------------

def tensors_of(obj, out: list) -> list:
    """Every tensor in a micro-batch (dataclasses, dicts and sequences walked), in a fixed order."""
    import dataclasses

    import torch

    if torch.is_tensor(obj):
        out.append(obj)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            tensors_of(getattr(obj, f.name), out)
    elif isinstance(obj, dict):
        for v in obj.values():
            tensors_of(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            tensors_of(v, out)
    return out


def _bcast_rank(rank: int, store_path: str, work: str, data: str, micro_batch: int, repeats: int,
                result: str) -> None:
    import torch
    import torch.distributed as dist

    from megatron_po.train.loader import BatchLayout, host_micro_batch

    torch.set_num_threads(1)
    logging.getLogger("megatron_po").setLevel(logging.ERROR)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    cfg = hf_config(Path(work), "qwen2_5_vl", Path(data), micro_batch, micro_batch, index="require")
    ds = hf_dataset(cfg)
    layout = BatchLayout(micro_batch, False, cfg.model.max_seq_length, 1, False)
    make, per_tensor, flat, sizes, counts = [], [], [], [], []
    for k in range(repeats):
        idx = [(k * micro_batch + j) % len(ds) for j in range(micro_batch)]
        dist.barrier()
        t0 = time.perf_counter()
        mb = host_micro_batch(ds, idx, layout)  # each peer's own copy
        make.append(time.perf_counter() - t0)
        mine = tensors_of(mb, [])
        sizes.append(sum(t.numel() * t.element_size() for t in mine))
        counts.append(len(mine))
        for form, times in (("per_tensor", per_tensor), ("flat", flat)):
            dist.barrier()
            t0 = time.perf_counter()
            meta = [[(tuple(t.shape), t.dtype) for t in mine] if rank == 0 else None]
            dist.broadcast_object_list(meta, src=0)
            if form == "per_tensor":
                got = mine if rank == 0 else [torch.empty(s, dtype=d) for s, d in meta[0]]
                for t in got:
                    dist.broadcast(t.contiguous() if rank == 0 else t, src=0)
            else:  # megatron's broadcast_data: one flattened buffer per dtype
                for dtype in sorted({d for _, d in meta[0]}, key=str):
                    n = sum(int(np.prod(s)) for s, d in meta[0] if d == dtype)
                    buf = (torch.cat([t.reshape(-1) for t in mine if t.dtype == dtype]) if rank == 0
                           else torch.empty(n, dtype=dtype))
                    dist.broadcast(buf, src=0)
                    if rank:
                        got = list(torch.split(buf, [int(np.prod(s)) for s, d in meta[0] if d == dtype]))
            times.append(time.perf_counter() - t0)
    slowest = [None, None]
    dist.all_gather_object(slowest, {"make": make, "per_tensor": per_tensor, "flat": flat})
    if rank == 0:
        agg = {k: [max(a, b) for a, b in zip(slowest[0][k], slowest[1][k])] for k in slowest[0]}
        Path(result).write_text(json.dumps({**agg, "bytes": sizes, "tensors": counts}))
    dist.destroy_process_group()


def bench_bcast(work: Path, texts: list[dict], args) -> dict:
    """Qwen2.5-VL micro-batches of `--wait-micro-batch` pairs: made on both ranks at once, and broadcast."""
    import torch.multiprocessing as mp

    data = hf_pairs(work, texts, args.wait_records, args.wait_images)
    hf_dataset(hf_config(work, "qwen2_5_vl", data, args.wait_micro_batch, args.wait_micro_batch))  # its index
    tmp = Path(tempfile.mkdtemp(prefix="bcast_", dir=work))  # the parent's store: no port to find
    try:
        result = tmp / "result.json"
        mp.spawn(_bcast_rank, args=(str(tmp / "store"), str(work), str(data), args.wait_micro_batch,
                                    args.bcast_repeats, str(result)), nprocs=2, join=True)
        r = json.loads(result.read_text())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # the first repetition warms allocators and the connection: left out
    return {k: statistics.median(v[1:] if len(v) > 1 else v) for k, v in r.items()}



# ---- the parts ----------------------------------------------------------------------------------------------------

def bench_prep(data: Path, tok: Path, images: list[str], texts: list[dict], args) -> list[dict]:
    """prepare-data with 1 and 2 workers, alternated (w1, w2, w1, w2, ...) so that a drift in the machine's speed
    (a shared host) falls on both alike."""
    path = write_set(data, args.prep_records, images[:args.prep_records], texts)
    runs: dict[int, list] = {1: [], 2: []}
    for k in range(args.prep_repeats):
        for workers in (1, 2):
            index_dir = args.work / f"index_prep_w{workers}"
            shutil.rmtree(index_dir, ignore_errors=True)
            ov = launch_overrides(args.work, path, tok, index_dir, args.work / "runs" / "prep", "auto", workers)
            runs[workers].append(prepare_index_cli(ov, workers))
            shutil.rmtree(index_dir, ignore_errors=True)
            print(f"  prep workers={workers}: {runs[workers][-1]['records_per_s']:.0f} records/s",
                  file=sys.stderr, flush=True)
    rows = []
    for workers, done in runs.items():
        seconds = [r["seconds"] for r in done]
        rows.append({"workers": workers, "records": args.prep_records, "images": args.prep_records,
                     "seconds": statistics.median(seconds), "runs_s": seconds,
                     "records_per_s": args.prep_records / statistics.median(seconds),
                     "best_records_per_s": args.prep_records / min(seconds),
                     "wall_s": statistics.median(r["wall_s"] for r in done)})
    rows[1]["speedup"] = rows[0]["seconds"] / rows[1]["seconds"]
    rows[1]["best_speedup"] = min(rows[0]["runs_s"]) / min(rows[1]["runs_s"])
    return rows


def _median_launch(runs: list[dict]) -> dict:
    """Times: the median over repeats; memory: the largest."""
    out = dict(runs[0])
    for k, v in runs[0].items():
        if k.endswith("_s") and v is not None:
            out[k] = statistics.median(r[k] for r in runs)
        elif k.endswith("_bytes"):
            out[k] = [max(r[k][i] for r in runs) for i in range(len(v))]
    out["repeats"] = len(runs)
    return out


def bench_launch(data: Path, tok: Path, images: list[str], texts: list[dict], args) -> list[dict]:
    """Every set's index prepared (prepare-data --workers 2), then the launches round-robin over the sets, one
    untimed launch first (it brings the interpreter's files into the page cache)."""
    rows, rate = [], None
    for n in [BASELINE_RECORDS, *args.sizes]:
        path = write_set(data, n, images[:min(n, args.distinct_images)], texts)
        row = {"records": n, "images": min(n, args.distinct_images), "path": "index",
               "overrides": launch_overrides(args.work, path, tok, args.work / "index",
                                             args.work / "runs" / f"launch_{n}", "require", 2)}
        marker = args.work / "index" / f"prepared_{n}.json"
        stamp = [path.stat().st_size, path.stat().st_mtime_ns]
        earlier = json.loads(marker.read_text()) if marker.is_file() else None
        if args.reuse_index and earlier and earlier["stamp"] == stamp:
            row["prepare"] = {**earlier["prepare"], "earlier_run": True}
        elif rate and n / rate > args.prepare_limit_s:
            row["skipped"] = (f"prepare-data estimated {n / rate:.0f} s at {rate:.0f} records/s "
                              f"(> --prepare-limit-s {args.prepare_limit_s:.0f})")
        else:
            row["prepare"] = prepare_index_cli(row["overrides"], 2)
            marker.write_text(json.dumps({"stamp": stamp, "prepare": row["prepare"]}))
            print(f"  prepare-data {n} records: {row['prepare']['seconds']:.1f} s", file=sys.stderr, flush=True)
        if n >= 10000 and "prepare" in row:
            rate = row["prepare"]["records_per_s"]
        rows.append(row)
    live = [r for r in rows if "skipped" not in r]
    timed_launch(live[0]["overrides"], args.work / "launch" / "warmup", args.nproc)
    runs: dict[int, list] = {r["records"]: [] for r in live}
    for _ in range(args.launch_repeats):
        for r in live:
            runs[r["records"]].append(timed_launch(r["overrides"], args.work / "launch" / str(r["records"]),
                                                   args.nproc))
            print(f"  launch {r['records']} records (index): step 1 after "
                  f"{runs[r['records']][-1]['launch_to_step1_s']:.1f} s", file=sys.stderr, flush=True)
    for r in live:
        r.update(_median_launch(runs[r["records"]]))
    if args.profile:
        timed_launch(live[-1]["overrides"], args.work / "launch" / "profile", args.nproc, profile=True)
        rows.append({"profile": str(args.work / "launch" / "profile" / "rank0.pstats"),
                     "records": live[-1]["records"]})
    for r in rows:
        r.pop("overrides", None)
    return rows


def bench_today(data: Path, tok: Path, images: list[str], texts: list[dict], args) -> list[dict]:
    rows, rate = [], None
    for n in args.today_sizes:
        row = {"records": n, "images": min(n, args.distinct_images), "path": "no index"}
        if rate and n / rate > args.today_limit_s:
            row["skipped"] = (f"estimated {n / rate:.0f} s of data at launch ({rate:.0f} records/s over "
                              f"{args.nproc} ranks) > --today-limit-s {args.today_limit_s:.0f}")
            rows.append(row)
            continue
        path = write_set(data, n, images[:min(n, args.distinct_images)], texts)
        index_dir = args.work / "index_today"
        shutil.rmtree(index_dir, ignore_errors=True)
        ov = launch_overrides(args.work, path, tok, index_dir, args.work / "runs" / f"today_{n}", "auto", 0)
        row.update(timed_launch(ov, args.work / "launch" / f"today_{n}", args.nproc))
        shutil.rmtree(index_dir, ignore_errors=True)
        rate = n / row["data_s"]
        rows.append(row)
        print(f"  launch {n} records (no index): step 1 after {row['launch_to_step1_s']:.1f} s",
              file=sys.stderr, flush=True)
    return rows


def _spin(n: int) -> float:
    t0 = time.perf_counter()
    total = 0
    for i in range(n):
        total += i
    return time.perf_counter() - t0


def cpu_probe() -> tuple[float, float]:
    """How fast this (shared) machine runs right now: milliseconds of a fixed pure-Python loop, and how much of
    a second core two copies of it get (wall of one / wall of two at once: 1.0 = two free cores, 0.5 = one)."""
    import multiprocessing

    one = _spin(2_000_000)
    with multiprocessing.get_context("fork").Pool(2) as pool:
        t0 = time.perf_counter()
        pool.map(_spin, [2_000_000, 2_000_000])
        two = time.perf_counter() - t0
    return 1e3 * one, one / two


# ---- tables -------------------------------------------------------------------------------------------------------

def _table(head: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |")


def _records(n: int) -> str:
    return f"{n // 1000000}M" if n >= 1000000 and n % 1000000 == 0 else f"{n // 1000}K" if n >= 1000 and \
        n % 1000 == 0 else str(n)


def print_tables(results: dict, args) -> None:
    import torch

    print(f"\n{os.cpu_count()} CPU(s) | torch {torch.__version__} | {args.nproc} ranks per launch | work {args.work}")
    if "prep" in results:
        print("\n1. megatron-po prepare-data (tiny_vlm, every record with its own 512x384 JPEG; 1 and 2 workers "
              f"alternated, {args.prep_repeats} runs each; rate = records / prepare_all seconds; best = fastest run)")
        _table(["workers", "records", "prepare_all s, each run", "records/s median", "best", "speed-up median",
                "best", "command wall s"],
               [[str(r["workers"]), _records(r["records"]), " ".join(f"{x:.2f}" for x in r["runs_s"]),
                 f"{r['records_per_s']:.0f}", f"{r['best_records_per_s']:.0f}", f"{r.get('speedup', 1.0):.2f}x",
                 f"{r.get('best_speedup', 1.0):.2f}x", f"{r['wall_s']:.1f}"] for r in results["prep"]])
    launches = [r for r in results.get("launch", []) if "profile" not in r] + results.get("today", [])
    if launches:
        base = next((r for r in launches if r["records"] == BASELINE_RECORDS and "skipped" not in r), None)
        print(f"\n2./3. megatron-po train launch to the end of step 1 ({args.nproc} ranks, tiny_vlm, acpo, 1 step; "
              "times: median of "
              f"{args.launch_repeats} with an index, 1 run without; 'beyond base' = minus the {BASELINE_RECORDS}-"
              "record launch; RSS: VmHWM per rank at step 1, max over ranks)")
        times, memory = [], []
        for r in launches:
            prep = r.get("prepare")
            prep_s = "-" if not prep else (f"{prep['seconds']:.1f} ({prep['records_per_s']:.0f}/s, "
                                           f"{prep.get('peak_rss_bytes', 0) / MiB:.0f} MiB)"
                                           + (" earlier run" if prep.get("earlier_run") else ""))
            head = [_records(r["records"]), _records(r["images"]), r["path"]]
            if "skipped" in r:
                times.append(head + [prep_s, "skipped: " + r["skipped"]] + [""] * 8)
                continue

            def beyond(key):
                return f"{r[key] - base[key]:+.1f}" if base else "-"

            times.append(head + [prep_s, f"{r['launch_to_step1_s']:.1f}", beyond("launch_to_step1_s"),
                                 f"{r['after_imports_s']:.1f}", beyond("after_imports_s"), f"{r['imports_s']:.1f}",
                                 f"{r['data_s']:.2f}", f"{r['models_s']:.2f}", f"{r['models_to_step_s']:.2f}",
                                 f"{r['step1_s']:.2f}"])
            hwm = max(r["hwm_bytes"])
            memory.append(head + [" / ".join(f"{b / MiB:.0f}" for b in r["hwm_bytes"]),
                                  f"{(hwm - max(base['hwm_bytes'])) / MiB:+.0f}" if base else "-",
                                  " / ".join(f"{b / MiB:.0f}" for b in r["workers_uss_bytes"])
                                  if max(r["workers"]) else "-",
                                  f"{1e3 * r['full_gc_s']:.0f} ({r['gc_objects'] / 1000:.0f}K)"])
        _table(["records", "image files", "data", "prepare-data -w2 s (rate, peak RSS)", "launch->step 1 s",
                "beyond base s",
                "after imports s", "beyond base s", "imports s", "data s", "models s", "models->step s",
                "step 1 s"], times)
        print("   image files: distinct files the records read (record i reads file i mod that); 'after imports' = "
              "end of step 1 - end of `import megatron_po.cli` (the record-dependent part, without the import "
              "noise of a shared machine); 'data s' = tokenizer + key (data file sha256, image stats) + index "
              "(load, or prepare) + dataset; 'models->step s' = reference, DDP, optimizer, DataLoader fork, step "
              "1's batches\n")
        _table(["records", "image files", "data", "peak RSS MiB per rank", "growth MiB (max rank)",
                "workers USS MiB per rank", "full GC ms (objects)"], memory)
        print("   workers USS: private pages of a rank's DataLoader workers at the end of step 1 (the index's pages "
              "are shared with the rank); full GC: one gc.collect() on a rank after step 1, and the objects it "
              "tracks")
    if "wait" in results:
        print(f"\n4. time/data_wait through train/loader.step_batches ({args.wait_global_batch} pairs per step in "
              f"micro-batches of {args.wait_micro_batch}, 1 rank, {args.wait_steps} steps, the first apart; the "
              f"step = sleep(S), S = {args.ratio:g} x P, P = inline preprocessing of one step)")
        rows = []
        for r in results["wait"]:
            for w in (0, 2):
                m = r[f"w{w}"]
                rows.append([r["family"], str(r["tokens_first_image"]), f"{r['pixel_mib_per_pair']:.1f}",
                             f"{r['P_s']:.3f}", f"{r['S_s']:.3f}", str(w), f"{m['first_s']:.3f}",
                             f"{m['mean_s']:.3f}", f"{m['median_s']:.3f}", f"{m['max_s']:.3f}",
                             f"{m['gc_mean_s']:.3f}", f"{100 * m['share']:.1f}%"])
        _table(["family", "tokens (1st image)", "pixel MiB/pair", "P s/step", "S s", "workers", "step 1 wait s",
                "mean wait s", "median", "max", "of which full GC", "mean wait / step"], rows)
        print("   full GC: seconds per wait this process spent in generation-2 garbage collections (the interpreter's "
              "pauses, wherever an allocation triggers them; not the data's)")
    if "bcast" in results:
        r = results["bcast"]
        print(f"\n5. one Qwen2.5-VL micro-batch of {args.wait_micro_batch} pairs on 2 TP peers (gloo, one host; "
              f"median of {args.bcast_repeats - 1} after a warm-up; slowest rank)")
        _table(["MiB", "tensors", "each peer makes its own ms", "broadcast per tensor ms", "broadcast per dtype ms"],
               [[f"{r['bytes'] / MiB:.1f}", str(int(r["tensors"])), f"{1e3 * r['make']:.0f}",
                 f"{1e3 * r['per_tensor']:.1f}", f"{1e3 * r['flat']:.1f}"]])
    if results.get("seconds"):
        print("\npart durations: " + ", ".join(f"{k} {v:.0f} s" for k, v in results["seconds"].items()))
        print("CPU probe before / after each part, ms of a fixed Python loop and the share of a second core two "
              "copies get (a shared host's speed drifts): " + ", ".join(
                  f"{k} {a[0]:.0f} ms {a[1]:.2f} / {b[0]:.0f} ms {b[1]:.2f}"
                  for k, (a, b) in results["cpu_probe"].items()))


def print_profile(path: str) -> None:
    import io
    import pstats

    out = io.StringIO()
    pstats.Stats(path, stream=out).sort_stats("cumulative").print_stats(r"megatron_po/(data|train/data)", 15)
    text = out.getvalue()
    print("\nrank 0's profile of the largest launch (megatron_po data functions, cumulative):")
    print(text[text.index("ncalls"):].rstrip() if "ncalls" in text else text)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="prep,launch,today,wait,bcast")
    p.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats (~5 min once generated)")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "megatron_po_bench_data",
                   help="generated data, indexes and runs (kept and reused by later runs)")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    p.add_argument("--nproc", type=int, default=2, help="ranks of each launch")
    p.add_argument("--prep-records", type=int, default=None, help="records of the preparation set (4096)")
    p.add_argument("--prep-repeats", type=int, default=None, help="prepare-data runs per worker count (3)")
    p.add_argument("--sizes", default=None, help="records of the launch sets (10000,100000,1000000)")
    p.add_argument("--distinct-images", type=int, default=10000, help="image files the larger sets share")
    p.add_argument("--launch-repeats", type=int, default=None, help="launches per size with an index (2)")
    p.add_argument("--prepare-limit-s", type=float, default=420.0,
                   help="skip a launch size whose prepare-data would take longer (from the last rate)")
    p.add_argument("--reuse-index", action="store_true",
                   help="skip prepare-data for a set an earlier run prepared (its time is then the earlier one)")
    p.add_argument("--today-sizes", default=None, help="records of the launches without an index (10000,100000)")
    p.add_argument("--today-limit-s", type=float, default=180.0,
                   help="skip a size whose launch without an index would read data longer than this")
    p.add_argument("--profile", action="store_true", help="cProfile rank 0 of one more launch at the largest size")
    p.add_argument("--wait-records", type=int, default=64)
    p.add_argument("--wait-images", type=int, default=48)
    p.add_argument("--wait-micro-batch", type=int, default=2, help="pairs per micro-batch")
    p.add_argument("--wait-global-batch", type=int, default=8, help="pairs per optimizer step (one rank)")
    p.add_argument("--wait-steps", type=int, default=None, help="steps per data_wait run (20)")
    p.add_argument("--ratio", type=float, default=4.0, help="stand-in step time S / inline preprocessing P")
    p.add_argument("--bcast-repeats", type=int, default=None, help="micro-batches timed (6; the first is warm-up)")
    args = p.parse_args()
    quick = args.quick
    args.prep_records = args.prep_records or (2048 if quick else 4096)
    args.prep_repeats = args.prep_repeats or (2 if quick else 3)
    args.sizes = [int(x) for x in (args.sizes or ("10000,100000" if quick else "10000,100000,1000000")).split(",")]
    args.today_sizes = [int(x) for x in (args.today_sizes or ("10000" if quick else "10000,100000")).split(",")]
    args.launch_repeats = args.launch_repeats or (1 if quick else 2)
    args.wait_steps = args.wait_steps or (6 if quick else 20)
    args.bcast_repeats = args.bcast_repeats or (3 if quick else 6)
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = set(parts) - {"prep", "launch", "today", "wait", "bcast"}
    if unknown:
        p.error(f"--parts: unknown {sorted(unknown)}")
    if args.wait_global_batch % args.wait_micro_batch:
        p.error("--wait-global-batch must be a multiple of --wait-micro-batch")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("megatron_po").setLevel(logging.ERROR)
    for name in ("transformers", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    args.work = args.work.resolve()
    data = args.work / "data"
    data.mkdir(parents=True, exist_ok=True)
    (args.work / "index").mkdir(exist_ok=True)

    results: dict = {"seconds": {}}
    t0 = time.perf_counter()
    texts = synthetic_texts(args.work, min(10000, max([args.prep_records, *args.sizes, *args.today_sizes])))
    tok = tokenizer_file(args.work, texts)
    need = 0
    if "prep" in parts:
        need = args.prep_records
    if {"launch", "today"} & set(parts):
        need = max(need, min(args.distinct_images, max([*args.sizes, *args.today_sizes])))
    images = write_images(data / "images", need, [(512, 384)] * need, seed=0) if need else []
    results["seconds"]["generate"] = time.perf_counter() - t0
    results["cpu_probe"] = {}
    for part, fn in (("prep", bench_prep), ("launch", bench_launch), ("today", bench_today), ("wait", bench_wait),
                     ("bcast", bench_bcast)):
        if part in parts:
            probe = cpu_probe()
            t0 = time.perf_counter()
            results[part] = (fn(data, tok, images, texts, args) if part in ("prep", "launch", "today")
                             else fn(args.work, texts, args))
            results["seconds"][part] = time.perf_counter() - t0
            results["cpu_probe"][part] = (probe, cpu_probe())
    print_tables(results, args)
    profiles = [r["profile"] for r in results.get("launch", []) if "profile" in r]
    if profiles:
        print_profile(profiles[0])
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) if isinstance(v, Path) else v
                                                  for k, v in vars(args).items()}, **results}, indent=1))
    return 0


def _child_main() -> int:
    """`bench_data.py --launch-child OUT [--profile-child] -- train overrides...` (under torchrun)."""
    argv = sys.argv[1:]
    out = Path(argv[1])
    profile = "--profile-child" in argv[:argv.index("--")]
    return launch_child(out, profile, argv[argv.index("--") + 1:])


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--launch-child":
        sys.exit(_child_main())
    sys.exit(main())
