"""The data commands beside the real-size runs: `prepare`'s batched MTCNN and `cache` on the
run's device, at the production recipes' resolution.

- prepare: photos/s of `prepare` over img2dataset-style input shards (the path that batches
  same-size photos per detector call), at detect_batch_size 1 and a larger batch, the
  detector on the run's device (`--detector_device cuda` on a GPU); rate = accepted photos
  over the detect-and-align wall clock the manifest records (`this_run`).
- cache: samples/s of `cache` computing the SDXL LoRA recipe's frozen features (VAE
  latents at 1024 px, both encoders' conditioning) into the shards `prepare` just wrote,
  with the run's fit config (so on a CPU in float32, as the fit); the seconds `cache`
  reports exclude loading the model.
"""

from __future__ import annotations

import io
import json
from pathlib import Path


def write_input_shards(folder: Path, photos: int, side: int, per_shard: int = 16) -> Path:
    """img2dataset's layout (`<key>.jpg`, `<key>.txt` per sample) from real photos."""
    import webdataset as wds

    from faceclip_zoo.bench.prepare_photos import write_photos

    raw = folder / "photos"
    raw.mkdir(parents=True, exist_ok=True)
    paths = write_photos(str(raw), photos, side)
    out = folder / "input"
    out.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(paths), per_shard):
        with wds.TarWriter(str(out / f"{start // per_shard:05d}.tar")) as sink:
            for path in paths[start:start + per_shard]:
                p = Path(path)
                sink.write({"__key__": p.stem, "jpg": p.read_bytes(), "txt": p.with_suffix(".txt").read_text()})
    return out


def data_rates(device: str, size: str, work: Path, cache_config: Path | None) -> dict:
    """-> {"prepare": [{batch, photos, accepted, seconds, photos_per_second}], "cache": {...}}
    (also work/data.json)."""
    from faceclip_zoo.cache import cache
    from faceclip_zoo.prepare import prepare

    photos = 64 if device == "cuda" else (8 if size == "real" else 4)
    side = 1024 if size == "real" else 512
    root = work / "data-rates"
    src = write_input_shards(root, photos, side)
    report: dict = {"device": device, "side": side, "prepare": []}
    first = None
    for batch in (1, 16 if device == "cuda" else 4):
        out = root / f"prepared-b{batch}"
        manifest = prepare(str(src), str(out), detector="mtcnn", detector_device=device, detect_batch_size=batch,
                           progress=False)
        accepted, seconds = manifest["counts"]["accepted"], manifest["this_run"]["detect_align_seconds"]
        report["prepare"].append({"batch": batch, "photos": photos, "accepted": accepted, "seconds": seconds,
                                  "photos_per_second": round(accepted / seconds, 3) if seconds else None})
        first = first or out
    if cache_config is not None:
        counts = cache(str(cache_config), shards=[str(first)], out=str(root / "cached"), batch_size=8,
                       device=device, progress=False)
        report["cache"] = {"recipe": cache_config.name, **counts,
                           "samples_per_second": round(counts["cached"] / counts["seconds"], 3)
                           if counts.get("seconds") else None}
    (work / "data.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def markdown(report: dict) -> str:
    buf = io.StringIO()
    buf.write(f"| data command ({report['device']}, {report['side']} px) | photos or samples | s | per second |\n"
              "|---|---|---|---|\n")
    for p in report["prepare"]:
        buf.write(f"| prepare, MTCNN, detect_batch_size {p['batch']} | {p['accepted']}/{p['photos']} accepted | "
                  f"{p['seconds']} | {p['photos_per_second']} photos |\n")
    c = report.get("cache")
    if c:
        buf.write(f"| cache ({', '.join(c['features'])}) | {c['cached']} | {c['seconds']} | "
                  f"{c['samples_per_second']} samples |\n")
    return buf.getvalue()
