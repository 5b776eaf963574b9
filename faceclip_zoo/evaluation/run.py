"""`python -m faceclip_zoo evaluate`: a pipeline on a benchmark, or an encoder on its own.

    python -m faceclip_zoo evaluate --pipeline checkpoints/my-sdxl --benchmark bench.yaml --out runs/eval/my-sdxl
    python -m faceclip_zoo evaluate --pipeline checkpoints/quickstart-sdxl --benchmark synthetic --out runs/eval/q
    python -m faceclip_zoo evaluate --encoder runs/.../last.ckpt --clip open_clip:ViT-L-14:/models/clip.bin \\
        --zero_shot imagenet_val/ --faces people/ --out runs/eval/encoder
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal, Optional, Union

import torch

from faceclip_zoo.utils import UserError

log = logging.getLogger(__name__)


def evaluate_pipeline(pipeline: str, benchmark: str, out: str | Path, device: str = "auto", dtype: str = "auto",
                      batch_size: int | None = None, score_only: bool = False) -> dict:
    from faceclip_zoo.evaluation.benchmark import generate, per_identity, score
    from faceclip_zoo.evaluation.report import write_report
    from faceclip_zoo.evaluation.spec import describe, load_spec
    from faceclip_zoo.pipelines.export import load_pipeline

    spec = load_spec(benchmark)
    if batch_size:
        spec.batch_size = batch_size
    out = Path(out)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if score_only:
        state = out / "generation.json"
        generation = {"images": len(spec.jobs()), "generated_now": 0,
                      **({"settings": json.loads(state.read_text())} if state.exists() else {})}
    else:
        dtype_name = dtype if dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
        pipe = load_pipeline(pipeline, dtype=getattr(torch, dtype_name)).to(device)
        pipe.set_progress_bar_config(disable=True)
        generation = generate(pipe, spec, out, pipeline)
        del pipe
    metrics, records = score(spec, out, device)
    results = {"benchmark": str(benchmark), "pipeline": str(pipeline), "generation": generation,
               "metrics": metrics, "per_identity": per_identity(records), "spec": describe(spec)}
    write_report(out, results, records, spec.jobs(), spec.sheets.columns, spec.sheets.rows)
    return results


def evaluate(
    out: str,
    pipeline: Optional[str] = None,
    benchmark: Optional[str] = None,
    batch_size: Optional[int] = None,
    device: str = "auto",
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
    score_only: bool = False,
    synthetic_val: Optional[str] = None,
    face_id: Optional[str] = None,
    steps: int = 25,
    guidance: Optional[float] = None,
    seed: int = 0,
    images_per_sample: int = 1,
    probes: bool = False,
    encoder: Optional[str] = None,
    clip: Optional[str] = None,
    zero_shot: Optional[str] = None,
    template: Optional[Union[str, list[str]]] = None,
    head: Literal["auto", "text_head", "text_projection"] = "auto",
    faces: Optional[str] = None,
    faces_locator: Literal["aligned", "detect"] = "aligned",
) -> dict:
    """A pipeline on a benchmark (--pipeline, --benchmark), or an encoder on its own (--encoder).

    Args:
        out: output folder (images, results.json, results.md, sheets/).
        pipeline: an exported pipeline folder (SDXL or FLUX); with --benchmark synthetic
            also an SDXL oracle fit checkpoint.
        benchmark: a benchmark spec YAML (see faceclip_zoo/evaluation/spec.py), or
            "synthetic": the held-out synthetic identities (faceclip_zoo/evaluation/synthetic_benchmark.py).
        batch_size: images per pipeline call (default: the spec's).
        device: cpu, cuda, cuda:1, ... (auto: cuda when present).
        dtype: auto: bfloat16 on CUDA, float32 on CPU.
        score_only: score the images in --out without generating.
        synthetic_val: (--benchmark synthetic) the held-out synthetic shards (default: `val/`
            under the data root of the pipeline's recipe, else runs/synthetic/val).
        face_id: (--benchmark synthetic) the synthetic face-ID ViT folder (default: the
            recipe's priors_dir/face-vit, else checkpoints/synthetic/face-vit).
        steps: (--benchmark synthetic) sampler steps.
        guidance: (--benchmark synthetic) guidance scale (default: the pipeline's).
        seed: (--benchmark synthetic) first seed.
        images_per_sample: (--benchmark synthetic) seeds per held-out sample.
        probes: (--benchmark synthetic, SDXL) also probe identity along the path: in the
            prompt_embeds, and the training loss by timestep with and without the face.
        encoder: an encoder model directory, or its fit checkpoint (which has the heads).
        clip: CLIP model for the images: open_clip:<arch>:<weights> | transformers:<dir> | zoo:<dir>.
        zero_shot: image folder, one sub-folder per class.
        template: class prompt template(s), e.g. "a photo of a {}." (more with --template+).
        head: which head maps the joint embedding to CLIP's text space.
        faces: face folder, one sub-folder per identity: t-SNE of joint embeddings.
        faces_locator: aligned: the faces are aligned crops; detect: photos, detected and aligned.
    """
    if bool(pipeline) == bool(encoder):
        raise UserError("evaluate needs either --pipeline (with --benchmark) or --encoder")
    if pipeline:
        if not benchmark:
            raise UserError("--pipeline needs --benchmark <spec.yaml> or --benchmark synthetic")
        if benchmark == "synthetic":
            from faceclip_zoo.evaluation.synthetic_benchmark import run_synthetic_benchmark

            device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
            results = run_synthetic_benchmark(pipeline, out, synthetic_val, face_id, steps, guidance, seed,
                                              images_per_sample, device, probes)
            print(Path(out, "results.md").read_text())
            print(f"wrote {Path(out) / 'results.json'} and {Path(out) / 'contact_sheet.png'}")
            return results
        results = evaluate_pipeline(pipeline, benchmark, out, device, dtype, batch_size, score_only)
        print(Path(out, "results.md").read_text())
        print(f"wrote {Path(out) / 'results.json'} and {len(results['sheets'])} contact sheet(s) in "
              f"{Path(out) / 'sheets'}")
        return results
    from faceclip_zoo.evaluation.encoder import DEFAULT_TEMPLATES, evaluate_encoder

    if not (zero_shot or faces):
        raise UserError("--encoder needs --zero_shot <image folder> and/or --faces <face folder>")
    templates = [template] if isinstance(template, str) else (template or DEFAULT_TEMPLATES)
    results = evaluate_encoder(encoder, out, clip, zero_shot, faces, templates, head, faces_locator)
    print(json.dumps({k: v for k, v in results.items() if k != "encoder"}, indent=2))
    return results
