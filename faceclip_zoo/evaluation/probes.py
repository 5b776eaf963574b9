"""Probes along the path from the face to the image, on the held-out synthetic identities
(`evaluate --benchmark synthetic --probes true`, SDXL pipelines):

- identity in the condition: is the held-out identity linearly readable from the
  `prompt_embeds` the UNet receives (a ridge map fitted on the training identities; with the
  face zeroed it must fall to what the captions alone give);
- what a linear map of that condition can draw: a ridge map from the training scenes'
  `prompt_embeds` + pooled to their clean VAE latents, applied to the held-out conditions
  and decoded by the pipeline's VAE (the conditional mean a UNet approximates at the
  zero-SNR step, limited to linear functions), scored like generated images: when it clears
  a target the UNet misses, the information is there and the UNet is slow to use it;
- where along the noise schedule the face helps: the training loss of the pipeline's UNet
  on held-out scenes at fixed timesteps, on the head's region and on the whole image, with
  the face input and with it zeroed (the same latents, noise and captions). The gap is
  what the UNet takes from the identity at that noise level.

Both run the training code itself (SDXLJointModule built from the pipeline folder: its
embed, encode_latents and noise schedule), so they measure what training optimises.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from faceclip_zoo.utils import UserError

TIMESTEPS = (999, 900, 800, 700, 600, 500, 400, 300, 200, 100)


def head_mask(size: int, vae_factor: int, scene_scale: float = 0.8) -> torch.Tensor:
    """[n, n] latent pixels whose centres fall inside the head's box (template x 20..92,
    y 18..110: face, ears and hair) of a synthetic scene of side `size`."""
    k = scene_scale * size / 112
    x0, x1 = size / 2 + (20 - 56) * k, size / 2 + (92 - 56) * k
    y0, y1 = size / 2 + 8 * k + (18 - 64) * k, size / 2 + 8 * k + (110 - 64) * k
    n = size // vae_factor
    centres = (torch.arange(n, dtype=torch.float32) + 0.5) * vae_factor
    mx, my = (centres >= x0) & (centres <= x1), (centres >= y0) & (centres <= y1)
    return (my[:, None] & mx[None, :]).float()


def _mean_se(values: torch.Tensor) -> tuple[float, float]:
    v = values.double()
    return v.mean().item(), (v.std(unbiased=True) / math.sqrt(len(v))).item() if len(v) > 1 else float("nan")


def _batches(samples: list[dict], batch_size: int):
    """Collated batches without any cached features (the probes compute them)."""
    from faceclip_zoo.data.datamodule import collate
    from faceclip_zoo.data.schema import CACHED_FEATURES

    for i in range(0, len(samples), batch_size):
        yield collate([{k: v for k, v in s.items() if k not in CACHED_FEATURES} for s in samples[i:i + batch_size]])


@torch.no_grad()
def _conditions(module, samples: list[dict], zeroed: bool, batch_size: int, pooled: bool = False) -> torch.Tensor:
    """[N, 77 x W] the prompt_embeds the UNet receives per sample (+ the pooled vector)."""
    rows = []
    for batch in _batches(samples, batch_size):
        b = len(batch["caption"])
        embeds, pool = module.embed(batch, torch.zeros(b, dtype=torch.bool), torch.full((b,), zeroed))
        rows.append(torch.cat([embeds.flatten(1)] + ([pool] if pooled else []), dim=1).float().cpu())
    return torch.cat(rows)


@torch.no_grad()
def _face_vectors(face_id, samples: list[dict]) -> torch.Tensor:
    faces = torch.stack([s["face"] for s in samples])
    return torch.cat([F.normalize(face_id(faces[i:i + 64]).float(), dim=-1) for i in range(0, len(faces), 64)])


def _identity_means(vectors: torch.Tensor, samples: list[dict]) -> dict[str, torch.Tensor]:
    """Each identity's mean normalised face-ID vector, identities in sorted order."""
    names = sorted({s["identity"] for s in samples})
    return {n: F.normalize(vectors[[i for i, s in enumerate(samples) if s["identity"] == n]].mean(0), dim=-1)
            for n in names}


