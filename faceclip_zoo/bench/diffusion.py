"""Diffusion training steps against plain diffusers steps on the same model and batch.

Both sides get the same cached VAE latents and joint embeddings (what `cache` stores), so
the work is equal: noise, timesteps, the denoiser forward, the loss, backward, AdamW.
Ours is the whole Lightning step (condition dropout, logging, the non-finite check);
the peers are written as diffusers' training scripts write them
(train_text_to_image_sdxl.py, train_dreambooth_flux.py), without their data loading.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from faceclip_zoo.bench.context import Context
from faceclip_zoo.bench.harness import Row, autocast, compare_lightning, guarded, optimizer_step, release_memory


def _cached_batch(ctx: Context, b: int, image: int, latent_channels: int, down: int, seq: int, width: int,
                  pooled: int) -> dict:
    g = torch.Generator().manual_seed(0)
    lat = image // down
    return {"image": torch.zeros(b, 3, image, image, device=ctx.device),
            "vae_latents": torch.randn(b, latent_channels, lat, lat, generator=g).to(ctx.device),
            "prompt_embeds": torch.randn(b, seq, width, generator=g).to(ctx.device),
            "pooled_prompt_embeds": torch.randn(b, pooled, generator=g).to(ctx.device),
            "has_face": torch.ones(b, dtype=torch.bool, device=ctx.device),
            "caption": ctx.captions(b), "identity": [f"id{i}" for i in range(b)],
            "key": [f"k{i}" for i in range(b)], "skipped": 0}


def sdxl_module(ctx: Context):
    """The SDXL module of this size, built once per run (inference reuses it)."""
    if "sdxl" not in ctx.shared:
        from faceclip_zoo.tasks.sdxl import SDXLJointModule

        s = ctx.size
        with ctx.build():
            module = SDXLJointModule(encoder_l=s.encoder_l, encoder_g=s.encoder_g, unet=s.unet,
                                     unet_overrides=s.unet_overrides, vae=s.sdxl_vae, condition_dropout=0.1)
        ctx.shared["sdxl"] = module.to(ctx.device)
    return ctx.shared["sdxl"]


def plain_sdxl_step(ctx: Context, unet, sched, batch: dict, lr: float):
    """The peer's step maker, as train_text_to_image_sdxl.py writes it: AdamW on what of the
    UNet requires grad (all of it, or peft's adapters), noise, timesteps, MSE, backward."""
    latents, embeds, pooled = batch["vae_latents"], batch["prompt_embeds"], batch["pooled_prompt_embeds"]
    h, w = batch["image"].shape[-2:]
    time_ids = torch.tensor([h, w, 0, 0, h, w], device=ctx.device, dtype=torch.float32).expand(len(latents), 6)

    def make():
        opt = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)

        def step():
            noise = torch.randn_like(latents)
            t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), device=ctx.device)
            noisy = sched.add_noise(latents, noise, t)
            with autocast(ctx.device, ctx.precision):
                pred = unet(noisy, t, embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
                loss = F.mse_loss(pred.float(), noise.float())
            optimizer_step(loss, opt)
        return step
    return make


def sdxl_batch(ctx: Context, module) -> dict:
    """A batch of cached features for the size's SDXL module."""
    s, cond = ctx.size, module.condition
    return _cached_batch(ctx, s.sdxl_batch, s.sdxl_image, module.unet.config.in_channels, module.vae_downsample,
                         77, cond.embed_dim, cond.pooled_dim)


def sdxl_row(ctx: Context) -> Row:
    s = ctx.size
    module = sdxl_module(ctx)
    batch = sdxl_batch(ctx, module)
    plain = plain_sdxl_step(ctx, module.unet, module.noise_scheduler, batch, lr=1e-5)
    ours, peer = compare_lightning(module, batch, plain, ctx.device, ctx.precision, **ctx.compare_kwargs())
    ctx.results["sdxl_step_per_sample"] = ours.median / s.sdxl_batch
    return Row(f"SDXL step: SDXLJointModule vs plain diffusers, {s.unet}, {s.sdxl_image} px, batch {s.sdxl_batch}",
               ours.median, peer.median, ours_mem=ours.peak, peer_mem=peer.peak, goal="<= 1.05")


def flux_module_and_batch(ctx: Context):
    """The FLUX module of this size (built anew: it is freed before the next section) and a
    batch of cached features for it."""
    from faceclip_zoo.tasks.flux import FluxJointModule

    s = ctx.size
    with ctx.build():
        module = FluxJointModule(encoder=s.facet5, clip_text=s.clip_text, transformer=s.flux_transformer,
                                 transformer_overrides=s.flux_overrides, vae=s.flux_vae, condition_dropout=0.1,
                                 timestep_shift=3.0).to(ctx.device)
    cond = module.condition
    batch = _cached_batch(ctx, s.flux_batch, s.flux_image, module.vae_config["latent_channels"],
                          module.vae_downsample, cond.face_t5.config.text_length, cond.embed_dim, cond.pooled_dim)
    return module, batch


def flux_row(ctx: Context) -> Row:
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline
    from diffusers.training_utils import compute_density_for_timestep_sampling

    s = ctx.size
    module, batch = flux_module_and_batch(ctx)
    transformer = module.transformer
    latents, embeds, pooled = batch["vae_latents"], batch["prompt_embeds"], batch["pooled_prompt_embeds"]
    b, c, h, w = latents.shape
    # train_dreambooth_flux.py: timesteps drawn by density, looked up in a copy of the
    # (statically shifted) scheduler's table; sigma-weighted MSE against noise - latents.
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    sigmas_table = scheduler.sigmas.to(ctx.device)
    timesteps_table = scheduler.timesteps.to(ctx.device)
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, ctx.device, torch.float32)
    txt_ids = torch.zeros(embeds.shape[1], 3, device=ctx.device)

    def plain():
        opt = torch.optim.AdamW(transformer.parameters(), lr=1e-5, weight_decay=0.01)

        def step():
            noise = torch.randn_like(latents)
            u = compute_density_for_timestep_sampling("logit_normal", b, 0.0, 1.0, 1.29)
            idx = (u * 1000).long().clamp(max=999).to(ctx.device)
            sig = sigmas_table[idx][:, None, None, None]
            noisy = (1 - sig) * latents + sig * noise
            with autocast(ctx.device, ctx.precision):
                pred = transformer(hidden_states=FluxPipeline._pack_latents(noisy, b, c, h, w),
                                   timestep=timesteps_table[idx] / 1000,
                                   guidance=torch.full((b,), 1.0, device=ctx.device),
                                   pooled_projections=pooled, encoder_hidden_states=embeds,
                                   txt_ids=txt_ids, img_ids=img_ids).sample
                pred = FluxPipeline._unpack_latents(pred, h * module.vae_downsample, w * module.vae_downsample,
                                                    module.vae_downsample)
                loss = ((pred.float() - (noise - latents).float()) ** 2).reshape(b, -1).mean(1).mean()
            optimizer_step(loss, opt)
        return step

    ours, peer = compare_lightning(module, batch, plain, ctx.device, ctx.precision, **ctx.compare_kwargs())
    name = s.flux_transformer + (f" {s.flux_overrides}" if s.flux_overrides else "")
    del module
    release_memory(ctx.device)
    return Row(f"FLUX step: FluxJointModule vs plain diffusers flow matching, {name}, {s.flux_image} px, "
               f"batch {s.flux_batch}", ours.median, peer.median, ours_mem=ours.peak, peer_mem=peer.peak,
               goal="<= 1.05")


def run_sdxl(ctx: Context) -> list[Row]:
    return guarded("SDXL step vs plain diffusers", sdxl_row, ctx)


def run_flux(ctx: Context) -> list[Row]:
    return guarded("FLUX step vs plain diffusers", flux_row, ctx)

