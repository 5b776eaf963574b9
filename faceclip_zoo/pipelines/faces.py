"""Face inputs of the pipelines: photos or crops -> aligned crops as the training data.

Shared by FaceCLIPSDXLPipeline and FaceT5FluxPipeline (both name their encoder component
`face_encoder`, whose `.encoder.config.face.image_size` is the crop size).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from faceclip_zoo.utils import UserError

FaceInput = str | os.PathLike | Image.Image | np.ndarray | torch.Tensor
Aligner = Callable[[Image.Image], Image.Image]
AlignMode = str  # "auto" | "always" | "never"
# Landmarks this close (pixels of a 448 crop, mean over the 5 points) to the template: the
# image is already an aligned crop and is used as it is (re-cropping would only blur it).
ALREADY_ALIGNED_PX = 8.0


def auto_align(face: Image.Image, mode: AlignMode = "auto", detector=None) -> Image.Image:
    """Align a photo like the training data. "auto": photos are aligned, crops that are
    already aligned are kept; "always": always re-crop; "never": trust the input. A photo
    without a detectable face is a UserError."""
    if mode == "never":
        return face
    if mode not in ("auto", "always"):
        raise UserError(f"align must be auto, always or never, got {mode!r}")
    from faceclip_zoo.data.align import crop_face, default_detector, pick_face, template_deviation
    from faceclip_zoo.data.images import ImageRejected

    rgb = np.asarray(face.convert("RGB"))
    name = getattr(face, "filename", "") or "face_image"
    try:
        found, _ = pick_face((detector or default_detector()).detect(rgb), where=name)
    except ImageRejected:
        raise UserError(f"no face found in {name}: give a photo in which a face is visible; if it is "
                        "already an aligned crop the detector cannot read (e.g. the synthetic faces), "
                        "pass align='never' (generate: --align never)") from None
    if mode == "auto" and face.width == face.height:
        if template_deviation(found.landmarks * (448 / face.width)).mean() < ALREADY_ALIGNED_PX:
            return face
    return Image.fromarray(crop_face(rgb, found, 448).crop)


def to_pil(face: str | os.PathLike | Image.Image | np.ndarray) -> Image.Image:
    """A path, PIL image or H x W x 3 uint8 array -> RGB PIL (the images a detector reads)."""
    if isinstance(face, np.ndarray):
        if face.ndim != 3 or face.shape[-1] != 3:
            raise UserError(f"face array must be H x W x 3 (RGB uint8), got shape {face.shape}")
        if face.dtype != np.uint8:  # a float array cast to uint8 would lose the picture silently
            raise UserError(f"face array must be uint8 (0-255), got {face.dtype}; pass float crops in "
                            "[0, 1] as a [3, H, W] torch tensor")
        face = Image.fromarray(face)
    elif isinstance(face, (str, os.PathLike)):
        from faceclip_zoo.data.images import open_photo

        path = Path(face)
        if not path.is_file():
            raise UserError(f"face image {path} does not exist")
        return open_photo(path, "face image")  # as `prepare` decodes: upright, 16-bit scaled, size-checked
    if not isinstance(face, Image.Image):
        raise UserError(f"face_image must be a path, PIL image, array or tensor, got {type(face).__name__}")
    from faceclip_zoo.data.images import as_rgb_array

    return Image.fromarray(as_rgb_array(face))  # 16-bit, palette, alpha, CMYK as `prepare` converts them


def face_tensor(face: FaceInput) -> torch.Tensor:
    """An aligned crop -> float [3, H, W] in [0, 1] at its own resolution (the release's
    ToTensor: 8-bit images divided by 255, nothing resized); float tensors pass unchanged."""
    if isinstance(face, torch.Tensor):
        t = face.detach()
        if t.ndim != 3 or t.shape[0] != 3:
            raise UserError(f"face tensor must be [3, H, W] in [0, 1], got shape {tuple(t.shape)}")
        return t.float() if t.is_floating_point() else t.float().div(255.0)
    from faceclip_zoo.data.schema import pil_to_tensor

    return pil_to_tensor(to_pil(face))


def load_face(face: FaceInput, size: int) -> torch.Tensor:
    """An aligned crop -> the face ViT's input [3, size, size]: the crop at its own
    resolution, resized inside float by the release's interpolation (bilinear, no
    antialiasing), exactly as training shards are decoded and as the encoder itself would
    resize the full crop."""
    from faceclip_zoo.data.schema import square_face

    return square_face(face_tensor(face), size)


class FaceInputMixin:
    """Face preparation and embedding for a pipeline with a `face_encoder` component and a
    `condition` (SDXLCondition / FluxCondition) over it."""

    aligner: Aligner | None = None
    align: AlignMode = "auto"
    # The text of the negative (unconditional) branch when the caller gives none: each
    # pipeline sets its release's (pipelines/defaults.py).
    default_negative_prompt: str = ""

    def set_aligner(self, aligner: Aligner | None) -> None:
        """Replace the built-in alignment (auto_align) by a function photo -> aligned crop
        (raising UserError when it finds no face)."""
        self.aligner = aligner

    def prepare_faces(self, face_image: FaceInput | Sequence[FaceInput], align: AlignMode | None = None
                      ) -> torch.Tensor:
        """One image or several references of one person -> the face ViT's inputs
        [N, 3, S, S] (see load_face). Tensors are taken as aligned crops (they come from
        datasets); paths, PIL images and arrays go through the aligner (see auto_align)."""
        size = self.face_encoder.encoder.config.face.image_size
        faces = list(face_image) if isinstance(face_image, (list, tuple)) else [face_image]
        if not faces:
            raise UserError("face_image is an empty list")
        mode = align or self.align

        def aligned(face):
            if isinstance(face, torch.Tensor):
                return face
            pil = to_pil(face)
            if isinstance(face, (str, os.PathLike)):
                pil.filename = str(face)
            return self.aligner(pil) if self.aligner is not None else auto_align(pil, mode)

        return torch.stack([load_face(aligned(face), size) for face in faces])


    @torch.no_grad()
    def encode(
        self, prompts: Sequence[str], negative_prompts: Sequence[str],
        faces: torch.Tensor | None, device: torch.device,
    ) -> dict[str, torch.Tensor]:
        """Embeddings for `prompts` of one person (faces [N, 3, S, S]: N references,
        averaged) or of nobody (faces None), plus the release's negative branch."""
        cond = self.condition
        dtype = self.face_encoder.dtype
        b = len(prompts)
        if faces is None:
            pos = cond.unconditional(list(prompts), device, dtype)
        else:
            feats = cond.face_features(faces.to(device=device, dtype=dtype))
            feats = tuple(cond.average_references(f) for f in feats)
            feats = tuple((i.expand(b, -1), p.expand(b, -1, -1)) for i, p in feats)
            pos = cond(list(prompts), None, torch.ones(b, dtype=torch.bool, device=device),
                       face_features=feats)
        neg = cond.unconditional(list(negative_prompts), device, dtype)
        return dict(prompt_embeds=pos[0], pooled_prompt_embeds=pos[1],
                    negative_prompt_embeds=neg[0], negative_pooled_prompt_embeds=neg[1])

    def embed_request(self, prompt: str | Sequence[str], face_image, negative_prompt, align: AlignMode | None,
                      ) -> dict[str, torch.Tensor]:
        """A pipeline call's prompts, faces (one person) and negatives (None: the
        pipeline's default_negative_prompt) -> embeddings."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if negative_prompt is None:
            negative_prompt = self.default_negative_prompt
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != len(prompts):
            raise UserError(f"{len(prompts)} prompts but {len(negatives)} negative prompts")
        faces = None if face_image is None else self.prepare_faces(face_image, align)
        return self.encode(prompts, negatives, faces, self._execution_device)

    @torch.no_grad()
    def encode_rows(self, faces: torch.Tensor | None, prompts: Sequence[str], negative_prompt: str,
                    device: torch.device) -> dict[str, torch.Tensor]:
        """Embeddings of a batch of different people: row i = (faces[i], prompts[i])."""
        cond, dtype, b = self.condition, self.face_encoder.dtype, len(prompts)
        if faces is None:
            pos = cond.unconditional(list(prompts), device, dtype)
        else:
            pos = cond(list(prompts), faces.to(device=device, dtype=dtype),
                       torch.ones(b, dtype=torch.bool, device=device))
        neg = cond.unconditional([negative_prompt] * b, device, dtype)
        return dict(prompt_embeds=pos[0], pooled_prompt_embeds=pos[1],
                    negative_prompt_embeds=neg[0], negative_pooled_prompt_embeds=neg[1])
