"""The frozen models of the synthetic world, trained in seconds on CPU.

- face-vit: a tiny FaceViT (the release's face-recognition architecture) trained with a
  CosFace margin loss on the training identities' aligned crops. It plays ArcFace: its
  identity vector is the target e_{r_cls}, its patch tokens feed the fuser.
- clip: a tiny open_clip CLIP trained with open_clip's ClipLoss on (scene, caption) and
  the guided pairs. It plays the frozen CLIP image/text towers, and its text tower
  initialises the FaceCLIP branch's text tower.

Both are saved as model directories (model.safetensors + config.json) with their
held-out retrieval scores, so the quickstart's identity signal provably comes from pixels.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from faceclip_zoo.config import CLIPConfig, FaceViTConfig
from faceclip_zoo.metrics import nearest_neighbour_accuracy, retrieval_accuracy
from faceclip_zoo.models.clip import build_clip, build_tokenizer, clip_normalize
from faceclip_zoo.models.face_vit import FaceViT
from faceclip_zoo.models.io import save_model_dir

log = logging.getLogger(__name__)

FACE_VIT = "face-vit"
CLIP = "clip"
VAE = "vae"
VIDEO_VAE = "video-vae"  # a clip world's causal video VAE (Wan's architecture, `wan-vae-tiny`)


def _stack(images) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(im, dtype=np.uint8) for im in images])).permute(
        0, 3, 1, 2).float().div_(255.0)


def _labels(records) -> tuple[torch.Tensor, list[str]]:
    names = [r.identity for r in records]
    codes = {n: i for i, n in enumerate(sorted(set(names)))}
    return torch.tensor([codes[n] for n in names]), names


def cosface_loss(emb: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                 scale: float = 16.0, margin: float = 0.3) -> torch.Tensor:
    """CosFace (large-margin cosine) loss. Hand-written: none of our dependencies ships
    margin-based face-recognition losses."""
    cos = F.normalize(emb, dim=-1) @ F.normalize(weight, dim=-1).T
    cos = cos - margin * F.one_hot(labels, weight.shape[0]).to(cos.dtype)
    return F.cross_entropy(scale * cos, labels)


def _optimise(params, batch_loss, steps: int, lr: float, weight_decay: float) -> float:
    """AdamW with a one-cycle schedule; `batch_loss()` draws a batch and returns its loss."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    # OneCycleLR divides by (warm-up steps - 1): exactly 10 steps would make that zero
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps,
                                                pct_start=0.1 if steps != 10 else 0.2)
    for _ in range(steps):
        loss = batch_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return loss.item()


def train_face_vit(train, val, steps: int, seed: int, batch_size: int = 64) -> tuple[FaceViT, dict]:
    torch.manual_seed(seed)
    cfg = FaceViTConfig.from_name("face-vit-tiny")
    model = FaceViT(cfg)
    crops, labels = _stack([r.crop for r in train]), _labels(train)[0]
    classes = torch.nn.Parameter(torch.randn(int(labels.max()) + 1, cfg.id_dim) * 0.01)
    gen = torch.Generator().manual_seed(seed)

    def batch_loss():
        idx = torch.randint(len(crops), (batch_size,), generator=gen)
        # light photometric jitter so identity cannot be read off exact colours alone
        gain = torch.empty(batch_size, 1, 1, 1).uniform_(0.85, 1.15, generator=gen)
        return cosface_loss(model((crops[idx] * gain).clamp(0, 1))[0], classes, labels[idx])

    model.train()
    loss = _optimise([*model.parameters(), classes], batch_loss, steps, lr=2e-3, weight_decay=0.05)
    model.eval()
    with torch.no_grad():
        emb = model(_stack([r.crop for r in val]))[0]
    acc = nearest_neighbour_accuracy(emb, _labels(val)[1])
    return model, {"train_loss": loss, "val_identity_top1": acc}


