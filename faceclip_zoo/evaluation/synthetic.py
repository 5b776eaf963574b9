"""Does a trained diffusion stage follow the reference identity and the caption? Measured
on the held-out synthetic identities, where both can be read from pixels:

- identity: the synthetic face-ID ViT (the quickstart's ArcFace) on the face region of
  each generated scene, compared with the mean identity vector of every held-out
  identity's references. margin = cos(own identity) - mean cos(other identities);
  top1 = share of images whose nearest identity is their own (chance 1 / #identities).
- background: the colour of the generated scene's top corners, nearest of the palette,
  against the caption's background word (chance 1 / 10).

The same numbers for the real validation scenes give the ceiling, and for images
generated without a face (same prompts) the no-identity floor.
"""

from __future__ import annotations

import re
from collections import defaultdict

import torch
import torch.nn.functional as F

from faceclip_zoo.data.synthetic_faces import BACKGROUNDS


def scene_face_crop(scenes: torch.Tensor, size: int = 112) -> torch.Tensor:
    """The aligned face crop inside synthetic scenes [B, 3, S, S] (the renderer's geometry:
    template point (56, 64) at (S/2, S/2 + 8k), k = 0.8 S / 112 pixels per template unit)."""
    s = scenes.shape[-1]
    k = 0.8 * s / 112
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
def identity_scores(face_id, images: torch.Tensor, identities: list[str],
                    references: dict[str, torch.Tensor]) -> dict[str, float]:
    """images: scenes [N, 3, S, S] in [0, 1]; references: identity -> its mean normalised
    identity vector."""
    names = sorted(references)
    refs = torch.stack([references[n] for n in names])
    emb = F.normalize(face_id(scene_face_crop(images)).float(), dim=-1)
    sims = emb @ refs.T  # [N, I]
    own = torch.tensor([names.index(i) for i in identities])
    own_sim = sims[torch.arange(len(own)), own]
    other = (sims.sum(1) - own_sim) / (len(names) - 1)
    return {"own_similarity": own_sim.mean().item(), "other_similarity": other.mean().item(),
            "margin": (own_sim - other).mean().item(),
            "top1": (sims.argmax(1) == own).float().mean().item(), "chance_top1": 1 / len(names)}


@torch.no_grad()
def evaluate_synthetic(pipe, samples: list[dict], face_id, steps: int = 25, guidance: float = 5.0,
                       seed: int = 0, batch_size: int = 16) -> dict[str, dict[str, float]]:
    """samples: validation samples (decoded shard dicts with face, image, caption, identity)."""
    refs: dict[str, list[torch.Tensor]] = defaultdict(list)
    faces = torch.stack([s["face"] for s in samples])
    ref_emb = F.normalize(face_id(faces).float(), dim=-1)
    for s, e in zip(samples, ref_emb):
        refs[s["identity"]].append(e)
    references = {n: F.normalize(torch.stack(v).mean(0), dim=-1) for n, v in refs.items()}
    identities = [s["identity"] for s in samples]
    captions = [s["caption"] for s in samples]
    real = torch.stack([s["image"] for s in samples])
    size = tuple(real.shape[-2:])

    def generate(with_face: bool) -> torch.Tensor:
        out = []
        for i in range(0, len(samples), batch_size):
            gen = torch.Generator().manual_seed(seed + i)
            out.append(pipe.per_row(faces[i:i + batch_size] if with_face else None,
                                    captions[i:i + batch_size], num_inference_steps=steps,
                                    guidance_scale=guidance, height=size[0], width=size[1],
                                    generator=gen))
        return torch.cat(out).float().cpu()

    results = {}
    for name, images in (("real", real), ("generated", generate(True)), ("generated_no_face", generate(False))):
        scores = identity_scores(face_id, images, identities, references)
        predicted = background_of(images)
        wanted = [caption_background(c) for c in captions]
        scores["background_accuracy"] = sum(p == w for p, w in zip(predicted, wanted)) / len(wanted)
        scores["chance_background"] = 1 / len(BACKGROUNDS)
        results[name] = scores
    return results


def load_validation_samples(shards: str, image_size: int = 64, face_size: int = 112) -> list[dict]:
    from faceclip_zoo.data.datamodule import ShardDataModule

    dm = ShardDataModule(val=shards, image_size=image_size, face_size=face_size, num_workers=0, batch_size=64)
    return [s for s in dm.val_dataset() if s["has_face"]]


def main(argv: list[str] | None = None) -> int:
    """python -m faceclip_zoo.evaluation.synthetic --pipeline checkpoints/quickstart-sdxl"""
    import argparse

    from faceclip_zoo.models.face_vit import FaceViTIdentity
    from faceclip_zoo.models.io import load_model_dir
    from faceclip_zoo.pipelines.export import load_pipeline

    p = argparse.ArgumentParser(prog="python -m faceclip_zoo.evaluation.synthetic", description=__doc__.split("\n")[0])
    p.add_argument("--pipeline", default="checkpoints/quickstart-sdxl")
    p.add_argument("--val", default="runs/synthetic/val")
    p.add_argument("--face-id", default="checkpoints/synthetic/face-vit")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    pipe = load_pipeline(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    face_id = FaceViTIdentity(load_model_dir(args.face_id, expect="face_vit")).eval()
    samples = load_validation_samples(args.val)
    results = evaluate_synthetic(pipe, samples, face_id, steps=args.steps, guidance=args.guidance, seed=args.seed)
    cols = ["own_similarity", "other_similarity", "margin", "top1", "background_accuracy"]
    print(f"{len(samples)} held-out samples, {len({s['identity'] for s in samples})} identities; "
          f"chance top1 {results['real']['chance_top1']:.3f}, chance background {results['real']['chance_background']:.2f}")
    print(f"| images | {' | '.join(cols)} |")
    print("|---" * (len(cols) + 1) + "|")
    for name, r in results.items():
        print(f"| {name} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
