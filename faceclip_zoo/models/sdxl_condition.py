"""Two FaceCLIP branches as SDXL's text conditioning (docs/design.md,
"The released FaceCLIP encoder for SDXL").

    prompt_embeds        = concat(L fused [B, 77, W_L], G fused [B, 77, W_G])  [B, 77, W_L + W_G]
    pooled_prompt_embeds = G pooled [B, W_G]

The unconditional branch (classifier-free guidance and condition dropout) is a zero face,
no id prefix, and the negative (or empty) prompt. Plain torch: the Lightning task and the
diffusers pipeline both drive this module.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from faceclip_zoo.models.faceclip import FaceCLIPEncoder

FaceFeatures = tuple[torch.Tensor, torch.Tensor]  # (normalised identity [B, D], patches [B, N, C])


class SDXLCondition(nn.Module):
    def __init__(self, branch_l: FaceCLIPEncoder, branch_g: FaceCLIPEncoder):
        super().__init__()
        self.branch_l = branch_l
        self.branch_g = branch_g

    @property
    def branches(self) -> tuple[FaceCLIPEncoder, FaceCLIPEncoder]:
        return self.branch_l, self.branch_g

    @property
    def embed_dim(self) -> int:
        return self.branch_l.config.width + self.branch_g.config.width

    @property
    def pooled_dim(self) -> int:
        return self.branch_g.config.width

    @property
    def face_size(self) -> int:
        return self.branch_l.config.face.image_size

    def face_features(self, face_images: torch.Tensor) -> tuple[FaceFeatures, FaceFeatures]:
        """Each branch's (normalised identity, patch tokens) of aligned crops in [0, 1]."""
        return tuple(b.encode_face(face_images) for b in self.branches)  # type: ignore[return-value]

    @staticmethod
    def average_references(features: FaceFeatures) -> FaceFeatures:
        """Several reference photos of one person -> one: patch tokens averaged, identity
        vectors averaged and re-normalised (proj1 was trained on unit vectors)."""
        identity, patches = features
        if identity.shape[0] == 1:
            return identity, patches  # one reference: used exactly as encoded
        return F.normalize(identity.float().mean(0, keepdim=True), dim=-1).to(identity.dtype), \
            patches.mean(0, keepdim=True)

    def forward(
        self,
        prompts: Sequence[str],
        face_images: torch.Tensor | None,
        has_face: torch.Tensor,
        face_features: tuple[FaceFeatures, FaceFeatures] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (prompt_embeds [B, 77, W_L + W_G], pooled [B, W_G]).

        face_images: aligned crops [B, 3, H, W] in [0, 1] (rows without a face are zeroed);
        has_face: bool [B]; face_features: per-branch precomputed features instead."""
        outs = []
        for i, branch in enumerate(self.branches):
            ids = branch.tokenize(prompts, has_face.tolist()).to(has_face.device)
            feats = None if face_features is None else face_features[i]
            outs.append(branch(face_images, ids, has_face, face_features=feats))
        return torch.cat([outs[0].embeds, outs[1].embeds], dim=-1), outs[1].pooled

    @torch.no_grad()
    def unconditional(self, prompts: Sequence[str], device, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The release's negative branch: zero face, no prefix, the given (negative) prompts."""
        b, size = len(prompts), self.face_size
        faces = torch.zeros(b, 3, size, size, device=device, dtype=dtype)
        return self(prompts, faces, torch.zeros(b, dtype=torch.bool, device=device))