def train_clip(train, guided, val, steps: int, seed: int, batch_size: int = 64) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(seed)
    cfg = CLIPConfig.from_name("clip-tiny")
    model = build_clip(cfg)
    tok = build_tokenizer(cfg.text)
    pairs = list(train) + list(guided)
    images = clip_normalize(_stack([r.scene for r in pairs]))
    tokens = tok([r.caption for r in pairs])
    loss_fn = ClipLoss()
    gen = torch.Generator().manual_seed(seed)

    def batch_loss():
        idx = torch.randint(len(pairs), (batch_size,), generator=gen)
        return loss_fn(*model(images[idx], tokens[idx]))

    model.train()
    loss = _optimise(model.parameters(), batch_loss, steps, lr=1e-3, weight_decay=0.1)
    model.eval()
    with torch.no_grad():
        img_f = model.encode_image(clip_normalize(_stack([r.scene for r in val])))
        txt_f = model.encode_text(tok([r.caption for r in val]))
    acc = retrieval_accuracy(img_f, txt_f, [r.caption for r in val])
    return model, {"train_loss": loss, "val_image_to_text_top1": acc}


def _fit_autoencoder(vae, draw, steps: int, gen: torch.Generator) -> float:
    """Train a diffusers autoencoder on batches from `draw()`: reconstruction of a posterior
    sample + a small KL term, AdamW one-cycle; -> the last loss."""
    def batch_loss():
        x = draw()
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        return F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()

    vae.train()
    loss = _optimise(vae.parameters(), batch_loss, steps, lr=2e-3, weight_decay=0.0)
    vae.eval()
    return loss


def train_vae(train, guided, val, steps: int, seed: int, batch_size: int = 16) -> tuple[torch.nn.Module, dict]:
    """The tiny diffusers AutoencoderKL (`vae-tiny`, 4x downsampling) for the synthetic
    scenes: reconstruction + a small KL term on random 32 px crops (it is convolutional, so
    it then codes whole scenes). Its scaling_factor becomes 1 / std of the latents."""
    from faceclip_zoo.config import diffusers_config
    from faceclip_zoo.models.diffusers_models import build_diffusers

    torch.manual_seed(seed)
    cfg = diffusers_config("vae-tiny")
    vae = build_diffusers(cfg)
    images = _stack([r.scene for r in list(train) + list(guided)]) * 2 - 1
    gen = torch.Generator().manual_seed(seed)
    crop = 32
    room = images.shape[-1] - crop + 1

    def draw():
        x = images[torch.randint(len(images), (batch_size,), generator=gen)]
        top, left = torch.randint(0, room, (2,), generator=gen).tolist()
        return x[..., top:top + crop, left:left + crop]

    loss = _fit_autoencoder(vae, draw, steps, gen)
    with torch.no_grad():
        latents = vae.encode(images[:512]).latent_dist.mode()
        vae.register_to_config(scaling_factor=round(1.0 / latents.std().item(), 5))
        x = _stack([r.scene for r in val]) * 2 - 1
        err = (vae.decode(vae.encode(x).latent_dist.mode()).sample - x).abs().mean().item() / 2
    return vae, {"train_loss": loss, "val_mean_abs_error": err,
                 "scaling_factor": vae.config.scaling_factor}


def train_video_vae(train, val, steps: int, seed: int, batch_size: int = 4, window: int = 9
                    ) -> tuple[torch.nn.Module, dict]:
    """The tiny causal video VAE (`wan-vae-tiny`: Wan's AutoencoderKLWan, x4 in space, x2 in
    time) for a clip world: reconstruction + a small KL term on random windows of `window`
    frames (1 + 2 x 4: the first frame and two causal chunks, so the cache one chunk hands
    the next is trained too; one chunk alone left the later frames' error at 0.3) and 32 px (it is convolutional and causal, so it then codes whole clips). Its
    latents_mean / latents_std become the per-channel statistics of the clips' latents, as
    Wan's are."""
    from faceclip_zoo.config import diffusers_config
    from faceclip_zoo.models.diffusers_models import build_diffusers

    torch.manual_seed(seed)
    vae = build_diffusers(diffusers_config("wan-vae-tiny"))
    clips = torch.stack([_stack(r.frames) for r in train]).transpose(1, 2) * 2 - 1  # [N, 3, T, H, W]
    gen = torch.Generator().manual_seed(seed)
    crop, frames = 32, min(window, clips.shape[2])

    def draw():
        x = clips[torch.randint(len(clips), (batch_size,), generator=gen)]
        start = int(torch.randint(0, clips.shape[2] - frames + 1, (1,), generator=gen))
        top, left = torch.randint(0, clips.shape[-1] - crop + 1, (2,), generator=gen).tolist()
        return x[:, :, start:start + frames, top:top + crop, left:left + crop]

    loss = _fit_autoencoder(vae, draw, steps, gen)
    with torch.no_grad():
        latents = torch.cat([vae.encode(clips[i:i + 32]).latent_dist.mode() for i in range(0, min(256, len(clips)), 32)])
        mean, std = latents.mean(dim=(0, 2, 3, 4)), latents.std(dim=(0, 2, 3, 4))
        vae.register_to_config(latents_mean=[round(v, 5) for v in mean.tolist()],
                               latents_std=[round(v, 5) for v in std.tolist()])
        x = torch.stack([_stack(r.frames) for r in val[:64]]).transpose(1, 2) * 2 - 1
        err = (vae.decode(vae.encode(x).latent_dist.mode()).sample - x).abs().mean().item() / 2
    return vae, {"train_loss": loss, "val_mean_abs_error": err}


