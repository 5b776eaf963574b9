"""FaceT5 as Wan's conditioning: the joint embedding replaces Wan's umT5 text encoder.

    prompt_embeds = FaceT5(prompt, face)    [B, L, 4096]   (umT5-XXL backbone at real size)

Wan's transformer reads only these text tokens (cross-attention); it has no pooled text
vector, so the pooled output the families share is an empty [B, 0] tensor. The
unconditional branch is a zero face with the negative (or empty) prompt
(models/condition.py: what the families share).
"""

from __future__ import annotations

from typing import Sequence

import torch

from faceclip_zoo.models.condition import FaceFeatures, JointCondition
from faceclip_zoo.models.facet5 import FaceT5Encoder


class WanCondition(JointCondition):
    def __init__(self, face_t5: FaceT5Encoder):
        super().__init__()
        self.face_t5 = face_t5

    @property
    def branches(self) -> tuple[FaceT5Encoder]:
        return (self.face_t5,)

    @property
    def embed_dim(self) -> int:
        return self.face_t5.config.width

    @property
    def pooled_dim(self) -> int:
        return 0  # Wan has no pooled text input

    def forward(self, prompts: Sequence[str], face_images: torch.Tensor | None, has_face: torch.Tensor,
                face_features: tuple[FaceFeatures] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (prompt_embeds [B, L, W], an empty pooled [B, 0]) (see JointCondition.forward)."""
        ids = self.face_t5.tokenize(prompts).to(has_face.device)
        feats = None if face_features is None else face_features[0]
        out = self.face_t5(face_images, ids, has_face, face_features=feats)
        return out.embeds, out.embeds.new_zeros(out.embeds.shape[0], 0)
