"""The identity loss's cost per step: the same module's Lightning step with and without it
(tasks/identity_loss.py), on the size's SDXL and FLUX stages with cached features, as a
run that caches them pays it. The extra work: the chosen rows' VAE decode and the face
network, forward and backward."""

from __future__ import annotations

import torch

from faceclip_zoo.bench.context import Context
from faceclip_zoo.bench.diffusion import flux_module_and_batch, sdxl_batch, sdxl_module
from faceclip_zoo.bench.harness import Measurement, Row, guarded, lightning_block, release_memory
from faceclip_zoo.tasks.identity_loss import IdentityLossSettings

SETTINGS = IdentityLossSettings()  # the defaults a recipe gets with `identity_loss: {}`


def _with_faces(ctx: Context, batch: dict, module) -> dict:
    size = module.encoder_face_network().config.image_size
    g = torch.Generator().manual_seed(1)
    return dict(batch, image=torch.rand(batch["image"].shape, generator=g).to(ctx.device),
                face=torch.rand(len(batch["caption"]), 3, size, size, generator=g).to(ctx.device))


def _row(ctx: Context, module, batch: dict, what: str) -> Row:
    with_loss, without = Measurement(), Measurement()
    for _ in range(ctx.rounds):  # alternating blocks, the same module and batch
        module.identity_settings = SETTINGS
        lightning_block(module, batch, ctx.device, ctx.precision, ctx.warmup, ctx.repeats, with_loss)
        module.identity_settings = None
        lightning_block(module, batch, ctx.device, ctx.precision, ctx.warmup, ctx.repeats, without)
    rows = max(1, round(SETTINGS.fraction * len(batch["caption"])))
    return Row(f"{what} step with the identity loss ({rows} of {len(batch['caption'])} rows decoded) vs without",
               with_loss.median, without.median, ours_mem=with_loss.peak, peer_mem=without.peak)


def sdxl_row(ctx: Context) -> Row:
    s = ctx.size
    module = sdxl_module(ctx)
    return _row(ctx, module, _with_faces(ctx, sdxl_batch(ctx, module), module), f"SDXL {s.unet}, {s.sdxl_image} px")


def flux_row(ctx: Context) -> Row:
    s = ctx.size
    module, batch = flux_module_and_batch(ctx)
    row = _row(ctx, module, _with_faces(ctx, batch, module), f"FLUX {s.flux_transformer}, {s.flux_image} px")
    del module
    release_memory(ctx.device)
    return row


def run(ctx: Context) -> list[Row]:
    return [*guarded("SDXL step with the identity loss", sdxl_row, ctx),
            *guarded("FLUX step with the identity loss", flux_row, ctx)]
