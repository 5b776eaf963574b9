"""The identity loss of the diffusion stages (PuLID's "accurate ID loss", made cheap).

At a few low-noise training rows the denoiser's prediction already says what the clean
image is. We turn it into that image (predicted clean latent -> frozen VAE decoder), cut
out the face, embed it with the training face-ID network and pull it towards the
reference face's identity:

    x0_hat = x0(z_t, prediction, t)          (per family: SDXL eps / v, FLUX flow)
    L_id = weight * mean_rows(1 - cos(F(crop(D(x0_hat))), F(reference)))

Cheap by construction: only a `fraction` of the rows that show a face take part, their
noise level is drawn below `max_noise` (where x0_hat is sharp enough to hold a face), and
only the face region reaches the face-ID network. Gradients flow through the decoder and
the face network (both frozen) into the denoiser.

The face-ID network is the conditioning encoder's own face ViT ("encoder") or a face ViT
model directory: a network the training may read. Evaluation's independent judge is never
one of them (it is another architecture, trained on people no training world holds).

The face region: the whole image ("image": portraits framed like the aligned crop, as the
synthetic portrait world), a fixed box in fractions of the image, or each sample's own
5-point landmarks (`prepare` stores them; "landmarks"), warped onto the ArcFace template
with a differentiable similarity transform. Written here: no library has this loss.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F

from faceclip_zoo.utils import UserError


@dataclass
class IdentityLossSettings:
    """What a recipe says about the identity loss (`model.init_args.identity_loss`).

    Args:
        weight: the loss's factor beside the diffusion loss.
        fraction: share of the batch's rows with a face that take part (at least one row).
        max_noise: those rows' noise level is drawn uniformly below this (t / T for SDXL,
            sigma for FLUX): the rows still count in the diffusion loss at that level.
        region: "image", "landmarks", or [left, top, right, bottom] in fractions of the image.
        network: "encoder" (the conditioning encoder's face ViT) or a face ViT model
            directory (`face_vit` config.json + model.safetensors).
        jitter: shift and scale each row's face crop at random by up to this fraction of
            its side (0.05: a few pixels), so that no pixel pattern read through one exact
            crop can satisfy the face network (the images must hold the face, not an
            adversarial pattern for one network).
    """

    weight: float = 0.1
    fraction: float = 0.25
    max_noise: float = 0.3
    region: Union[str, list[float]] = "image"
    network: str = "encoder"
    jitter: float = 0.0

    def __post_init__(self):
        if self.weight < 0:
            raise UserError(f"identity_loss.weight must be >= 0, got {self.weight}")
        if not 0.0 < self.fraction <= 1.0:
            raise UserError(f"identity_loss.fraction must be in (0, 1], got {self.fraction}")
        if not 0.0 <= self.jitter < 0.5:
            raise UserError(f"identity_loss.jitter must be in [0, 0.5), got {self.jitter}")
        if not 0.0 < self.max_noise <= 1.0:
            raise UserError(f"identity_loss.max_noise must be in (0, 1], got {self.max_noise}")
        if isinstance(self.region, str):
            if self.region not in ("image", "landmarks"):
                raise UserError(f"identity_loss.region must be 'image', 'landmarks' or a box [left, top, right, "
                                f"bottom] in fractions of the image; got {self.region!r}")
        else:
            box = [float(v) for v in self.region]
            if len(box) != 4 or not (0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1):
                raise UserError(f"identity_loss.region box must be [left, top, right, bottom] with 0 <= left < "
                                f"right <= 1 and 0 <= top < bottom <= 1; got {self.region}")
            self.region = box

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: "dict | IdentityLossSettings | None") -> "IdentityLossSettings | None":
        return d if d is None or isinstance(d, IdentityLossSettings) else cls(**d)


def load_face_network(spec: str, encoder_face_vit: torch.nn.Module) -> torch.nn.Module:
    """The identity loss's face ViT: the encoder's own, or one from a model directory."""
    if spec == "encoder":
        return encoder_face_vit
    from faceclip_zoo.models.io import load_model_dir

    if not (Path(spec) / "config.json").is_file():
        raise UserError(f"identity_loss.network {spec!r} is neither 'encoder' nor a face ViT model directory "
                        "(config.json + model.safetensors)")
    return load_model_dir(spec, expect="face_vit").eval().requires_grad_(False)


def _to_normalised(size_hw: tuple[int, int]) -> torch.Tensor:
    """3x3: pixel coordinates (x, y) -> grid_sample's [-1, 1] (align_corners=False)."""
    h, w = size_hw
    return torch.tensor([[2 / w, 0, 1 / w - 1], [0, 2 / h, 1 / h - 1], [0, 0, 1]], dtype=torch.float64)


def crop_to_image(region, image_hw: tuple[int, int], size: int, landmarks: torch.Tensor | None) -> torch.Tensor:
    """[B, 3, 3]: pixels of the face crop (size x size) -> pixels of the image, per row: a
    box's scale and offset, or the inverse of the 5-point similarity transform `prepare`'s
    norm_crop applies (the ArcFace template at this size)."""
    from faceclip_zoo.data.align import alignment_matrix

    h, w = image_hw
    if region == "landmarks":
        out = []
        for points in landmarks.detach().cpu().numpy():
            m = np.vstack([alignment_matrix(points, 112), [0, 0, 1]])  # image px -> 112 crop px
            out.append(torch.from_numpy(np.linalg.inv(np.diag([size / 112, size / 112, 1.0]) @ m)))
        return torch.stack(out)
    left, top, right, bottom = (0.0, 0.0, 1.0, 1.0) if region == "image" else region
    box = torch.tensor([[(right - left) * w / size, 0, left * w], [0, (bottom - top) * h / size, top * h], [0, 0, 1]],
                       dtype=torch.float64)
    return box.expand(1 if landmarks is None else len(landmarks), 3, 3)


def latent_windows(region, image_hw: tuple[int, int], size: int, landmarks: torch.Tensor | None, downsample: int,
                   margin: int = 2) -> list[tuple[int, int, int, int]] | None:
    """Per row, the latent window (top, left, bottom, right) that holds the face crop with
    `margin` latent pixels around it: only that window is decoded. None for "image"."""
    if region == "image":
        return None
    lh, lw = image_hw[0] // downsample, image_hw[1] // downsample
    corners = torch.tensor([[0, 0, 1], [size, 0, 1], [0, size, 1], [size, size, 1]], dtype=torch.float64).T
    out = []
    for m in crop_to_image(region, image_hw, size, landmarks):
        xy = (m @ corners)[:2] / downsample
        left, top = int(xy[0].min().floor()) - margin, int(xy[1].min().floor()) - margin
        right, bottom = int(xy[0].max().ceil()) + margin, int(xy[1].max().ceil()) + margin
        top, left = min(max(top, 0), lh - 1), min(max(left, 0), lw - 1)
        out.append((top, left, max(min(bottom, lh), top + 1), max(min(right, lw), left + 1)))
    return out


def jitter_matrices(n: int, size: int, amount: float, generator: torch.Generator | None) -> torch.Tensor:
    """[n, 3, 3]: crop pixels -> crop pixels, each a random scale in 1 +- amount about the
    crop's centre and a shift of up to amount x size."""
    device = generator.device if generator is not None else "cpu"
    u = (torch.rand(n, 3, generator=generator, device=device).cpu().double() * 2 - 1) * amount
    scale, c = 1 + u[:, 0], size / 2
    out = torch.zeros(n, 3, 3, dtype=torch.float64)
    out[:, 0, 0] = out[:, 1, 1] = scale
    out[:, 0, 2] = c - scale * c + u[:, 1] * size
    out[:, 1, 2] = c - scale * c + u[:, 2] * size
    out[:, 2, 2] = 1
    return out


def face_region(images: torch.Tensor, region, size: int, landmarks: torch.Tensor | None = None,
                image_hw: tuple[int, int] | None = None, offset: tuple[int, int] = (0, 0),
                jitter: torch.Tensor | None = None) -> torch.Tensor:
    """The face crops [B, 3, size, size] of images [B, 3, H, W] (differentiable). `images`
    may be a window of a training image of `image_hw` whose top-left pixel is `offset`
    (x, y): a box and landmarks are in that image's pixels. `jitter` ([B, 3, 3], crop pixels
    -> crop pixels) moves each crop."""
    if region == "image" and jitter is None:
        return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    region = [0.0, 0.0, 1.0, 1.0] if region == "image" else region
    window_hw = tuple(images.shape[-2:])
    shift = torch.tensor([[1, 0, -offset[0]], [0, 1, -offset[1]], [0, 0, 1]], dtype=torch.float64)
    to_image = crop_to_image(region, image_hw or window_hw, size, landmarks).expand(len(images), 3, 3)
    if jitter is not None:
        to_image = to_image @ jitter
    theta = _to_normalised(window_hw) @ shift @ to_image @ torch.linalg.inv(_to_normalised((size, size)))
    grid = F.affine_grid(theta[:, :2].to(device=images.device, dtype=torch.float32), [len(images), 3, size, size],
                         align_corners=False)
    return F.grid_sample(images, grid.to(images.dtype), mode="bilinear", align_corners=False)


def identity_rows(batch: dict, eligible: torch.Tensor, settings: IdentityLossSettings,
                  generator: torch.Generator | None) -> torch.Tensor:
    """Boolean [B]: the rows that take the identity loss, drawn among `eligible` (rows whose
    face reaches the denoiser; with region "landmarks" also rows that have landmarks)."""
    if settings.region == "landmarks":
        marks = batch.get("face_landmarks")
        has = torch.zeros_like(eligible) if marks is None else torch.isfinite(marks.to(eligible.device)).flatten(1).all(1)
        eligible = eligible & has
    n = int(eligible.sum())
    rows = torch.zeros_like(eligible)
    if n == 0:
        return rows
    keep = max(1, round(settings.fraction * n))
    order = torch.randperm(n, generator=generator, device=generator.device if generator is not None else "cpu")
    rows[eligible.nonzero().flatten()[order[:keep].to(eligible.device)]] = True
    return rows


def identity_loss(decode, clean_latents: torch.Tensor, faces: torch.Tensor, network: torch.nn.Module, settings,
                  downsample: int, landmarks: torch.Tensor | None = None,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """mean(1 - cos) between the face network's identity of the face regions decoded from
    `clean_latents` (`decode`: latents -> images in [-1, 1]; only each row's latent window
    around its face is decoded) and of the reference crops (in [0, 1])."""
    size = network.config.image_size
    n = len(clean_latents)
    jitter = jitter_matrices(n, size, settings.jitter, generator) if settings.jitter > 0 else None
    image_hw = (clean_latents.shape[-2] * downsample, clean_latents.shape[-1] * downsample)
    windows = latent_windows(settings.region, image_hw, size, landmarks, downsample,
                             margin=2 + int(settings.jitter * size / downsample + 0.999))
    if windows is None:
        crops = face_region(((decode(clean_latents).float() + 1) / 2).clamp(0, 1), "image", size, jitter=jitter)
    else:
        crops = []
        for i, (top, left, bottom, right) in enumerate(windows):
            window = ((decode(clean_latents[i:i + 1, :, top:bottom, left:right]).float() + 1) / 2).clamp(0, 1)
            crops.append(face_region(window, settings.region, size, None if landmarks is None else landmarks[i:i + 1],
                                     image_hw=image_hw, offset=(left * downsample, top * downsample),
                                     jitter=None if jitter is None else jitter[i:i + 1]))
        crops = torch.cat(crops)
    dtype = next(network.parameters()).dtype
    generated = network(crops.to(dtype))[0].float()
    with torch.no_grad():
        reference = network(faces.to(dtype))[0].float()
    return (1 - F.cosine_similarity(generated, reference, dim=-1)).mean()
