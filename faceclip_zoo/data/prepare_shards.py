"""`prepare` over WebDataset shards, as img2dataset writes them: the input at web scale.

    python -m faceclip_zoo prepare --input downloads/ --out data/shards            # a folder of NNNNN.tar
    python -m faceclip_zoo prepare --input "downloads/{00000..04299}.tar" --out ... --devices 8 --num_nodes 4

An img2dataset shard holds `<key>.jpg`, `<key>.txt` (caption) and `<key>.json` (url, status,
sizes, ...) per downloaded image, with `<shard>.parquet` beside it listing every row it tried,
downloaded or not. Each input shard is read as a stream (tarfile's "r|" mode: members in
order, never a listing of the shard, let alone of the collection) and becomes one output
shard of the same name, `shard-<name>.tar`, plus its part of the rejects and its counts in
`parts/<name>.json`, written last: its presence means that input is done. So the unit of
work, of splitting over ranks (every world_size-th input shard from the rank) and of
resuming is the shard; a re-run skips shards whose part is there and whose input is
unchanged, and a merge step writes manifest.json (counts, per-identity counts, rejects by
reason, download failures from the parquet indexes) and rejects.jsonl from the parts.

Web images rarely name their person: a sample's reference face is another photo of the
same identity in the same shard when its json gives an `identity`, else its own face.
Byte-identical duplicates are rejected within a shard (not across shards).
"""

from __future__ import annotations

import glob
import heapq
import itertools
import json
import os
import tarfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Iterator

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from faceclip_zoo.data.images import ImageRejected, decode_image
from faceclip_zoo.data.prepare_inputs import _check_caption
from faceclip_zoo.data.prepare_items import Filters, encode_image_bytes, face_of_image
from faceclip_zoo.utils import UserError, atomic_write_bytes

IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")
PARTS = "parts"


def is_shard_input(input: str) -> bool:
    """A .tar file, a brace pattern of them, or a folder that holds .tar files and no photos."""
    if input.endswith(".tar") or ("{" in input and ".tar" in input):
        return True
    if os.path.isdir(input):
        with os.scandir(input) as entries:
            names = [e.name.lower() for e in entries if _is_file(e)]
        return any(n.endswith(".tar") for n in names) and not any(
            n.endswith((".jpg", ".jpeg", ".png", ".webp")) for n in names)
    return False


def _is_file(entry: os.DirEntry) -> bool:
    try:
        return entry.is_file()
    except OSError:  # a link loop: not a shard; prepare counts it as an unreadable photo
        return False


def input_shards(input: str) -> list[str]:
    """The input shards in order: a folder's *.tar (sorted; one level, as img2dataset writes),
    one .tar, or a brace pattern ("dl/{00000..00099}.tar")."""
    if "{" in input:
        from braceexpand import braceexpand

        paths = list(braceexpand(input))
    elif os.path.isdir(input):
        paths = sorted(glob.glob(os.path.join(input, "*.tar")))
    else:
        paths = [input]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise UserError(f"input shard not found: {missing[0]}" + (f" (and {len(missing) - 1} more)"
                                                                  if len(missing) > 1 else ""))
    if not paths:
        raise UserError(f"{input}: no .tar shards found")
    names = [shard_name(p) for p in paths]
    twice = [n for n, c in Counter(names).items() if c > 1]
    if twice:
        raise UserError(f"two input shards are both named {twice[0]}.tar: outputs are named after their inputs, "
                        "so give shards of one collection (or rename them)")
    return [os.path.abspath(p) for p in paths]


def shard_name(path: str) -> str:
    return os.path.basename(path)[:-len(".tar")] if path.endswith(".tar") else os.path.basename(path)


@dataclass
class TarSample:
    key: str
    files: dict[str, bytes] = field(default_factory=dict)  # member extension -> bytes