def ridge(x: torch.Tensor, y: torch.Tensor, alpha: float = 0.1):
    """Ridge regression x -> y (centred; solved in the dual, for more features than samples),
    the penalty `alpha` times the mean squared row norm. Returns a predict function."""
    x, y = x.double(), y.double()
    mx, my = x.mean(0), y.mean(0)
    xc = x - mx
    gram = xc @ xc.T
    coef = torch.linalg.solve(gram + alpha * gram.diagonal().mean() * torch.eye(len(x), dtype=x.dtype), y - my)
    weights = xc.T @ coef
    return lambda z: ((z.double() - mx) @ weights + my).float()


@torch.no_grad()
def identity_in_embeddings(module, face_id, train: list[dict], held_out: list[dict],
                           batch_size: int = 64) -> dict[str, float]:
    """Is the identity linearly readable from the prompt_embeds the UNet receives? A ridge
    map from the training samples' prompt_embeds to the face-ID vector of their reference
    crop, applied to the held-out samples: identity top-1 of the prediction among the
    held-out identities (chance 1 / identities). The control fits and reads the same map
    on embeddings with the face zeroed (what the captions alone say about identity)."""
    references = _identity_means(_face_vectors(face_id, held_out), held_out)
    names = list(references)
    means = torch.stack(list(references.values()))
    own = torch.tensor([names.index(s["identity"]) for s in held_out])
    target = _face_vectors(face_id, train)
    out = {"chance": 1 / len(names), "train_samples": len(train)}
    for name, zeroed in (("face", False), ("face_zeroed", True)):
        predict = ridge(_conditions(module, train, zeroed, batch_size), target)
        guess = F.normalize(predict(_conditions(module, held_out, zeroed, batch_size)), dim=-1)
        hits = ((guess @ means.T).argmax(1) == own).float()
        out[f"identity_top1_{name}"], out[f"identity_top1_{name}_se"] = _mean_se(hits)
    return out


@torch.no_grad()
def linear_generator(module, train: list[dict], held_out: list[dict], batch_size: int = 64, alpha: float = 0.1,
                     seed: int = 0) -> dict[str, torch.Tensor]:
    """Images [N, 3, S, S] in [0, 1] of the held-out samples drawn by a ridge map from the
    condition to the clean latents (fitted on the training scenes) and decoded by the
    module's VAE: with the face, and with the face zeroed in fit and read alike. Scored
    like generated images by the benchmark."""
    generator = torch.Generator().manual_seed(seed)
    latents = torch.cat([module.encode_latents(b, generator).float().cpu() for b in _batches(train, batch_size)])
    shape = latents.shape[1:]
    scale, shift = module.latent_scale
    vae = module.vae
    out = {}
    for name, zeroed in (("face", False), ("face_zeroed", True)):
        predict = ridge(_conditions(module, train, zeroed, batch_size, pooled=True), latents.flatten(1), alpha)
        z = predict(_conditions(module, held_out, zeroed, batch_size, pooled=True)).view(-1, *shape)
        out[name] = torch.cat([((vae.decode((z[i:i + batch_size] / scale + shift).to(module.device, vae.dtype)).sample
                                 .float().cpu() + 1) / 2).clamp(0, 1) for i in range(0, len(z), batch_size)])
    return out


