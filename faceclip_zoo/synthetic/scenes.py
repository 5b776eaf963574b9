"""Reading and drawing synthetic scenes: where the face is, which background, images
generated for a list of samples, contact sheets. Shared by the validation-world report
(benchmark.py), the test-world protocol (protocol.py) and the judge (judge.py)."""

from __future__ import annotations

import re
from collections import defaultdict

import torch
import torch.nn.functional as F

from faceclip_zoo.synthetic.faces import BACKGROUNDS


def scene_face_crop(scenes: torch.Tensor, size: int = 112, scene_scale: float = 0.8) -> torch.Tensor:
    """The aligned face crop inside synthetic scenes [B, 3, S, S] (the renderer's geometry:
    template point (56, 64) at (S/2, S/2 + 8k), k = scene_scale S / 112 pixels per template
    unit; SyntheticSpec.scene_scale)."""
    s = scenes.shape[-1]
    k = scene_scale * s / 112
    # crop pixel (x, y) -> scene pixel (S/2 + (x - 56) k, S/2 + 8k + (y - 64) k)
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    xs = s / 2 + (coords - 56) * k
    ys = s / 2 + 8 * k + (coords - 64) * k
    gy, gx = torch.meshgrid(ys / s * 2 - 1, xs / s * 2 - 1, indexing="ij")
    grid = torch.stack([gx, gy], dim=-1)[None].expand(scenes.shape[0], -1, -1, -1)
    return F.grid_sample(scenes.float(), grid.to(scenes.device), mode="bilinear", align_corners=False)


def background_of(scenes: torch.Tensor, patch: int = 6) -> list[str]:
    """Nearest palette colour of the two top corners (the background in every scene)."""
    corners = torch.cat([scenes[:, :, :patch, :patch], scenes[:, :, :patch, -patch:]], dim=-1)
    colour = corners.flatten(2).median(dim=-1).values * 255  # [B, 3]
    names = list(BACKGROUNDS)
    palette = torch.tensor([BACKGROUNDS[n] for n in names], dtype=torch.float32)
    return [names[i] for i in torch.cdist(colour.float().cpu(), palette).argmin(dim=1).tolist()]


def caption_background(caption: str) -> str | None:
    m = re.search(r"in front of an? (\w+) background", caption)
    return m.group(1) if m else None


@torch.no_grad()
def generate_images(pipe, samples: list[dict], with_face: bool, steps: int = 25, guidance: float | None = None,
                    seed: int = 0, batch_size: int = 16, images_per_sample: int = 1) -> torch.Tensor:
    """One image (a clip, for samples with a video) per sample and seed ([images_per_sample *
    N, 3, S, S] or [.., F, 3, S, S], seed-major), at the
    samples' size, from their captions and (with_face) reference faces; negative branch: zero
    face + "" (the synthetic world's unconditional condition). The same seeds with and
    without the face, so the two sets are paired."""
    faces = torch.stack([s["face"] for s in samples])
    captions = [s["caption"] for s in samples]
    size = tuple(samples[0]["image"].shape[-2:])
    kwargs = {} if guidance is None else {"guidance_scale": guidance}
    if "video" in samples[0]:  # clips ([N, F, 3, S, S] out): as long as the samples'
        kwargs["num_frames"] = samples[0]["video"].shape[1]
    out = []
    for k in range(images_per_sample):
        for i in range(0, len(samples), batch_size):
            gen = torch.Generator().manual_seed(seed + 100_003 * k + i)
            out.append(pipe.per_row(faces[i:i + batch_size] if with_face else None,
                                    captions[i:i + batch_size], negative_prompt="",
                                    num_inference_steps=steps, height=size[0], width=size[1],
                                    generator=gen, **kwargs).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def vae_round_trip(vae, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """What the diffusion model can at best reproduce: scenes (or clips, [N, F, 3, H, W])
    through the pipeline's VAE."""
    p = next(vae.parameters())
    clips = images.dim() == 5
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(device=p.device, dtype=p.dtype) * 2 - 1
        x = x.transpose(1, 2) if clips else x  # a video VAE reads [B, 3, F, H, W]
        z = vae.encode(x).latent_dist.mode()
        y = ((vae.decode(z).sample.float() + 1) / 2).clamp(0, 1).cpu()
        out.append(y.transpose(1, 2) if clips else y)
    return torch.cat(out)


def contact_sheet(samples: list[dict], sets: dict[str, torch.Tensor], path, per_identity: int = 1,
                  identities: int = 6) -> None:
    """Rows: one held-out identity each; columns: reference | real scene | generated |
    generated with the face zeroed (same prompt and seed); for clips the real and generated
    ones show their first, middle and last frames (the zeroed one its first)."""
    from torchvision.utils import save_image

    picked, seen = [], defaultdict(int)
    for i, s in enumerate(samples):
        if seen[s["identity"]] < per_identity and len(seen) <= identities:
            if len(seen) == identities and s["identity"] not in seen:
                break
            seen[s["identity"]] += 1
            picked.append(i)
    size = sets["real"].shape[-1]

    def shown(x: torch.Tensor) -> list[torch.Tensor]:  # a clip: its first, middle and last frames
        return [x] if x.dim() == 3 else [x[0], x[len(x) // 2], x[-1]]

    tiles = []
    for i in picked:
        ref = F.interpolate(samples[i]["face"][None], size=(size, size), mode="bilinear", align_corners=False)[0]
        tiles += [ref, *shown(sets["real"][i]), *shown(sets["generated"][i]), shown(sets["generated_no_face"][i])[0]]
    save_image(torch.stack(tiles), str(path), nrow=len(tiles) // len(picked), padding=2, pad_value=1.0)
