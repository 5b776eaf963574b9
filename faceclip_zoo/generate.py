"""`python -m faceclip_zoo generate`: images of a person from an exported pipeline.

    python -m faceclip_zoo generate --pipeline checkpoints/quickstart-sdxl \\
        --face me.png --prompt "a photo of a person in front of a blue background" --out out.png

The folder's model_index.json says which pipeline it is: FaceCLIPSDXLPipeline or
FaceT5FluxPipeline. --face may be given several times (references of one person,
averaged). Without --steps/--guidance the release's settings apply: SDXL Euler, 50 steps,
guidance 5.0; FLUX flow-matching Euler, 50 steps, true CFG 3.5 (--guidance) with
distilled guidance 1.0 (--distilled-guidance); both with the release's negative text
(pipelines/defaults.py). The size defaults to the model's native one.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from faceclip_zoo.utils import UserError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m faceclip_zoo generate", description=__doc__.split("\n")[0])
    p.add_argument("--pipeline", required=True, help="an exported pipeline folder (SDXL or FLUX)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--face", action="append", default=None,
                   help="photo of the person (repeat for several references of one person); omit for none")
    p.add_argument("--align", default="auto", choices=["auto", "always", "never"],
                   help="auto: photos are aligned like the training data, aligned crops kept as they are; "
                        "never: the faces are aligned crops already (e.g. synthetic faces)")
    p.add_argument("--negative-prompt", default=None,
                   help="default: the release's negative text for the model (SDXL or FLUX); '' for none")
    p.add_argument("--out", default="out.png", help="output PNG (out-K.png for --num-images > 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (SDXL default 5.0; FLUX: true CFG, default 3.5)")
    p.add_argument("--distilled-guidance", type=float, default=None,
                   help="FLUX.1-dev's guidance input (default 1.0, as the release)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--scheduler", default=None,
                   help="a diffusers scheduler class to sample with, e.g. DPMSolverMultistepScheduler")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda when present)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on CUDA (as the release), float32 on CPU")
    return p


def output_paths(out: str, n: int) -> list[Path]:
    path = Path(out)
    if n == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix or '.png'}") for i in range(n)]


def open_pipeline(path: str, device: str = "auto", dtype: str = "auto", scheduler: str | None = None):
    """An exported/converted pipeline folder, on `device` (auto: CUDA when present) in
    `dtype` (auto: bfloat16 on CUDA as the release, float32 on CPU), optionally with another
    diffusers scheduler class (`generate` and `demo` share this)."""
    import diffusers

    from faceclip_zoo.pipelines.export import load_pipeline

    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    dtype_name = dtype if dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
    if dtype_name not in ("float32", "bfloat16", "float16"):
        raise UserError(f"dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    pipe = load_pipeline(path, dtype=getattr(torch, dtype_name)).to(device)
    if scheduler:
        cls = getattr(diffusers, scheduler, None)
        if cls is None or not hasattr(cls, "from_config"):
            raise UserError(f"--scheduler {scheduler!r} is not a diffusers scheduler class")
        pipe.scheduler = cls.from_config(pipe.scheduler.config)
    return pipe


def run(args: argparse.Namespace) -> list[Path]:
    if args.num_images < 1 or args.steps < 1:
        raise UserError("--num-images and --steps must be at least 1")
    pipe = open_pipeline(args.pipeline, args.device, args.dtype, args.scheduler)
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    guidance = pipe.guidance_arguments(args.guidance, args.distilled_guidance)
    images = pipe(
        args.prompt, face_image=args.face, negative_prompt=args.negative_prompt,
        num_inference_steps=args.steps, height=args.height, width=args.width,
        num_images_per_prompt=args.num_images, generator=generator, align=args.align, **guidance,
    ).images
    paths = output_paths(args.out, len(images))
    for image, path in zip(images, paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
    return paths


def main(argv: list[str]) -> int:
    paths = run(build_parser().parse_args(argv))
    for path in paths:
        print(f"wrote {path}")
    return 0
