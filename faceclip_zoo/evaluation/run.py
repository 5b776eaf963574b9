"""`python -m faceclip_zoo evaluate`: a pipeline on a benchmark, or an encoder on its own.

    python -m faceclip_zoo evaluate --pipeline checkpoints/my-sdxl --benchmark bench.yaml --out runs/eval/my-sdxl
    python -m faceclip_zoo evaluate --pipeline checkpoints/quickstart-sdxl --benchmark synthetic --out runs/eval/q
    python -m faceclip_zoo evaluate --encoder runs/.../last.ckpt --clip open_clip:ViT-L-14:/models/clip.bin \\
        --zero-shot imagenet_val/ --faces people/ --out runs/eval/encoder
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from faceclip_zoo.utils import UserError

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m faceclip_zoo evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output folder (images, results.json, results.md, sheets/)")
    g = p.add_argument_group("pipeline on a benchmark")
    g.add_argument("--pipeline", help="an exported pipeline folder (SDXL or FLUX); with --benchmark synthetic "
                                      "also a diffusion fit checkpoint (.ckpt)")
    g.add_argument("--benchmark", help="benchmark spec YAML (see faceclip_zoo/evaluation/spec.py), or 'synthetic': "
                                       "the held-out synthetic identities (faceclip_zoo/synthetic/benchmark.py)")
    g.add_argument("--batch-size", type=int, default=None, help="images per pipeline call (default: the spec's)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda when present)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on CUDA (as the release), float32 on CPU")
    g.add_argument("--score-only", action="store_true", help="score the images in --out without generating")
    s = p.add_argument_group("--benchmark synthetic")
    s.add_argument("--synthetic-val", default="runs/synthetic/val", help="held-out synthetic shards")
    s.add_argument("--face-id", default="checkpoints/synthetic/face-vit", help="the synthetic face-ID ViT folder")
    s.add_argument("--steps", type=int, default=25)
    s.add_argument("--guidance", type=float, default=None,
                   help="CFG scale (FLUX: true CFG); default the pipeline's (SDXL 5.0, FLUX 3.5)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--images-per-sample", type=int, default=1, help="seeds per held-out sample")
    e = p.add_argument_group("encoder")
    e.add_argument("--encoder", help="an encoder model directory, or its fit checkpoint (which has the heads)")
    e.add_argument("--clip", help="CLIP model for the images: open_clip:<arch>:<weights> | transformers:<dir> | zoo:<dir>")
    e.add_argument("--zero-shot", help="image folder, one sub-folder per class")
    e.add_argument("--template", action="append", default=None, help='class prompt template, e.g. "a photo of a {}."')
    e.add_argument("--head", default="auto", choices=["auto", "text_head", "text_projection"])
    e.add_argument("--faces", help="face folder, one sub-folder per identity: t-SNE of joint embeddings")
    e.add_argument("--faces-locator", default="aligned", choices=["aligned", "detect"],
                   help="aligned: the faces are aligned crops; detect: photos, detected and aligned")
    return p


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


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if bool(args.pipeline) == bool(args.encoder):
        raise UserError("evaluate needs either --pipeline (with --benchmark) or --encoder")
    if args.pipeline:
        if not args.benchmark:
            raise UserError("--pipeline needs --benchmark <spec.yaml> or --benchmark synthetic")
        if args.benchmark == "synthetic":
            from faceclip_zoo.synthetic.benchmark import run_synthetic_benchmark

            device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
            run_synthetic_benchmark(args.pipeline, args.out, args.synthetic_val, args.face_id, args.steps,
                                    args.guidance, args.seed, args.images_per_sample, device)
            print(Path(args.out, "results.md").read_text())
            print(f"wrote {Path(args.out) / 'results.json'} and {Path(args.out) / 'contact_sheet.png'}")
            return 0
        results = evaluate_pipeline(args.pipeline, args.benchmark, args.out, args.device, args.dtype,
                                    args.batch_size, args.score_only)
        print(Path(args.out, "results.md").read_text())
        print(f"wrote {Path(args.out) / 'results.json'} and {len(results['sheets'])} contact sheet(s) in "
              f"{Path(args.out) / 'sheets'}")
        return 0
    from faceclip_zoo.evaluation.encoder import DEFAULT_TEMPLATES, evaluate_encoder

    if not (args.zero_shot or args.faces):
        raise UserError("--encoder needs --zero-shot <image folder> and/or --faces <face folder>")
    results = evaluate_encoder(args.encoder, args.out, args.clip, args.zero_shot, args.faces,
                               args.template or DEFAULT_TEMPLATES, args.head, args.faces_locator)
    print(json.dumps({k: v for k, v in results.items() if k != "encoder"}, indent=2))
    return 0
