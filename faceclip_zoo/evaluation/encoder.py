"""Encoder evaluation: zero-shot classification (paper Sec. 4.2) and identity structure of
the joint embedding (paper Fig. 2).

Zero-shot: class prompts go through the joint encoder with a black face image (the
release's no-face rows: no id prefix, zero face input); images go through the CLIP vision
tower; the nearest class wins. The encoder's prompt embedding reaches CLIP space through
  - `text_head`: the pre-training head e_{c->t} (in a fit checkpoint), trained against
    CLIP image embeddings by the image loss, or
  - `text_projection`: the branch's own CLIP text projection of the pooled EOT state (the
    only map a released encoder directory has).
The same classes through the CLIP model's own text tower give the reference accuracy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from faceclip_zoo.data.images import open_photo
from faceclip_zoo.evaluation.spec import IMAGE_SUFFIXES
from faceclip_zoo.metrics import nearest_neighbour_accuracy
from faceclip_zoo.utils import UserError, require_file

DEFAULT_TEMPLATES = ("a photo of a {}.",)


@dataclass
class EncoderUnderTest:
    encoder: nn.Module  # FaceCLIPEncoder / FaceT5Encoder
    text_head: nn.Linear | None = None
    head_pool: str = "flatten"


def load_encoder(path: str | Path) -> EncoderUnderTest:
    """A model directory (export / convert) or a fit checkpoint of an encoder task (which
    also holds the pre-training heads)."""
    from faceclip_zoo.models.io import checkpoint_exports, load_model_dir, model_from_checkpoint
    from faceclip_zoo.utils import safe_torch_load

    p = require_file(path, "encoder")
    if p.is_dir():
        return EncoderUnderTest(load_model_dir(p))
    ckpt = safe_torch_load(p, mmap=False)
    spec = checkpoint_exports(ckpt).get("encoder")
    if spec is None:
        raise UserError(f"{p} is not a checkpoint of an encoder task (FaceCLIPEncoderModule / FaceT5EncoderModule)")
    encoder, config = model_from_checkpoint(ckpt, spec, f"{p} [encoder]")
    state = ckpt["state_dict"]
    if not hasattr(encoder, "config"):
        encoder.config = config
    w = state["text_head.weight"]
    head = nn.Linear(w.shape[1], w.shape[0])
    head.load_state_dict({"weight": w, "bias": state["text_head.bias"]})
    pool = ckpt.get("hyper_parameters", {}).get("head_pool", "flatten")
    return EncoderUnderTest(encoder.eval(), head.eval(), pool)


@torch.no_grad()
def prompt_embeddings(under: EncoderUnderTest, prompts: Sequence[str], head: str = "auto",
                      batch: int = 64) -> torch.Tensor:
    """Prompts through the joint encoder with a black face -> normalised CLIP-space vectors."""
    if head == "auto":
        head = "text_head" if under.text_head is not None else "text_projection"
    if head == "text_head" and under.text_head is None:
        raise UserError("head text_head needs a fit checkpoint of the encoder (a model directory has no heads)")
    if head == "text_projection" and getattr(under.encoder, "text_projection", None) is None:
        raise UserError("this encoder has no CLIP text projection (FaceT5); give its fit checkpoint to use text_head")
    out = []
    for k in range(0, len(prompts), batch):
        joint = under.encoder.encode(list(prompts[k:k + batch]))  # no face: black image, no id prefix
        if head == "text_head":
            pooled = joint.embeds.flatten(1) if under.head_pool == "flatten" else joint.embeds.mean(1)
            out.append(under.text_head(pooled))
        else:
            proj = under.encoder.text_projection
            out.append(proj(joint.pooled) if isinstance(proj, nn.Module) else joint.pooled @ proj)
    return F.normalize(torch.cat(out).float(), dim=-1)


def image_folder(root: str | Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """<root>/<class>/<image>: class names (underscores read as spaces) and labelled files."""
    root = require_file(root, "image folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    items = [(f, i) for i, c in enumerate(classes) for f in sorted((root / c).rglob("*"))
             if f.suffix.lower() in IMAGE_SUFFIXES]
    if len(classes) < 2 or not items:
        raise UserError(f"{root} needs one sub-folder of images per class (at least 2 classes)")
    return [c.replace("_", " ") for c in classes], items


@torch.no_grad()
def zero_shot(under: EncoderUnderTest, clip, root: str | Path, templates: Sequence[str] = DEFAULT_TEMPLATES,
              head: str = "auto", batch: int = 64) -> dict:
    classes, items = image_folder(root)

    def classifier(embed) -> torch.Tensor:
        per_template = torch.stack([embed([t.format(c) for c in classes]) for t in templates])
        return F.normalize(per_template.mean(0), dim=-1)  # [C, D]

    weights = {"faceclip": classifier(lambda p: prompt_embeddings(under, p, head)),
               "clip_text_tower": classifier(clip.text_features)}
    labels = torch.tensor([label for _, label in items])
    image_feats = torch.cat([clip.image_features([open_photo(f, "--zero_shot") for f, _ in items[k:k + batch]])
                             for k in range(0, len(items), batch)])
    result = {"classes": len(classes), "images": len(items), "templates": list(templates),
              "clip_model": clip.spec, "chance": 1 / len(classes)}
    for name, w in weights.items():
        if w.shape[-1] != image_feats.shape[-1]:
            raise UserError(f"{name} gives {w.shape[-1]}-d class vectors, the CLIP model {clip.spec} "
                            f"{image_feats.shape[-1]}-d images: use the CLIP model the encoder was trained with")
        logits = image_feats @ w.T
        top = logits.topk(min(5, len(classes)), dim=1).indices
        result[name] = {"top1": (top[:, 0] == labels).float().mean().item(),
                        "top5": (top == labels[:, None]).any(1).float().mean().item()}
    return result


@torch.no_grad()
def joint_embeddings(encoder: nn.Module, faces: torch.Tensor, prompt: str = "a photo of a person",
                     batch: int = 64) -> torch.Tensor:
    """Aligned face crops [N, 3, S, S] with one fixed prompt -> flattened joint embeddings."""
    return torch.cat([encoder.encode([prompt] * len(faces[k:k + batch]), faces[k:k + batch]).embeds.flatten(1)
                      for k in range(0, len(faces), batch)]).float()


def identity_structure(encoder: nn.Module, faces: torch.Tensor, identities: list[str], out_png: Path,
                       title: str, prompt: str = "a photo of a person") -> dict:
    """Fig. 2: t-SNE of joint embeddings coloured by identity, plus the number that says
    what the picture shows (leave-one-out nearest-neighbour identity accuracy)."""
    from faceclip_zoo.tasks.callbacks import tsne_plot

    emb = joint_embeddings(encoder, faces, prompt)
    tsne_plot(emb, identities, out_png, title)
    return {"identity_top1": nearest_neighbour_accuracy(emb, identities), "faces": len(identities),
            "identities": len(set(identities)), "chance": 1 / len(set(identities)), "tsne": str(out_png)}


def face_files(root: str | Path) -> list[tuple[Path, str]]:
    """<root>/<identity>/<image>: (file, identity) pairs, checked before any model loads:
    at least 2 identities, each with at least 2 images (an image's identity is found by
    its nearest other image; alone, it has none)."""
    root = require_file(root, "--faces folder")
    if not root.is_dir():
        raise UserError(f"--faces {root} is not a folder (expected one sub-folder of face images per identity)")
    files = [(f, sub.name) for sub in sorted(p for p in root.iterdir() if p.is_dir())
             for f in sorted(sub.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    counts = {name: sum(n == name for _, n in files) for name in dict.fromkeys(n for _, n in files)}
    if len(counts) < 2:
        raise UserError(f"--faces {root} needs one sub-folder of face images per identity (at least 2), "
                        f"found {len(counts)}")
    alone = sorted(name for name, n in counts.items() if n < 2)
    if alone:
        raise UserError(f"--faces {root}: {len(alone)} identities have a single image ({', '.join(alone[:5])}); "
                        "each needs at least 2 (its nearest other image decides the identity)")
    return files


def face_folder(root: str | Path, size: int, locate: str = "aligned") -> tuple[torch.Tensor, list[str]]:
    """<root>/<identity>/<image> -> aligned crops [N, 3, size, size] and identity names."""
    from faceclip_zoo.evaluation.models import FaceLocator

    files = face_files(root)
    locator = FaceLocator(locate, size=size)
    crops, names = [], []
    for f, name in files:
        crop = locator(open_photo(f, "--faces"))
        if crop is None:
            raise UserError(f"--faces: no face found in {f}")
        crops.append(crop)
        names.append(name)
    return torch.stack(crops), names


def evaluate_encoder(encoder: str, out: str | Path, clip: str | None = None, zero_shot_dir: str | None = None,
                     faces_dir: str | None = None, templates: Sequence[str] = DEFAULT_TEMPLATES,
                     head: str = "auto", align: str = "aligned") -> dict:
    from faceclip_zoo.evaluation.models import ClipModel

    if faces_dir:
        face_files(faces_dir)  # checked before the encoder loads
    if zero_shot_dir:
        image_folder(zero_shot_dir)
    out = Path(out)
    under = load_encoder(encoder)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"encoder": str(encoder)}
    if zero_shot_dir:
        if not clip:
            raise UserError("zero-shot needs --clip (the CLIP model whose vision tower embeds the images)")
        results["zero_shot"] = zero_shot(under, ClipModel(clip), zero_shot_dir, templates, head)
    if faces_dir:
        size = under.encoder.config.face.image_size
        faces, names = face_folder(faces_dir, size, align)
        results["identity_structure"] = identity_structure(
            under.encoder, faces, names, out / "tsne_identity.png", f"joint embeddings by identity ({encoder})")
    (out / "encoder_results.json").write_text(json.dumps(results, indent=2))
    return results
