"""`python -m faceclip_zoo prepare`: real photo collections -> faceclip_zoo shards.

    python -m faceclip_zoo prepare --input photos/ --out data/my-shards
    python -m faceclip_zoo prepare --config recipes/prepare/default.yaml --input people.jsonl --out ...

Two phases, so that a run can be killed at any moment and re-run:
1. per input (parallel across processes): read, check, detect, filter, align; the result
   (accepted: aligned 448 face + resized photo + metadata; rejected: reason) is written
   to <out>/.work/ atomically, one item per input. A re-run skips items already there
   (unless the input file changed since).
2. assemble (deterministic, from the work items in input order): drop byte-identical
   duplicates, choose each sample's reference face (another photo of the same person when
   there is one: SPSV), write shard-NNNNN.tar, rejects.jsonl and manifest.json, each
   through a temporary file and a rename. manifest.json is written last.
accepted + rejected = inputs, always; every rejected input is a line of rejects.jsonl
with its reason.

WebDataset shards as input (img2dataset's output, the input at web scale) take another
road with the same per-photo code: one output shard per input shard, resumable per shard,
ranks writing their own shards, a merged manifest (faceclip_zoo.data.prepare_shards).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Literal, Optional

from faceclip_zoo.data.prepare_inputs import Record, read_inputs
# phase 1 lives in prepare_items (the distributed task imports it from there)
from faceclip_zoo.data.prepare_items import Filters, init_detector, pending, process_record
from faceclip_zoo.data.prepare_shards import input_shards, is_shard_input
from faceclip_zoo.utils import UserError, atomic_write_bytes, check_output_folder, require_at_least

__all__ = ["Filters", "assemble", "init_detector", "pending", "prepare", "process_record"]


def _run_phase1(todo: list[Record], work: str, filters: Filters, face_size: int, max_image_side: int,
                workers: int, detector: str, detector_model_dir: str | None, progress: bool,
                device: str = "cpu") -> None:
    from tqdm import tqdm

    bar = tqdm(total=len(todo), unit="img", desc="detect+align", disable=not progress, smoothing=0.1)
    args = (work, filters, face_size, max_image_side)
    if workers <= 1:
        import torch

        init_detector(detector, detector_model_dir, threads=torch.get_num_threads(), device=device)  # caller's threads
        for r in todo:
            process_record(r, *args)
            bar.update()
    else:
        import multiprocessing as mp

        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=init_detector,
                                 initargs=(detector, detector_model_dir, 1, device)) as pool:
            for fut in as_completed([pool.submit(process_record, r, *args) for r in todo]):
                fut.result()
                bar.update()
    bar.close()


def run_distributed(task, items: list, devices: int, num_nodes: int, progress: bool, batch_size: int,
                    accelerator: str = "cpu") -> bool:
    """A predict task over `items` split across devices x num_nodes ranks (DDP; gloo on CPU,
    Lightning's launchers); True on rank 0, after every rank has finished."""
    import lightning as L

    from faceclip_zoo.data.prepare_share import InputShare

    trainer = L.Trainer(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy="ddp", logger=False,
                        enable_checkpointing=False, enable_progress_bar=progress, enable_model_summary=False,
                        use_distributed_sampler=False)
    trainer.predict(task, datamodule=InputShare(items, batch_size), return_predictions=False)
    trainer.strategy.barrier("prepare_phase1")  # every rank's outputs are written
    return trainer.global_rank == 0


# ---------------------------------------------------------------- phase 2: assemble
def _read(work: str, name: str) -> bytes:
    with open(os.path.join(work, name), "rb") as f:
        return f.read()


def _choose_references(accepted: list[dict]) -> dict[str, tuple[str, str]]:
    """sample key -> (work file of its reference face, where it came from). SPSV: another
    photo of the same person when the identity has one (the next one, cyclically, so each
    photo also serves once as someone's reference), else the photo's own face."""
    by_identity: dict[str, list[dict]] = defaultdict(list)
    for item in accepted:
        if item.get("identity"):
            by_identity[item["identity"]].append(item)
    chosen = {}
    for item in accepted:
        if item["kind"] != "sample":
            continue
        if "reference_sha256" in item:
            chosen[item["key"]] = (f"{item['key']}.ref.png", "explicit")
            continue
        group = by_identity.get(item.get("identity") or "", [])
        others = [g for g in group if g["key"] != item["key"] and g.get("sha256") != item.get("sha256")]
        if others:
            # the next photo of the person after this one, cyclically
            chosen[item["key"]] = (f"{(pick := others[group.index(item) % len(others)])['key']}.face.png",
                                   pick["source"])
        else:
            chosen[item["key"]] = (f"{item['key']}.face.png", "self")
    return chosen


def assemble(records: list[Record], out: str, work: str, samples_per_shard: int, manifest_extra: dict) -> dict:
    from faceclip_zoo.data.schema import make_sample
    import webdataset as wds

    results = []
    for r in records:
        with open(os.path.join(work, f"{r.key}.json"), "rb") as f:
            results.append(json.load(f))
    first_of: dict[str, str] = {}
    for item in results:  # byte-identical inputs: the first one (input order) stays
        if item["status"] == "accepted":
            if item["sha256"] in first_of:
                item.update(status="rejected", reason="duplicate", detail=f"{item['source']}: same bytes as "
                            f"{first_of[item['sha256']]}")
            else:
                first_of[item["sha256"]] = item["source"]
    accepted = [i for i in results if i["status"] == "accepted"]
    references = _choose_references(accepted)
    samples = [i for i in accepted if i["kind"] == "sample"]

    shard_names = []
    for start in range(0, len(samples), samples_per_shard):
        name = f"shard-{len(shard_names):05d}.tar"
        tmp = os.path.join(out, name + ".tmp")
        with wds.TarWriter(tmp, mtime=0) as sink:  # fixed mtime: a re-run writes identical bytes
            for item in samples[start:start + samples_per_shard]:
                ref_file, ref_source = references[item["key"]]
                meta = {k: item[k] for k in ("source", "sha256", "original_size", "score", "box", "landmarks",
                                             "pose", "sharpness", "num_faces")}
                meta["reference_source"] = ref_source
                clip = None
                if "frames" in item:  # a video: its sampled frames, as one strip
                    meta.update({k: item[k] for k in ("source_frames", "fps", "frame_indices")})
                    clip = (_read(work, f"{item['key']}.video.jpg"), item["frames"])
                sink.write(make_sample(item["key"], _read(work, f"{item['key']}.image.jpg"), item["caption"],
                                       reference=_read(work, ref_file), identity=item.get("identity"),
                                       meta=meta, image_format="jpg", frames=clip))
        os.replace(tmp, os.path.join(out, name))
        shard_names.append(name)
    for stale in os.listdir(out):  # shards of an earlier, larger run of the same output
        if stale.startswith("shard-") and stale.endswith(".tar") and stale not in shard_names:
            os.remove(os.path.join(out, stale))

    rejected = [i for i in results if i["status"] == "rejected"]
    atomic_write_bytes(os.path.join(out, "rejects.jsonl"), "".join(
        json.dumps({"source": i["source"], "kind": i["kind"], "reason": i["reason"], "detail": i["detail"]},
                   ensure_ascii=False) + "\n" for i in rejected).encode("utf-8"))

    def counts(kind: str) -> dict:
        mine = [i for i in results if i["kind"] == kind]
        return {"inputs": len(mine), "accepted": sum(i["status"] == "accepted" for i in mine),
                "rejected": sum(i["status"] == "rejected" for i in mine),
                "rejected_by_reason": dict(sorted(Counter(i["reason"] for i in mine
                                                          if i["status"] == "rejected").items()))}

    manifest = {
        "format": "faceclip_zoo shards v1 (see faceclip_zoo/data/schema.py)",
        "counts": counts("sample"), "references": counts("reference"),
        "identities": dict(sorted(Counter(i["identity"] for i in samples if i.get("identity")).items())),
        "shards": shard_names,
        "sources": {i["key"]: {"source": i["source"], "sha256": i["sha256"]} for i in samples},
        **manifest_extra,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    atomic_write_bytes(os.path.join(out, "manifest.json"),
                       json.dumps(manifest, indent=1, ensure_ascii=False).encode("utf-8"))
    return manifest


def _remove_debris(*folders: str) -> None:
    """Temporary files of a killed run (one run per output folder at a time)."""
    for folder in folders:
        for name in os.listdir(folder):
            if (name.endswith(".tmp") or ".tmp-" in name) and os.path.isfile(os.path.join(folder, name)):
                os.remove(os.path.join(folder, name))


def _versions() -> dict:
    from faceclip_zoo.data.detect import package_version

    return {p: package_version(p) for p in ("faceclip_zoo", "torch", "insightface", "facenet-pytorch",
                                      "opencv-python", "pillow", "numpy")}


def prepare(
    input: str,
    out: str,
    references: Optional[str] = None,
    identity_from_folder: bool = False,
    image_column: str = "image",
    caption_column: str = "caption",
    identity_column: str = "identity",
    reference_column: str = "reference",
    detector: str = "auto",
    detector_model_dir: Optional[str] = None,
    filters: Filters = Filters(),
    face_size: int = 448,
    max_image_side: int = 1536,
    samples_per_shard: int = 1000,
    workers: int = 1,
    devices: int = 1,
    num_nodes: int = 1,
    detector_device: Literal["cpu", "cuda"] = "cpu",
    detect_batch_size: int = 1,
    decode_workers: int = 0,
    progress: bool = True,
) -> dict:
    """Turn photos with captions into faceclip_zoo shards (see the module docstring).

    Args:
        input: a folder of photos with same-name .txt captions, a .jsonl/.csv/.parquet table,
            or WebDataset shards as img2dataset writes them (a folder of .tar files, one .tar,
            or a brace pattern "dl/{00000..00999}.tar"): each input shard becomes one output
            shard, read as a stream (faceclip_zoo.data.prepare_shards).
        out: output folder (shards, rejects.jsonl, manifest.json; .work/ holds resumable state).
        references: optional folder <identity>/<photo> of extra reference photos per person.
        identity_from_folder: a photo's parent folder names its person (folder input).
        detector: mtcnn | insightface | auto (insightface when detector_model_dir has a model pack).
        detector_model_dir: insightface model pack folder (e.g. a copy of buffalo_l).
        face_size: aligned reference crop size (the release uses 448).
        max_image_side: target photos larger than this are downscaled (longer side).
        samples_per_shard: samples per tar file (folder and table input; shard input keeps
            its shards' sizes).
        workers: processes for detection and alignment (one machine, a process pool).
        devices, num_nodes: run detection and alignment as Lightning's predict loop on
            devices x num_nodes processes (DDP over gloo), launched like `fit`: directly
            (`--devices 4`: Lightning starts the other processes), under torchrun or SLURM
            (recipes/launch); the inputs are split deterministically over the ranks (photos for
            folders and tables, whole shards for shard input). Folder / table input: rank 0
            assembles the shards once all are done; shard input: each rank writes the output
            shards and rejects of its input shards, rank 0 merges the manifests. A re-run
            redoes only unfinished inputs.
        detector_device: where the face detector runs: cpu (default), or cuda (each rank on
            its own GPU: Lightning's cuda:<local rank>; insightface needs onnxruntime-gpu).
        detect_batch_size: shard input: photos per detector call (> 1 batches same-size
            photos: what a GPU wants; 1 detects photo by photo, as for folders).
        decode_workers: shard input: DataLoader worker processes that read and decode the
            photos beside the detector (0: in the detecting process).
    """
    require_at_least({"--samples_per_shard": (samples_per_shard, 1), "--workers": (workers, 0),
                      "--devices": (devices, 1), "--num_nodes": (num_nodes, 1),
                      "--detect_batch_size": (detect_batch_size, 1), "--decode_workers": (decode_workers, 0),
                      "--max_image_side": (max_image_side, 16), "--face_size": (face_size, 112)})
    if face_size % 112:
        raise UserError(f"face_size must be a multiple of 112 (ArcFace template), got {face_size}")
    check_output_folder(out, "--out", overwrite=True)  # an existing --out is resumed, never cleared
    if devices * num_nodes > 1 and workers > 1:
        raise UserError("give either workers (a process pool on this machine) or devices / num_nodes "
                        "(Lightning's processes, any number of machines), not both")
    options = {"filters": vars(filters), "face_size": face_size, "max_image_side": max_image_side,
               "identity_from_folder": identity_from_folder, "input": os.path.abspath(input),
               "references": os.path.abspath(references) if references else None}
    if is_shard_input(input):
        if references or identity_from_folder:
            raise UserError(f"{input}: shard input names identities in each sample's json (`identity`); "
                            "references / identity_from_folder apply to folders and tables")
        return _prepare_shards(input, out, filters, face_size, max_image_side, workers, devices, num_nodes,
                               detector, detector_model_dir, progress, options,
                               dict(detect_batch_size=detect_batch_size, decode_workers=decode_workers),
                               detector_device)
    records = read_inputs(input, references, identity_from_folder, image_column=image_column,
                          caption_column=caption_column, identity_column=identity_column,
                          reference_column=reference_column)
    work = os.path.join(out, ".work")
    os.makedirs(work, exist_ok=True)
    _remove_debris(out, work)
    started = time.perf_counter()
    if devices * num_nodes > 1:
        import torch

        from faceclip_zoo.tasks.prepare import PrepareTask

        task = PrepareTask(work, filters, face_size, max_image_side, detector, detector_model_dir,
                           threads=torch.get_num_threads())
        if not run_distributed(task, records, devices, num_nodes, progress, batch_size=8,
                               accelerator=detector_device):
            return {}  # not rank 0: rank 0 assembles
    else:
        todo = pending(records, work)
        _run_phase1(todo, work, filters, face_size, max_image_side, workers, detector, detector_model_dir, progress,
                    detector_device)
    run = _this_run(started, devices * num_nodes if devices * num_nodes > 1 else workers)
    return assemble(records, out, work, samples_per_shard, _manifest_extra(detector, detector_model_dir, options, run))


def _this_run(started: float, processes: int) -> dict:
    """What this run (not the collection) cost, wall clock on rank 0, for `bench` and for
    sizing a cluster job: starting the processes and their detectors (until every rank is
    ready), then detecting and aligning (until every rank is done)."""
    from faceclip_zoo.data.prepare_items import ready_at

    now = time.perf_counter()
    ready = ready_at() if started <= ready_at() <= now else started  # a process pool: counted as work
    return {"processes": processes, "start_seconds": round(ready - started, 3),
            "detect_align_seconds": round(now - ready, 3)}


def _manifest_extra(detector: str, detector_model_dir: str | None, options: dict, run: dict) -> dict:
    from faceclip_zoo.data.detect import build_detector

    describe = build_detector(detector, model_dir=detector_model_dir).describe()
    return {"detector": describe, "versions": _versions(), "options": options, "this_run": run}


def _prepare_shards(input: str, out: str, filters: Filters, face_size: int, max_image_side: int, workers: int,
                    devices: int, num_nodes: int, detector: str, detector_model_dir: str | None, progress: bool,
                    options: dict, pipeline: dict, detector_device: str) -> dict:
    """WebDataset / img2dataset shards in: one output shard per input shard, per-shard
    parts, then the merged manifest (faceclip_zoo.data.prepare_shards)."""
    from faceclip_zoo.data.prepare_shards import PARTS, merge_parts, run_shards

    inputs = input_shards(input)
    os.makedirs(os.path.join(out, PARTS), exist_ok=True)
    _remove_debris(out, os.path.join(out, PARTS))
    started = time.perf_counter()
    if devices * num_nodes > 1:
        import torch

        from faceclip_zoo.tasks.prepare import PrepareShardsTask

        task = PrepareShardsTask(out, filters, face_size, max_image_side, detector, detector_model_dir,
                                 threads=torch.get_num_threads(), **pipeline)
        if not run_distributed(task, inputs, devices, num_nodes, progress, batch_size=1, accelerator=detector_device):
            return {}  # not rank 0: rank 0 merges
    else:
        run_shards(inputs, out, filters, face_size, max_image_side, workers, detector, detector_model_dir, progress,
                   device="cuda" if detector_device == "cuda" else "cpu", **pipeline)
    run = _this_run(started, devices * num_nodes if devices * num_nodes > 1 else workers)
    return merge_parts(inputs, out, _manifest_extra(detector, detector_model_dir, options, run))