def stream_samples(path: str) -> Iterator[TarSample | ImageRejected]:
    """The samples of one shard in member order (WebDataset grouping: consecutive members
    sharing the part of the name before the first dot). A shard that ends early yields,
    after the samples read, one ImageRejected naming where it broke."""
    current: TarSample | None = None
    try:
        with tarfile.open(path, "r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = os.path.basename(member.name)
                key, _, ext = base.partition(".")
                key = os.path.join(os.path.dirname(member.name), key)
                if current is not None and key != current.key:
                    yield current
                    current = None
                if current is None:
                    current = TarSample(key)
                current.files[ext.lower()] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        if current is not None:
            current = None  # its members may be incomplete: reported with the shard's damage
        yield ImageRejected("unreadable_shard", f"{path}: the tar breaks off ({type(exc).__name__}: {exc}); "
                                                "samples after this point were not read")
    if current is not None:
        yield current


def _meta_json(sample: TarSample) -> dict:
    raw = sample.files.get("json")
    if raw is None:
        return {}
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def decode_sample(index: int, sample: TarSample, where: str, filters: Filters) -> dict:
    """Stage 1 (a DataLoader worker when decode_workers > 0): the sample's json, caption and
    image bytes -> the decoded photo, or the sample's rejection."""
    meta = _meta_json(sample)
    identity = meta.get("identity")
    item = {"index": index, "key": sample.key, "source": where, "kind": "sample", "url": meta.get("url"),
            "identity": str(identity) if identity else None, "loaded": None}
    try:
        ext = next((e for e in IMAGE_MEMBERS if e in sample.files), None)
        if ext is None:
            raise ImageRejected("missing_image", f"{where}: no image member ({', '.join(IMAGE_MEMBERS)}) in the "
                                                 f"sample (members: {', '.join(sorted(sample.files))})")
        caption, error = _check_caption(sample.files.get("txt", meta.get("caption")), where)
        if error:
            raise ImageRejected(*error)
        item.update(caption=caption, image_name=f"{where}.{ext}",
                    loaded=decode_image(sample.files[ext], f"{where}.{ext}", filters.max_pixels,
                                        filters.min_image_size))
    except ImageRejected as exc:
        item.update(status="rejected", reason=exc.reason, detail=exc.detail)
    except Exception as exc:  # a library failing on a strange image must not end the run
        item.update(status="rejected", reason="processing_error", detail=f"{where}: {type(exc).__name__}: {exc}")
    return item


def finish_sample(item: dict, faces: list | None, filters: Filters, face_size: int, max_image_side: int) -> dict:
    """Stage 3: pick the face among the detected ones (detected here when `faces` is None),
    filter, align, encode -> the accepted result (photo and face in memory) or a rejection."""
    loaded = item.pop("loaded")
    if loaded is None:
        return item
    try:
        rgb, facts, aligned = face_of_image(loaded, item["image_name"], filters, face_size, faces)
        item.update(status="accepted", **facts, face_png=encode_image_bytes(aligned.crop, "png"),
                    image_jpg=encode_image_bytes(rgb, "jpg", max_image_side))
    except ImageRejected as exc:
        item.update(status="rejected", reason=exc.reason, detail=exc.detail)
    except Exception as exc:  # a library failing on a strange image must not end the run
        item.update(status="rejected", reason="processing_error",
                    detail=f"{item['source']}: {type(exc).__name__}: {exc}")
    return item


class ShardDecoder(IterableDataset):
    """One input shard's samples, decoded (stage 1), for a DataLoader: every worker reads
    the tar stream and decodes every num_workers-th sample, so JPEG decoding runs beside
    the detector. Items carry their index; a broken tar is reported by worker 0 alone."""

    def __init__(self, src: str, filters: Filters):
        self.src, self.filters = src, filters

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        name = shard_name(self.src)
        for index, sample in enumerate(stream_samples(self.src)):
            if isinstance(sample, ImageRejected):
                if worker == 0:
                    yield {"index": index, "key": None, "source": f"{name}.tar", "kind": "shard",
                           "status": "rejected", "reason": sample.reason, "detail": sample.detail, "loaded": None}
            elif index % workers == worker:
                yield decode_sample(index, sample, f"{name}.tar:{sample.key}", self.filters)


def decoded_in_order(src: str, filters: Filters, workers: int) -> Iterator[dict]:
    """Stage 1 of a shard, in input order whatever the number of decoding workers."""
    dataset = ShardDecoder(src, filters)
    if workers <= 0:
        yield from dataset
        return
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, collate_fn=lambda x: x)
    pending, expected = [], 0
    for item in loader:  # the workers' items arrive round-robin; a small heap restores the order
        heapq.heappush(pending, (item["index"], id(item), item))
        while pending and pending[0][0] == expected:
            yield heapq.heappop(pending)[2]
            expected += 1
    while pending:
        yield heapq.heappop(pending)[2]


