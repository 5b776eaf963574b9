"""Two FaceCLIP branches as SDXL's text conditioning (docs/design.md,
"The released FaceCLIP encoder for SDXL").

    prompt_embeds        = concat(L fused [B, 77, W_L], G fused [B, 77, W_G])  [B, 77, W_L + W_G]
    pooled_prompt_embeds = G pooled [B, W_G]

The unconditional branch (classifier-free guidance and condition dropout) is a zero face,
no id prefix, and the negative (or empty) prompt (models/condition.py: what the families
share).
"""

from __future__ import annotations

from typing import Sequence

import torch

from faceclip_zoo.models.condition import FaceFeatures, JointCondition
from faceclip_zoo.models.faceclip import FaceCLIPEncoder


class SDXLCondition(JointCondition):
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

    def forward(self, prompts: Sequence[str], face_images: torch.Tensor | None, has_face: torch.Tensor,
                face_features: tuple[FaceFeatures, FaceFeatures] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (prompt_embeds [B, 77, W_L + W_G], pooled [B, W_G]) (see JointCondition.forward)."""
        outs = []
        for i, branch in enumerate(self.branches):
            ids = branch.tokenize(prompts, has_face.tolist()).to(has_face.device)
            feats = None if face_features is None else face_features[i]
            outs.append(branch(face_images, ids, has_face, face_features=feats))
        return torch.cat([outs[0].embeds, outs[1].embeds], dim=-1), outs[1].pooled
