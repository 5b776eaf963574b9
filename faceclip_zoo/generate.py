"""`python -m faceclip_zoo generate`: images (or videos) of a person from an exported pipeline.

    python -m faceclip_zoo generate --pipeline checkpoints/quickstart-sdxl \\
        --face me.png --prompt "a photo of a person in front of a blue background" --out out.png

The folder's model_index.json says which pipeline it is: FaceCLIPSDXLPipeline or
FaceT5FluxPipeline. Several references of one person: `--face a.png --face+ b.png`
(averaged). Without --steps/--guidance the release's settings apply: SDXL Euler, 50 steps,
guidance 5.0 (or the guidance a trained folder stores: its recipe's sample_guidance); FLUX
flow-matching Euler, 50 steps, true CFG 3.5 (--guidance) with distilled guidance 1.0
(--distilled_guidance); both with the release's negative text (pipelines/defaults.py).
The size defaults to the model's native one. A video pipeline (FaceT5WanPipeline) writes
an MP4 (`--out clip.mp4`) and an animated GIF preview beside it (clip.gif); `--frames`
sets its length (default: the folder's, else Wan's 81) and `--fps` its rate.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Optional, Union

import torch

from faceclip_zoo.data.images import DEFAULT_MAX_PIXELS
from faceclip_zoo.utils import UserError


def output_paths(out: str, n: int) -> list[Path]:
    path = Path(out)
    if n == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix or '.png'}") for i in range(n)]


def open_pipeline(path: str, device: str = "auto", dtype: str = "auto", scheduler: str | None = None,
                  lora: str | None = None, quantize: str | None = None, offload: str | None = None):
    """An exported/converted pipeline folder (or a LoRA export: its base pipeline with the
    adapters), on `device` (auto: CUDA when present) in `dtype` (auto: bfloat16 on CUDA as
    the release, float32 on CPU), optionally with another diffusers scheduler class, LoRA
    adapters, weight-only int8 quantisation and CPU offload (`generate` and `demo` share this)."""
    import diffusers

    from faceclip_zoo.pipelines.adapters import lora_base
    from faceclip_zoo.pipelines.components import quantize_components
    from faceclip_zoo.pipelines.export import load_pipeline

    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    dtype_name = dtype if dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
    if dtype_name not in ("float32", "bfloat16", "float16"):
        raise UserError(f"dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    if offload not in (None, "model", "sequential"):
        raise UserError(f"--offload must be model or sequential, got {offload!r}")
    if offload and not device.startswith("cuda"):
        raise UserError("--offload keeps weights on the CPU and moves them to the GPU when used: it needs a "
                        f"CUDA device (got {device})")
    base = lora_base(path)
    if base is not None:  # a LoRA export: the pipeline it adapts, then the adapters
        path, lora = base, lora or path
    pipe = load_pipeline(path, dtype=getattr(torch, dtype_name))
    if lora:
        from faceclip_zoo.utils import check_safetensors

        files = sorted(Path(lora).rglob("*.safetensors")) if Path(lora).is_dir() else [Path(lora)]
        check_safetensors(files, f"--lora {lora}")
        pipe.load_lora_weights(lora)
        pipe.fuse_lora()  # folded in: sampling costs what the base costs
        pipe.unload_lora_weights()
    if quantize:  # piece by piece onto the device (float8 needs the GPU; bf16 FLUX is larger than 24 GB)
        quantize_components(pipe, quantize, None if offload else device)
    if not offload:
        pipe = pipe.to(device)
    if offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    if scheduler:
        cls = getattr(diffusers, scheduler, None)
        if cls is None or not hasattr(cls, "from_config"):
            raise UserError(f"--scheduler {scheduler!r} is not a diffusers scheduler class")
        pipe.scheduler = cls.from_config(pipe.scheduler.config)
    return pipe


def generate(
    pipeline: str,
    prompt: str,
    face: Optional[Union[str, list[str]]] = None,
    align: Literal["auto", "always", "never"] = "auto",
    negative_prompt: Optional[str] = None,
    out: str = "out.png",
    seed: int = 0,
    steps: int = 50,
    guidance: Optional[float] = None,
    distilled_guidance: Optional[float] = None,
    height: Optional[int] = None,
    width: Optional[int] = None,
    num_images: int = 1,
    scheduler: Optional[str] = None,
    device: str = "auto",
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
    lora: Optional[str] = None,
    quantize: Optional[Literal["int8", "float8"]] = None,
    offload: Optional[Literal["model", "sequential"]] = None,
    overwrite: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    frames: Optional[int] = None,
    fps: int = 16,
) -> list[Path]:
    """Images (or videos) of a person from an exported or converted pipeline folder.

    Args:
        pipeline: an exported pipeline folder (SDXL or FLUX).
        prompt: the text.
        face: photo of the person; several references of one person as `--face a.png
            --face+ b.png` (averaged). Omit for an image without a face.
        align: auto: photos are aligned like the training data, aligned crops kept as they
            are; always: re-align; never: the faces are aligned crops already (e.g. synthetic).
        negative_prompt: default the release's negative text for the model; "" for none.
        out: output PNG (out-K.png for num_images > 1); for a video pipeline an MP4 (the
            default out.png becomes out.mp4), with an animated GIF preview beside it.
        seed: the generator's seed.
        steps: denoising steps.
        guidance: classifier-free guidance (SDXL default: the folder's stored guidance, else 5.0;
            FLUX: true CFG, default 3.5).
        distilled_guidance: FLUX.1-dev's guidance input (default 1.0, as the release).
        height: image height (default: the model's native size).
        width: image width (default: the model's native size).
        num_images: how many images.
        scheduler: a diffusers scheduler class to sample with, e.g. DPMSolverMultistepScheduler.
        device: cpu, cuda, cuda:1, ... (auto: cuda when present).
        dtype: auto: bfloat16 on CUDA (as the release), float32 on CPU.
        lora: a LoRA export (diffusers' pytorch_lora_weights.safetensors) to fold into the
            pipeline; `--pipeline` may also name a LoRA export directly (its base is read
            from its faceclip_zoo.json).
        quantize: int8 (any device) or float8 (GPUs with float8): weight-only quantisation of
            the UNet / transformer and the FaceT5 encoder (torchao); less memory, slightly
            different images (docs/performance.md has the measured difference).
        offload: model (whole components move to the GPU in turn) or sequential (layer by
            layer: least memory, slowest): diffusers' CPU offload, CUDA only.
        overwrite: replace existing output files (otherwise refused before sampling).
        max_pixels: photos declaring more pixels are refused from their header (default 50 M).
        frames: video pipelines: frames per video (default the folder's; Wan needs 1 + 4k).
        fps: video pipelines: the MP4's and preview's frame rate (Wan's 16).
    """
    from faceclip_zoo.data.images import open_photo

    if num_images < 1 or steps < 1:
        raise UserError("--num_images and --steps must be at least 1")
    for name, side in (("--height", height), ("--width", width)):
        if side is not None and not 16 <= side <= 4096:
            raise UserError(f"{name} must be between 16 and 4096 pixels, got {side}")
    video = is_video_pipeline(pipeline)
    if video:
        out = "out.mp4" if out == "out.png" else out
        if Path(out).suffix.lower() != ".mp4":
            raise UserError(f"{pipeline} makes videos: name an .mp4 file as --out (got {out})")
    elif frames is not None:
        raise UserError(f"--frames applies to video pipelines; {pipeline} makes images")
    if frames is not None and frames < 1 or fps < 1:
        raise UserError("--frames and --fps must be at least 1")
    # everything the run will read or write is checked before the model loads and samples
    paths = output_paths(out, num_images)
    for path in paths:
        if path.is_dir():
            raise UserError(f"--out {path} is a folder; name the image file to write (e.g. {path / 'out.png'})")
        if path.exists() and not overwrite:
            raise UserError(f"--out {path} exists; pass --overwrite true to replace it")
        parent = path.parent if str(path.parent) else Path(".")
        if parent.exists() and not (parent.is_dir() and os.access(parent, os.W_OK)):
            raise UserError(f"--out {path}: {parent} is not a writable folder")
    photos = None
    if face is not None:
        faces = [face] if isinstance(face, str) else list(face)
        photos = [open_photo(f, "--face", max_pixels=max_pixels) for f in faces]
        photos = photos[0] if isinstance(face, str) else photos
    pipe = open_pipeline(pipeline, device, dtype, scheduler, lora, quantize, offload)
    multiple = pipe.size_multiple() if hasattr(pipe, "size_multiple") else 8
    for name, side in (("--height", height), ("--width", width)):
        if side is not None and side % multiple:
            raise UserError(f"{name} must be a multiple of {multiple} for this pipeline, got {side}")
    result = pipe(
        prompt, face_image=photos, negative_prompt=negative_prompt, num_inference_steps=steps,
        height=height, width=width, num_images_per_prompt=num_images,
        generator=torch.Generator(device="cpu").manual_seed(seed), align=align,
        **pipe.guidance_arguments(guidance, distilled_guidance), **({"num_frames": frames} if frames else {}),
    )
    for image, path in zip(getattr(result, pipe.OUTPUT), paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        if video:
            from faceclip_zoo.data.video import write_mp4, write_preview

            write_mp4(image, path, fps)
            print(f"wrote {path} ({len(image)} frames) and {write_preview(image, path.with_suffix('.gif'), fps)}")
        else:
            image.save(path)
            print(f"wrote {path}")
    return paths


def is_video_pipeline(path: str) -> bool:
    """Whether a pipeline folder (or a LoRA export's base) makes videos, read from its
    model_index.json before anything loads; False where that cannot be told (open_pipeline
    then names the problem)."""
    from faceclip_zoo.pipelines.adapters import lora_base
    from faceclip_zoo.pipelines.export import pipeline_class_of

    folder = Path(lora_base(path) or path)
    if not (folder / "model_index.json").is_file():
        return False
    return pipeline_class_of(folder).OUTPUT == "frames"