def processed(src: str, filters: Filters, face_size: int, max_image_side: int, batch_size: int = 1,
              decode_workers: int = 0) -> Iterator[dict]:
    """Every sample of one shard through decode -> detect -> align, in input order. With
    batch_size > 1 the detector sees batch_size photos per call (detect_batch: what an
    accelerator wants); 1 detects photo by photo, as for folders."""
    from faceclip_zoo.data.prepare_items import detector

    items = decoded_in_order(src, filters, decode_workers)
    while True:
        batch = list(itertools.islice(items, max(1, batch_size)))
        if not batch:
            return
        ready = [i for i in batch if i["loaded"] is not None]
        if batch_size > 1 and ready:
            found = dict(zip((id(i) for i in ready), detector().detect_batch([i["loaded"].rgb for i in ready])))
        else:
            found = {}
        for item in batch:
            yield finish_sample(item, found.get(id(item)), filters, face_size, max_image_side)


def _stamp(path: str) -> list:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def part_path(out: str, src: str) -> str:
    return os.path.join(out, PARTS, f"{shard_name(src)}.json")


def shard_done(src: str, out: str) -> bool:
    try:
        with open(part_path(out, src), "rb") as f:
            return json.load(f).get("stamp") == _stamp(src)
    except (OSError, ValueError):
        return False


def _write(sink, item: dict, ref: dict) -> None:
    from faceclip_zoo.data.schema import make_sample

    meta = {k: item[k] for k in ("source", "url", "sha256", "original_size", "score", "box", "landmarks",
                                 "pose", "sharpness", "num_faces")}
    meta["reference_source"] = "self" if ref is item else ref["source"]
    sink.write(make_sample(item["key"], item["image_jpg"], item["caption"], reference=ref["face_png"],
                           identity=item["identity"], meta=meta, image_format="jpg"))


def prepare_shard(src: str, out: str, filters: Filters, face_size: int, max_image_side: int,
                  batch_size: int = 1, decode_workers: int = 0) -> dict:
    """One input shard -> shard-<name>.tar, parts/<name>.rejects.jsonl, then parts/<name>.json.
    Streaming: a sample without an identity is written as soon as it is aligned (its own
    face is its reference); those naming an identity wait for the end of the shard, where
    each gets another photo of its person as reference (SPSV). The output is the same for
    any decode_workers (input order is kept); batch_size > 1 may move landmarks by float
    rounding of the batched detector (about 1e-5 px for MTCNN)."""
    import webdataset as wds

    name = shard_name(src)
    seen_keys, first_of, held = set(), {}, []
    accepted, rejected, identities, sources = 0, [], Counter(), {}
    tmp = os.path.join(out, f"shard-{name}.tar.tmp")
    with wds.TarWriter(tmp, mtime=0) as sink:  # fixed mtime: the same input gives the same bytes
        for item in processed(src, filters, face_size, max_image_side, batch_size, decode_workers):
            if item["kind"] == "sample" and item["key"] in seen_keys:  # a second sample of one key would
                item = {**item, "status": "rejected", "reason": "duplicate_key",  # overwrite the first
                        "detail": f"{item['source']}: the key is used twice in this shard"}
            elif item["kind"] == "sample":
                seen_keys.add(item["key"])
            if item["status"] == "accepted" and item["sha256"] in first_of:  # byte-identical: the first stays
                item = {**item, "status": "rejected", "reason": "duplicate",
                        "detail": f"{item['source']}: same bytes as {first_of[item['sha256']]}"}
            if item["status"] != "accepted":
                rejected.append({k: item[k] for k in ("source", "kind", "reason", "detail")})
                continue
            first_of[item["sha256"]] = item["source"]
            accepted += 1
            sources[item["key"]] = {"source": item["source"], "sha256": item["sha256"]}
            if item["identity"]:
                identities[item["identity"]] += 1
                held.append(item)
            else:
                _write(sink, item, item)
        by_identity: dict[str, list[dict]] = defaultdict(list)
        for item in held:
            by_identity[item["identity"]].append(item)
        for item in held:  # the next photo of the same person, cyclically
            group = by_identity[item["identity"]]
            others = [g for g in group if g is not item]
            _write(sink, item, others[group.index(item) % len(others)] if others else item)
    os.replace(tmp, os.path.join(out, f"shard-{name}.tar"))

    os.makedirs(os.path.join(out, PARTS), exist_ok=True)
    atomic_write_bytes(os.path.join(out, PARTS, f"{name}.rejects.jsonl"), "".join(
        json.dumps(r, ensure_ascii=False) + "\n" for r in rejected).encode("utf-8"))
    samples_rejected = sum(r["kind"] == "sample" for r in rejected)
    part = {"input": src, "stamp": _stamp(src), "shard": f"shard-{name}.tar",
            "counts": {"inputs": accepted + samples_rejected, "accepted": accepted, "rejected": samples_rejected},
            "rejected_by_reason": dict(sorted(Counter(r["reason"] for r in rejected).items())),
            "identities": dict(sorted(identities.items())), "sources": sources}
    atomic_write_bytes(part_path(out, src), json.dumps(part, ensure_ascii=False).encode("utf-8"))
    return part["counts"]


