"""Cost of one SDXLJointModule training step against a plain diffusers SDXL training step
on the same UNet with the same precomputed embeddings and latents (what diffusers'
train_text_to_image_sdxl.py does per step: noise, add_noise, UNet, MSE, backward, AdamW).

    python benchmarks/sdxl_train_step.py [--unet sdxl-unet-tiny] [--batch 8] [--steps 20] [--device cpu]

Prints a table; the ratio column is ours / plain (goal: <= 1.1).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from faceclip_zoo.tasks.sdxl import SDXLJointModule


def plain_step(unet, scheduler, opt, latents, embeds, pooled, time_ids):
    noise = torch.randn_like(latents)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
    noisy = scheduler.add_noise(latents, noise, t)
    pred = unet(noisy, t, embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    loss = F.mse_loss(pred.float(), noise.float())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def ours_step(module, opt, batch):
    loss = module.diffusion_loss(batch)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def timed(fn, steps: int, device: str) -> float:
    for _ in range(3):  # warm-up
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--unet", default="sdxl-unet-tiny")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--latent-size", type=int, default=16)
    args = p.parse_args()
    torch.manual_seed(0)
    module = SDXLJointModule(unet=args.unet, condition_dropout=0.1).to(args.device)
    module.setup("fit")
    module.train()
    unet, sched = module.unet, module.noise_scheduler
    b, c, s = args.batch, unet.config.in_channels, args.latent_size
    dev = args.device
    latents = torch.randn(b, c, s, s, device=dev)
    embeds = torch.randn(b, 77, module.condition.embed_dim, device=dev)
    pooled = torch.randn(b, module.condition.pooled_dim, device=dev)
    size = s * 2 ** (len(module.vae_config["block_out_channels"]) - 1)
    batch = {"vae_latents": latents, "prompt_embeds": embeds, "pooled_prompt_embeds": pooled,
             "caption": [""] * b, "has_face": torch.ones(b, dtype=torch.bool),
             "image": torch.zeros(b, 3, size, size, device=dev)}
    time_ids = module.time_ids(batch, latents)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-5)
    rows = []
    for _ in range(2):  # interleave, the machines are noisy
        rows.append(("plain diffusers", timed(lambda: plain_step(unet, sched, opt, latents, embeds, pooled, time_ids),
                                               args.steps, dev)))
        rows.append(("SDXLJointModule", timed(lambda: ours_step(module, opt, batch), args.steps, dev)))
    plain = min(t for n, t in rows if n == "plain diffusers")
    ours = min(t for n, t in rows if n == "SDXLJointModule")
    print(f"unet {args.unet}, batch {b}, latents {c}x{s}x{s}, device {dev}, best of 2 x {args.steps} steps")
    print("| step | seconds | ratio |")
    print("|---|---|---|")
    print(f"| plain diffusers | {plain:.4f} | 1.00 |")
    print(f"| SDXLJointModule | {ours:.4f} | {ours / plain:.2f} |")


if __name__ == "__main__":
    main()
