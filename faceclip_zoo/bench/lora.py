"""The LoRA step: SDXLJointModule with adapters against its own full fine-tuning step and
against peft on a plain diffusers loop (the same UNet, the same adapters, the same cached
latents and embeddings: equal work).

The peer is what diffusers' train_text_to_image_lora_sdxl.py does: the UNet frozen, peft's
LoraConfig added with `unet.add_adapter`, the adapters cast to float32, AdamW on them.
"""

from __future__ import annotations

import torch

from faceclip_zoo.bench.context import Context
from faceclip_zoo.bench.diffusion import _cached_batch, plain_sdxl_step, sdxl_module
from faceclip_zoo.bench.harness import Measurement, Row, guarded, lightning_block, release_memory, time_block

RANK = 16


def lora_rows(ctx: Context) -> list[Row]:
    from diffusers.training_utils import cast_training_params

    from faceclip_zoo.models.adapters import LoraSettings, count_parameters
    from faceclip_zoo.models.diffusers_models import build_diffusers
    from faceclip_zoo.tasks.sdxl import SDXLJointModule

    s = ctx.size
    settings = LoraSettings(rank=RANK)
    full = sdxl_module(ctx)
    with ctx.build():
        ours = SDXLJointModule(encoder_l=s.encoder_l, encoder_g=s.encoder_g, unet=s.unet,
                               unet_overrides=s.unet_overrides, vae=s.sdxl_vae, condition_dropout=0.1, lora=settings)
        ours.adapt_denoiser()
        unet = build_diffusers(ours.unet_config)
    ours, unet = ours.to(ctx.device), unet.to(ctx.device)
    unet.requires_grad_(False)
    unet.add_adapter(settings.peft_config("UNet2DConditionModel"))
    cast_training_params(unet, dtype=torch.float32)
    cond = ours.condition
    batch = _cached_batch(ctx, s.sdxl_batch, s.sdxl_image, unet.config.in_channels, ours.vae_downsample, 77,
                          cond.embed_dim, cond.pooled_dim)
    peer = plain_sdxl_step(ctx, unet, ours.noise_scheduler, batch, lr=1e-4)

    lora, full_m, plain = Measurement(), Measurement(), Measurement()
    kw = ctx.compare_kwargs()
    for _ in range(kw["rounds"]):
        lightning_block(ours, batch, ctx.device, ctx.precision, kw["warmup"], kw["repeats"], lora)
        time_block(peer, ctx.device, kw["warmup"], kw["repeats"], plain)
        lightning_block(full, batch, ctx.device, ctx.precision, kw["warmup"], kw["repeats"], full_m)
    trained, total = count_parameters(ours.unet)
    what = f"{s.unet}, {s.sdxl_image} px, batch {s.sdxl_batch}, rank {RANK} ({trained:,} of {total:,} UNet parameters)"
    return [Row(f"SDXL LoRA step: SDXLJointModule(lora) vs peft on a plain diffusers loop, {what}",
                lora.median, plain.median, ours_mem=lora.peak, peer_mem=plain.peak, goal="<= 1.05"),
            Row(f"SDXL LoRA step vs our full fine-tuning step, {s.unet}, {s.sdxl_image} px, batch {s.sdxl_batch}",
                lora.median, full_m.median, ours_mem=lora.peak, peer_mem=full_m.peak, goal="-")]


def run(ctx: Context) -> list[Row]:
    rows = guarded("SDXL LoRA step", lora_rows, ctx)
    release_memory(ctx.device)  # the LoRA module and the peer's UNet are gone with lora_rows' frame
    return rows