def download_failures(src: str) -> Counter:
    """Rows img2dataset tried but did not store (its <shard>.parquet beside the tar), by status."""
    index = src[:-len(".tar")] + ".parquet"
    if not os.path.isfile(index):
        return Counter()
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(index, columns=["status"])
    except Exception:  # not img2dataset's index: nothing to report
        return Counter()
    return Counter(s for s in table.column("status").to_pylist() if s != "success")


def merge_parts(inputs: list[str], out: str, manifest_extra: dict) -> dict:
    """manifest.json and rejects.jsonl of the whole run, from every input's part."""
    import time

    counts, reasons, identities, downloads = Counter(), Counter(), Counter(), Counter()
    shards, sources, rejects = [], {}, []
    for src in inputs:
        with open(part_path(out, src), "rb") as f:
            part = json.load(f)
        counts.update(part["counts"])
        reasons.update(part["rejected_by_reason"])
        identities.update(part["identities"])
        shards.append(part["shard"])
        sources.update(part["sources"])
        with open(os.path.join(out, PARTS, f"{shard_name(src)}.rejects.jsonl"), "rb") as f:
            rejects.append(f.read())
        downloads.update(download_failures(src))
    atomic_write_bytes(os.path.join(out, "rejects.jsonl"), b"".join(rejects))
    manifest = {
        "format": "faceclip_zoo shards v1 (see faceclip_zoo/data/schema.py)",
        "input_format": "webdataset shards (img2dataset layout)",
        "counts": {"inputs": counts["inputs"], "accepted": counts["accepted"], "rejected": counts["rejected"],
                   "rejected_by_reason": dict(sorted(reasons.items()))},
        "not_downloaded": {"total": sum(downloads.values()), "by_status": dict(sorted(downloads.items()))},
        "identities": dict(sorted(identities.items())),
        "shards": shards,
        "sources": sources,
        **manifest_extra,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    atomic_write_bytes(os.path.join(out, "manifest.json"),
                       json.dumps(manifest, indent=1, ensure_ascii=False).encode("utf-8"))
    return manifest


def run_shards(inputs: list[str], out: str, filters: Filters, face_size: int, max_image_side: int, workers: int,
               detector: str, detector_model_dir: str | None, progress: bool, detect_batch_size: int = 1,
               decode_workers: int = 0, device: str = "cpu") -> None:
    """The input shards no earlier run finished, on this machine: in this process, or one
    shard per task on a process pool of `workers`."""
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from tqdm import tqdm

    from faceclip_zoo.data.prepare_items import init_detector

    todo = [s for s in inputs if not shard_done(s, out)]
    bar = tqdm(total=len(todo), unit="shard", desc="detect+align", disable=not progress)
    args = (out, filters, face_size, max_image_side, detect_batch_size, decode_workers)
    if workers <= 1 or len(todo) <= 1:
        import torch

        init_detector(detector, detector_model_dir, threads=torch.get_num_threads(), device=device)
        for src in todo:
            prepare_shard(src, *args)
            bar.update()
    else:
        import multiprocessing as mp

        with ProcessPoolExecutor(min(workers, len(todo)), mp_context=mp.get_context("spawn"),
                                 initializer=init_detector, initargs=(detector, detector_model_dir, 1, device)) as pool:
            for fut in as_completed([pool.submit(prepare_shard, s, *args) for s in todo]):
                fut.result()
                bar.update()
    bar.close()
