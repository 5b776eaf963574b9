"""`python -m faceclip_zoo evaluate --pipeline <dir> --benchmark <spec.yaml> --out <dir>`.

1. Generation: every job of the spec (identity x prompt x sample) becomes
   <out>/images/<identity>/<prompt>-<sample>.png, batched per identity, each image seeded
   by what it shows (never by its position), written atomically. A run that stops
   continues with the images that are missing; settings that differ from the first run's
   (<out>/generation.json) are refused, so one folder never mixes two runs.
2. Scores: Face Sim (face-ID cosine of the reference and the face found in the generated
   image; images without a face count as 0 and are reported), CLIP-T (cosine of the CLIP
   image and prompt embeddings, the paper's scale; torchmetrics' CLIPScore is 100x this,
   clipped at 0), FID against a folder of real images.
3. Report: results.json, results.md, per_image.jsonl and sheets/<identity>.png.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from faceclip_zoo.evaluation.spec import IMAGE_SUFFIXES, BenchmarkSpec, Job
from faceclip_zoo.utils import UserError

log = logging.getLogger(__name__)


def standard_error(values: list[float]) -> float | None:
    """Standard error of the mean over the images (None for fewer than two)."""
    if len(values) < 2:
        return None
    return float(np.std(values, ddof=1) / np.sqrt(len(values)))


def image_path(out: Path, job: Job) -> Path:
    return out / "images" / f"{job.name}.png"


def _save_atomically(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def weights_digest(folder: str | Path) -> str:
    """sha256 over a pipeline folder's weight and config files (names and contents): images
    kept in an --out folder are reused only for the same weights, so a pipeline retrained
    in place is never scored with the images of its old weights. Hashing reads every byte
    (seconds per GB), a small price beside generating the images."""
    import hashlib

    root = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json", ".bin")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


def generate(pipe, spec: BenchmarkSpec, out: Path, pipeline_dir: str) -> dict[str, Any]:
    """Generate the images that are missing from `out`; returns counts and seconds."""
    settings = {"pipeline": str(Path(pipeline_dir).resolve()), "weights_sha256": weights_digest(pipeline_dir),
                **spec.generation_settings()}
    state = out / "generation.json"
    if state.exists():
        before = json.loads(state.read_text())
        if before != settings:
            changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
            raise UserError(f"{out} holds images generated with other settings ({', '.join(changed)} differ, "
                            f"see {state}); evaluate into a new --out folder")
    out.mkdir(parents=True, exist_ok=True)
    state.write_text(json.dumps(settings, indent=2))

    jobs = spec.jobs()
    todo = [j for j in jobs if not image_path(out, j).exists()]
    g = spec.generation
    if g.face not in ("reference", "zeroed"):
        raise UserError(f"generation.face must be reference or zeroed, got {g.face!r}")
    groups: dict[tuple, list[Job]] = defaultdict(list)
    for job in todo:
        groups[(job.identity, job.references)].append(job)
    guidance = pipe.guidance_arguments(g.guidance, g.distilled_guidance)
    start = time.perf_counter()
    done = 0
    for (identity, refs), group in groups.items():
        # aligned once per identity; None = the face input zeroed (the control)
        faces = list(pipe.prepare_faces(list(refs), g.align)) if g.face == "reference" else None
        for i in range(0, len(group), spec.batch_size):
            batch = group[i:i + spec.batch_size]
            generators = [torch.Generator().manual_seed(j.seed) for j in batch]
            images = pipe([j.prompt for j in batch], face_image=faces, negative_prompt=g.negative_prompt,
                          num_inference_steps=g.steps, height=g.height, width=g.width,
                          generator=generators, align="never", **guidance).images
            for job, image in zip(batch, images):
                _save_atomically(image, image_path(out, job))
            done += len(batch)
            log.info("generated %d / %d images", len(jobs) - len(todo) + done, len(jobs))
    seconds = time.perf_counter() - start
    return {"images": len(jobs), "generated_now": done, "already_there": len(jobs) - len(todo),
            "seconds": round(seconds, 2), "seconds_per_image": round(seconds / done, 3) if done else None}


def _open(path: str | Path) -> Image.Image:
    from faceclip_zoo.data.images import open_photo  # decoded as prepare and generate decode

    return open_photo(path, "image")


@torch.no_grad()
def face_similarity(spec: BenchmarkSpec, jobs: list[Job], images: list[Image.Image],
                    records: list[dict]) -> dict[str, Any]:
    from faceclip_zoo.evaluation.models import FaceLocator, load_face_id

    fs = spec.face_sim
    face_id = load_face_id(fs.model)
    ref_mode = fs.reference_locator or ("aligned" if spec.generation.align == "never" else "detect")
    locate_ref = FaceLocator(ref_mode, fs.detector, fs.detector_model_dir)
    locate = FaceLocator(fs.locator, fs.detector, fs.detector_model_dir)

    ref_embedding: dict[str, torch.Tensor] = {}
    for ref in sorted({r for j in jobs for r in j.references}):
        crop = locate_ref(_open(ref))
        if crop is None:
            raise UserError(f"no face found in the reference image {ref}; replace it, or set "
                            "face_sim.reference_locator: aligned if it is an aligned crop already")
        ref_embedding[ref] = F.normalize(face_id(crop[None]).float(), dim=-1)[0]

    def identity_vector(refs) -> torch.Tensor:
        return F.normalize(torch.stack([ref_embedding[r] for r in refs]).mean(0), dim=0)

    crops = [locate(im) for im in images]
    found = [i for i, c in enumerate(crops) if c is not None]
    emb = torch.zeros(len(images), 1)
    if found:
        feats = torch.cat([face_id(torch.stack([crops[i] for i in found[k:k + 32]])).float()
                           for k in range(0, len(found), 32)])
        emb = torch.zeros(len(images), feats.shape[-1])
        emb[found] = F.normalize(feats, dim=-1)
    for i, (job, rec) in enumerate(zip(jobs, records)):
        rec["face_found"] = crops[i] is not None
        rec["face_sim"] = float(emb[i] @ identity_vector(job.references)) if rec["face_found"] else None
    sims = [r["face_sim"] for r in records]
    detected = [s for s in sims if s is not None]
    result = {"face_sim": sum(detected) / len(sims),  # a missing face counts as 0
              "face_sim_se": standard_error([s or 0.0 for s in sims]),
              "face_sim_detected": sum(detected) / len(detected) if detected else None,
              "faces_missing": len(sims) - len(detected), "face_id_model": fs.model, "locator": fs.locator}
    # Which benchmark identity is the generated face nearest to (chance 1 / identities).
    by_identity: dict[str, list] = defaultdict(list)
    for job in jobs:
        by_identity[job.identity].extend(job.references)
    if len(by_identity) > 1 and found:
        names = sorted(by_identity)
        table = torch.stack([identity_vector(sorted(set(by_identity[n]))) for n in names])
        nearest = (emb[found] @ table.T).argmax(1).tolist()
        for n, i in zip(nearest, found):
            records[i]["identity_hit"] = names[n] == jobs[i].identity
        hits = [bool(r.get("identity_hit")) for r in records]  # no face found: a miss
        result["identity_top1"] = sum(hits) / len(images)
        result["identity_top1_se"] = standard_error([float(h) for h in hits])
        result["identity_top1_chance"] = 1 / len(names)
    return result


@torch.no_grad()
def clip_t(clip, jobs: list[Job], images: list[Image.Image], records: list[dict], batch: int = 32) -> dict:
    for k in range(0, len(jobs), batch):
        img = clip.image_features(images[k:k + batch])
        txt = clip.text_features([j.prompt for j in jobs[k:k + batch]])
        for rec, score in zip(records[k:k + batch], (img * txt).sum(-1).tolist()):
            rec["clip_t"] = score
    return {"clip_t": sum(r["clip_t"] for r in records) / len(records),
            "clip_t_se": standard_error([r["clip_t"] for r in records]), "clip_model": clip.spec}


def _as_uint8(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].contiguous()


@torch.no_grad()
def fid(spec: BenchmarkSpec, clip, images: list[Image.Image]) -> dict:
    from faceclip_zoo.evaluation.models import build_fid

    metric, features = build_fid(spec.fid.features, clip)
    real = [p for p in sorted(Path(spec.fid.reference_dir).rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES]
    if len(real) < 2 or len(images) < 2:
        raise UserError(f"FID needs at least 2 real and 2 generated images; {spec.fid.reference_dir} has "
                        f"{len(real)}, the benchmark {len(images)}")
    for path in real:  # one at a time: the feature extractors resize, so sizes may differ
        metric.update(_as_uint8(_open(path)), real=True)
    for image in images:
        metric.update(_as_uint8(image), real=False)
    return {"fid": float(metric.compute()), "fid_features": features, "fid_real_images": len(real)}


def score(spec: BenchmarkSpec, out: Path, device: str = "cpu") -> tuple[dict, list[dict]]:
    jobs = spec.jobs()
    missing = [j.name for j in jobs if not image_path(out, j).exists()]
    if missing:
        raise UserError(f"{len(missing)} images are missing in {out}/images (e.g. {missing[0]}.png); "
                        "run evaluate again to generate them")
    images = [_open(image_path(out, j)) for j in jobs]
    records = [{"image": f"images/{j.name}.png", "identity": j.identity, "prompt": j.prompt,
                "seed": j.seed, "references": list(j.references)} for j in jobs]
    metrics: dict[str, Any] = {}
    clip = None
    if spec.clip_t is not None or (spec.fid is not None and spec.fid.features == "clip"):
        from faceclip_zoo.evaluation.models import ClipModel

        model = spec.clip_t.model if spec.clip_t is not None else ""
        clip = ClipModel(model, device)
    if spec.face_sim is not None:
        metrics.update(face_similarity(spec, jobs, images, records))
    if spec.clip_t is not None:
        metrics.update(clip_t(clip, jobs, images, records))
    if spec.fid is not None:
        metrics.update(fid(spec, clip, images))
    return metrics, records


def per_identity(records: list[dict]) -> dict[str, dict[str, float]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        groups[r["identity"]].append(r)
    out = {}
    for name, rows in groups.items():
        entry: dict[str, float] = {"images": len(rows)}
        if "face_sim" in rows[0]:
            entry["face_sim"] = sum(r["face_sim"] or 0.0 for r in rows) / len(rows)
            entry["faces_missing"] = sum(not r["face_found"] for r in rows)
        if "clip_t" in rows[0]:
            entry["clip_t"] = sum(r["clip_t"] for r in rows) / len(rows)
        out[name] = entry
    return out