@torch.no_grad()
def loss_by_timestep(module, samples: list[dict], timesteps=TIMESTEPS, batch_size: int = 32, seed: int = 0,
                     scene_scale: float = 0.8) -> list[dict[str, float]]:
    """Per timestep: the diffusion loss (the module's target: epsilon or v) on the head's
    region and on the whole image, with the face and zeroed; `head_gap` = zeroed - face
    (paired over the samples, with its standard error)."""
    scheduler = module.noise_scheduler
    kind = scheduler.config.prediction_type
    generator = torch.Generator().manual_seed(seed)
    batches = list(_batches(samples, batch_size))
    mask = None
    rows = []
    for t in timesteps:
        per = {k: [] for k in ("head_face", "head_zeroed", "image_face", "image_zeroed")}
        for batch in batches:
            latents = module.encode_latents(batch, generator)
            b = latents.shape[0]
            if mask is None:
                mask = head_mask(batch["image"].shape[-1], module.vae_downsample, scene_scale)
            noise = torch.randn(latents.shape, generator=generator)
            steps = torch.full((b,), int(t), dtype=torch.long)
            noisy = scheduler.add_noise(latents, noise, steps)
            target = noise if kind == "epsilon" else scheduler.get_velocity(latents, noise, steps)
            for name, zeroed in (("face", False), ("zeroed", True)):
                embeds, pooled = module.embed(batch, torch.zeros(b, dtype=torch.bool), torch.full((b,), zeroed))
                pred = module.unet(noisy, steps, embeds, added_cond_kwargs={
                    "text_embeds": pooled, "time_ids": module.time_ids(batch, latents)}).sample
                err = (pred.float() - target.float()).pow(2).mean(1)  # [b, n, n]
                per[f"head_{name}"].append((err * mask).sum((1, 2)) / mask.sum())
                per[f"image_{name}"].append(err.mean((1, 2)))
        cat = {k: torch.cat(v) for k, v in per.items()}
        gap, gap_se = _mean_se(cat["head_zeroed"] - cat["head_face"])
        rows.append({"timestep": int(t), **{k: v.mean().item() for k, v in cat.items()},
                     "head_gap": gap, "head_gap_se": gap_se,
                     "image_gap": (cat["image_zeroed"] - cat["image_face"]).mean().item()})
    return rows


def module_of_pipeline(pipeline: str):
    """The SDXLJointModule over a pipeline folder's encoders, UNet, VAE and scheduler (the
    probes read SDXL's UNet and noise schedule)."""
    from faceclip_zoo.tasks import SDXLJointModule

    if str(pipeline).endswith(".ckpt") or not SDXLJointModule.PIPELINE.is_family_folder(pipeline):
        raise UserError(f"--probes runs the SDXL training code on the pipeline: it needs an SDXL pipeline folder, "
                        f"got {pipeline}")
    module = SDXLJointModule(pipeline=pipeline)
    module.setup("fit")
    return module.eval()


def markdown(probes: dict) -> str:
    emb = probes["identity_in_embeddings"]
    lines = ["", "## Probes", "",
             f"Identity linearly readable from the prompt_embeds the UNet receives (ridge map fitted on "
             f"{emb['train_samples']} training samples, held-out top-1, chance {emb['chance']:.3f}): with the face {emb['identity_top1_face']:.3f} +- "
             f"{emb['identity_top1_face_se']:.3f}, face zeroed {emb['identity_top1_face_zeroed']:.3f} +- "
             f"{emb['identity_top1_face_zeroed_se']:.3f}.", "",
             "A linear map of the condition (ridge, condition -> clean latents, fitted on the training scenes), "
             "its held-out images decoded and scored like generated ones:", "",
             "| condition | identity top-1 | Face Sim | background |", "|---|---|---|---|",
             *[f"| {name} | {r['identity_top1']:.3f} +- {r['identity_top1_se']:.3f} | {r['face_sim']:.3f} +- "
               f"{r['face_sim_se']:.3f} | {r['background_accuracy']:.3f} +- {r['background_accuracy_se']:.3f} |"
               for name, r in probes["linear_generator"].items()], "",
             "Training loss on held-out scenes by timestep (head region / whole image), face vs zeroed:", "",
             "| t | head, face | head, zeroed | head gap | image, face | image, zeroed |", "|---|---|---|---|---|---|"]
    for r in probes["loss_by_timestep"]:
        lines.append(f"| {r['timestep']} | {r['head_face']:.4f} | {r['head_zeroed']:.4f} | {r['head_gap']:+.4f} +- "
                     f"{r['head_gap_se']:.4f} | {r['image_face']:.4f} | {r['image_zeroed']:.4f} |")
    return "\n".join(lines) + "\n"
