"""The data path: can the shard loader feed the training step, and what does `prepare`
add to its face detector?

- loader: samples/s of ShardDataModule's training loader (tar read, JPEG decode, resize
  and crop, collate; its configured workers) over synthetic shards at the step's
  resolution, against the samples/s the SDXL training step of this run consumes. A ratio
  below 1 means the loader keeps the step fed.
- prepare: seconds per photo of `prepare` (read, checks, detection, alignment, encode,
  atomic writes, shard assembly) against its MTCNN detector alone on decoded arrays.
- prepare on 2 ranks vs 1 process: the detect+align phase's wall clock (manifest
  `this_run`, from every rank ready to every rank done; the start is reported apart) of
  `prepare --devices 2` (Lightning's DDP over gloo, one thread per rank) against one
  process with one thread, same photos; the note gives photos/s of both and the projection
  for the paper's 43M photos.
"""

from __future__ import annotations

import itertools
import os
import statistics
import tempfile
import time
from pathlib import Path

from faceclip_zoo.bench.context import Context
from faceclip_zoo.bench.harness import Row, compare, guarded


def write_shards(root: Path, ctx: Context) -> Path:
    from faceclip_zoo.synthetic.world import SyntheticSpec, generate, write_dataset

    s = ctx.size
    spec = SyntheticSpec(train_identities=max(1, s.data_samples // 8), val_identities=1, samples_per_identity=8,
                         guided_pairs=0, image_size=s.data_image, face_size=112)
    write_dataset(spec, generate(spec), root, shard_size=64)
    return root / "train"


def loader_row(ctx: Context) -> Row:
    from faceclip_zoo.data.datamodule import ShardDataModule

    s = ctx.size
    if "sdxl_step_per_sample" not in ctx.results:
        from faceclip_zoo.bench.diffusion import sdxl_row

        sdxl_row(ctx)
    with tempfile.TemporaryDirectory() as tmp:
        train = write_shards(Path(tmp) / "shards", ctx)
        dm = ShardDataModule(train=str(train), batch_size=s.sdxl_batch, num_workers=s.loader_workers,
                             image_size=s.data_image, face_size=112, shuffle_buffer=64)
        per_sample = []
        for _ in range(ctx.rounds + 1):  # the first pass warms the page cache and workers
            it = iter(dm.train_dataloader())
            first = next(it)
            t, n = time.perf_counter(), 0
            for batch in it:
                n += len(batch["caption"])
            per_sample.append((time.perf_counter() - t) / max(1, n) if n else float("nan"))
            del it, first
    loader = statistics.median(per_sample[1:])
    step = ctx.results["sdxl_step_per_sample"]
    return Row(f"data: shard loader ({s.loader_workers} workers, {s.data_image} px) vs the SDXL step's consumption",
               loader, step, unit="sample", goal="< 1 (the loader keeps up)",
               note="decode + resize/crop + collate")


def prepare_row(ctx: Context) -> Row:
    from faceclip_zoo.bench.prepare_photos import write_photos
    from faceclip_zoo.data.detect import build_detector
    from faceclip_zoo.data.images import load_image
    from faceclip_zoo.prepare import prepare

    s = ctx.size
    n = s.prepare_photos
    try:
        detector = build_detector("mtcnn")
    except Exception as exc:  # noqa: BLE001 (facenet-pytorch is installed apart; report, do not fail)
        return Row("data: prepare vs its detector alone", float("nan"), float("nan"), unit="photo",
                   note=f"skipped: {type(exc).__name__}: {exc}")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "in")
        os.makedirs(src)
        arrays = [load_image(p).rgb for p in write_photos(src, n, s.prepare_side)]
        outs = (os.path.join(tmp, f"out{i}") for i in itertools.count())

        def detect_all():
            return lambda: [detector.detect(a) for a in arrays]

        def prepare_all():
            def run():
                manifest = prepare(src, next(outs), detector="mtcnn", workers=1, progress=False)
                if manifest["counts"]["accepted"] != n:
                    raise RuntimeError(f"prepare accepted {manifest['counts']} of {n} photos")
            return run

        ours, alone = compare(prepare_all, detect_all, ctx.device, warmup=1, repeats=min(ctx.repeats, 3), rounds=1)
    return Row(f"data: prepare vs its MTCNN detector alone, {n} photos of {s.prepare_side} px",
               ours.median / n, alone.median / n, unit="photo",
               note="read + detect + align + write + assemble; the ratio is the pipeline's overhead")


PAPER_PHOTOS = 43_000_000  # the paper's training set


def scale_row(ctx: Context) -> Row:
    import json
    import subprocess
    import sys

    import torch

    from faceclip_zoo.bench.prepare_photos import write_photos
    from faceclip_zoo.prepare import prepare

    s = ctx.size
    n = 4 * s.prepare_photos
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "in")
        os.makedirs(src)
        write_photos(src, n, s.prepare_side)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            one = prepare(src, os.path.join(tmp, "one"), detector="mtcnn", progress=False)
        finally:
            torch.set_num_threads(threads)
        # Lightning's launcher re-runs the command line in each rank: a command of its own
        res = subprocess.run([sys.executable, "-m", "faceclip_zoo", "prepare", "--input", src, "--out",
                              os.path.join(tmp, "two"), "--detector", "mtcnn", "--devices", "2", "--progress", "false"],
                             env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=3600)
        if res.returncode:
            raise RuntimeError(f"prepare --devices 2 failed: {res.stderr[-1000:]}")
        with open(os.path.join(tmp, "two", "manifest.json")) as f:
            two = json.load(f)
    for m in (one, two):
        if m["counts"]["accepted"] != n:
            raise RuntimeError(f"prepare accepted {m['counts']} of {n} photos")
    t1, t2 = one["this_run"]["detect_align_seconds"], two["this_run"]["detect_align_seconds"]
    start = two["this_run"]["start_seconds"]
    rate1, rate2 = n / t1, n / t2
    days = PAPER_PHOTOS / rate1 / 86400
    ctx.results["prepare_photos_per_second"] = {"1": rate1, "2": rate2}
    return Row(f"data: prepare on 2 ranks (DDP, gloo) vs 1 process, {n} photos of {s.prepare_side} px",
               t2 / n, t1 / n, unit="photo", goal="0.5 = linear scaling",
               note=f"{rate1:.2f} vs {rate2:.2f} photos/s once the ranks are up (starting them: {start:.1f} s); "
                    f"projection, 43M photos at the 1-process rate: {days:.0f} process-days (divide by the "
                    "number of processes at linear scaling)")


def run(ctx: Context) -> list[Row]:
    return (guarded("data: loader vs step consumption", loader_row, ctx)
            + guarded("data: prepare vs its detector", prepare_row, ctx)
            + guarded("data: prepare on 2 ranks vs 1", scale_row, ctx))