def vae_folder(spec) -> str:
    return VIDEO_VAE if spec.clip_frames > 1 else VAE


def vae_ready(priors_dir: Path, spec, steps: int) -> bool:
    folder = priors_dir / vae_folder(spec)
    try:
        meta = json.loads((folder / "faceclip_zoo.json").read_text())
    except (OSError, ValueError):
        return False
    return (meta.get("digest") == spec.digest() and meta.get("steps") == steps
            and (folder / "diffusion_pytorch_model.safetensors").exists())


def ensure_vae(priors_dir: Path, spec, data: dict, steps: int) -> dict:
    """Train and save the synthetic VAE (a clip world's: the video VAE) as a diffusers
    folder (+ faceclip_zoo.json)."""
    t0 = time.time()
    if spec.clip_frames > 1:
        vae, scores = train_video_vae(data["train"], data["val"], steps, spec.seed)
    else:
        vae, scores = train_vae(data["train"], data["guided"], data["val"], steps, spec.seed)
    folder = priors_dir / vae_folder(spec)
    vae.save_pretrained(folder, safe_serialization=True)
    info = {"digest": spec.digest(), "steps": steps, **scores, "seconds": round(time.time() - t0, 1)}
    (folder / "faceclip_zoo.json").write_text(json.dumps(info, indent=2) + "\n")
    log.info("synthetic VAE: %s (%.0fs)", scores, time.time() - t0)
    return scores


def _meta_path(folder: Path) -> Path:
    return folder / "config.json"


def priors_ready(priors_dir: Path, digest: str, steps: int) -> bool:
    for name in (FACE_VIT, CLIP):
        try:
            meta = json.loads(_meta_path(priors_dir / name).read_text())
        except (OSError, ValueError):
            return False
        if meta.get("synthetic", {}).get("digest") != digest or meta["synthetic"].get("steps") != steps:
            return False
        if not (priors_dir / name / "model.safetensors").exists():
            return False
    return True


def ensure_priors(priors_dir: Path, spec, data: dict, steps: int) -> dict:
    """Train and save both frozen models; returns their held-out scores."""
    t0 = time.time()
    face, face_scores = train_face_vit(data["train"], data["val"], steps, spec.seed)
    t1 = time.time()
    clip, clip_scores = train_clip(data["train"], data["guided"], data["val"], steps, spec.seed)
    t2 = time.time()
    info = {"digest": spec.digest(), "steps": steps}
    save_model_dir(face, priors_dir / FACE_VIT, extra={"synthetic": {**info, **face_scores,
                                                                      "seconds": round(t1 - t0, 1)}})
    save_model_dir(clip, priors_dir / CLIP, config=CLIPConfig.from_name("clip-tiny"),
                   extra={"synthetic": {**info, **clip_scores, "seconds": round(t2 - t1, 1)}})
    log.info("synthetic face-ViT: %s (%.0fs); synthetic CLIP: %s (%.0fs)",
             face_scores, t1 - t0, clip_scores, t2 - t1)
    return {"face_vit": face_scores, "clip": clip_scores}
