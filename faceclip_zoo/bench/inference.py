"""FaceCLIPSDXLPipeline against diffusers' StableDiffusionXLPipeline on identical
components (UNet, VAE, scheduler, seed). The peer is handed precomputed embeddings, so
the ratio is the whole cost of our additions: the two FaceCLIP branches (prompt and
negative) and, for a photo, face detection and alignment.
"""

from __future__ import annotations

import numpy as np
import torch

from faceclip_zoo.bench.context import Context
from faceclip_zoo.bench.diffusion import sdxl_module
from faceclip_zoo.bench.harness import Row, compare, guarded


def pipeline_rows(ctx: Context) -> list[Row]:
    from PIL import Image

    from faceclip_zoo.pipelines.sdxl import FaceCLIPSDXLPipeline

    s = ctx.size
    module = sdxl_module(ctx).eval()
    pipe = FaceCLIPSDXLPipeline.from_module(module, use_ema=False).to(ctx.device, ctx.dtype)
    pipe.set_progress_bar_config(disable=True)
    sdxl = pipe.diffusers_pipeline()
    prompt = ctx.captions(1)[0]
    face_size = module.condition.face_size
    crop = torch.rand(3, face_size, face_size, generator=torch.Generator().manual_seed(0))
    settings = dict(num_inference_steps=s.pipeline_steps, guidance_scale=5.0, height=s.pipeline_image,
                    width=s.pipeline_image, output_type="np")

    def seed():
        return torch.Generator(ctx.device).manual_seed(0)

    def ours_with(face, align):
        return lambda: lambda: pipe(prompt, face_image=face, align=align, generator=seed(), **settings).images

    embeds = pipe.embed_request(prompt, crop, None, "never")

    def peer():
        return lambda: sdxl(**embeds, generator=seed(), **settings).images

    same = np.abs(ours_with(crop, "never")()() - peer()()).max()
    kw = dict(ctx.compare_kwargs(), warmup=1, repeats=min(ctx.repeats, 3))  # whole generations: few suffice
    a, b = compare(ours_with(crop, "never"), peer, ctx.device, **kw)
    label = f"{s.pipeline_image} px, {s.pipeline_steps} steps, guidance 5"
    rows = [Row(f"SDXL inference: FaceCLIPSDXLPipeline (aligned crop) vs StableDiffusionXLPipeline, {label}",
                a.median, b.median, unit="image", ours_mem=a.peak, peer_mem=b.peak,
                note=f"the encoders' cost; images max |diff| {same:.1e}")]
    rows.append(quantized_row(pipe, prompt, crop, settings, seed, ctx, kw, label))
    try:
        from skimage import data

        photo = Image.fromarray(data.astronaut())  # a real face: detection + alignment
        c, d = compare(ours_with(photo, "auto"), peer, ctx.device, **kw)
        rows.append(Row(f"SDXL inference: FaceCLIPSDXLPipeline (a 512 px photo, MTCNN alignment) vs "
                        f"StableDiffusionXLPipeline, {label}", c.median, d.median, unit="image", ours_mem=c.peak,
                        peer_mem=d.peak, goal="-", note="encoders + detection + alignment"))
    except ImportError as exc:  # facenet-pytorch is installed apart (README); say so, do not fail
        rows.append(Row("SDXL inference with a photo (MTCNN alignment)", float("nan"), float("nan"), unit="image",
                        note=f"skipped: {exc}"))
    return rows


def quantized_row(pipe, prompt, crop, settings, seed, ctx: Context, kw: dict, label: str) -> Row:
    """`generate --quantize int8` (torchao weight-only on the UNet) against the unquantised
    pipeline: time per image and how far the images move (0-1 pixel scale)."""
    import copy

    from faceclip_zoo.pipelines.components import quantize_components
    from faceclip_zoo.pipelines.sdxl import FaceCLIPSDXLPipeline

    q = FaceCLIPSDXLPipeline(vae=pipe.vae, face_encoder=pipe.face_encoder, face_encoder_2=pipe.face_encoder_2,
                             unet=copy.deepcopy(pipe.unet), scheduler=copy.deepcopy(pipe.scheduler))
    q.set_progress_bar_config(disable=True)
    quantize_components(q, "int8")

    def run_with(p):
        return lambda: lambda: p(prompt, face_image=crop, align="never", generator=seed(), **settings).images

    diff = np.abs(run_with(q)()() - run_with(pipe)()())
    a, b = compare(run_with(q), run_with(pipe), ctx.device, **kw)
    return Row(f"SDXL inference: UNet int8 weight-only (`generate --quantize int8`) vs unquantised, {label}",
               a.median, b.median, unit="image", ours_mem=a.peak, peer_mem=b.peak, goal="-",
               note=f"images max |diff| {diff.max():.3f}, mean {diff.mean():.4f} (0-1 scale)")


def run(ctx: Context) -> list[Row]:
    return guarded("SDXL inference vs StableDiffusionXLPipeline", pipeline_rows, ctx)
