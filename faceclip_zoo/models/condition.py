"""What every diffusion family's conditioning module shares (SDXLCondition, FluxCondition).

A family's condition turns (prompts, aligned face crops, has_face) into the denoiser's
(prompt_embeds, pooled_prompt_embeds) through one or more joint encoders, its `branches`
(each with `encode_face` and a face ViT config). The unconditional branch of every family
is a zero face with the negative (or empty) prompt. Plain torch: the Lightning tasks, the
feature cache and the diffusers pipelines drive it through this interface only.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

FaceFeatures = tuple[torch.Tensor, torch.Tensor]  # (normalised identity [B, D], patches [B, N, C])


class JointCondition(nn.Module):
    """Subclasses set `branches` (the joint encoders, in the order `face_features` returns
    theirs), `embed_dim`, `pooled_dim` and implement `forward`."""

    @property
    def branches(self) -> tuple[nn.Module, ...]:
        raise NotImplementedError

    @property
    def embed_dim(self) -> int:
        raise NotImplementedError

    @property
    def pooled_dim(self) -> int:
        raise NotImplementedError

    @property
    def face_size(self) -> int:
        return self.branches[0].config.face.image_size

    def trainable_parameter_names(self) -> set[str]:
        """What of the condition `train_encoders` trains: each branch's trainable parts,
        named from this module."""
        names = set()
        for prefix, branch in self.named_children():
            if branch in self.branches:
                names.update(f"{prefix}.{n}" for n in branch.trainable_parameter_names())
        return names

    def face_features(self, face_images: torch.Tensor) -> tuple[FaceFeatures, ...]:
        """Each branch's (normalised identity, patch tokens) of aligned crops in [0, 1]."""
        return tuple(b.encode_face(face_images) for b in self.branches)

    @staticmethod
    def average_references(features: FaceFeatures) -> FaceFeatures:
        """Several reference photos of one person -> one: patch tokens averaged, identity
        vectors averaged and re-normalised (the projections were trained on unit vectors)."""
        identity, patches = features
        if identity.shape[0] == 1:
            return identity, patches  # one reference: used exactly as encoded
        return F.normalize(identity.float().mean(0, keepdim=True), dim=-1).to(identity.dtype), \
            patches.mean(0, keepdim=True)

    def forward(self, prompts: Sequence[str], face_images: torch.Tensor | None, has_face: torch.Tensor,
                face_features: tuple[FaceFeatures, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (prompt_embeds [B, L, embed_dim], pooled [B, pooled_dim]). face_images: aligned
        crops [B, 3, H, W] in [0, 1] (rows without a face are zeroed); has_face: bool [B];
        face_features: per-branch precomputed features instead of face_images."""
        raise NotImplementedError

    @torch.no_grad()
    def unconditional(self, prompts: Sequence[str], device, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The release's negative branch: zero face, no identity prefix, the given (negative) prompts."""
        b, size = len(prompts), self.face_size
        faces = torch.zeros(b, 3, size, size, device=device, dtype=dtype)
        return self(prompts, faces, torch.zeros(b, dtype=torch.bool, device=device))


class FaceT5Condition(JointCondition):
    """A condition whose one joint encoder is FaceT5: its tokens are prompt_embeds, and it
    has no pooled vector of its own ([B, 0]; FLUX adds CLIP-L's, Wan takes none)."""

    def __init__(self, face_t5):
        super().__init__()
        self.face_t5 = face_t5

    @property
    def branches(self) -> tuple[nn.Module]:
        return (self.face_t5,)

    @property
    def embed_dim(self) -> int:
        return self.face_t5.config.width

    @property
    def pooled_dim(self) -> int:
        return 0

    def embeds(self, prompts: Sequence[str], face_images: torch.Tensor | None, has_face: torch.Tensor,
               face_features: tuple[FaceFeatures] | None = None) -> torch.Tensor:
        return self.face_t5.embed_prompts(prompts, face_images, has_face,
                                          None if face_features is None else face_features[0])

    def forward(self, prompts: Sequence[str], face_images: torch.Tensor | None, has_face: torch.Tensor,
                face_features: tuple[FaceFeatures] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        embeds = self.embeds(prompts, face_images, has_face, face_features)
        return embeds, embeds.new_zeros(embeds.shape[0], 0)
