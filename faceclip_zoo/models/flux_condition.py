"""FaceT5 + CLIP-L text as FLUX's conditioning (docs/design.md, "FaceT5 for FLUX").

    prompt_embeds        = FaceT5(prompt, face)                    [B, 512, 4096]
    pooled_prompt_embeds = CLIP-L text model pooler output(prompt)  [B, 768] (no face)

The unconditional branch is a zero face and the negative (or empty) prompt
(models/condition.py: what the families share).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from faceclip_zoo.models.condition import FaceFeatures, FaceT5Condition
from faceclip_zoo.models.facet5 import FaceT5Encoder


class FluxCondition(FaceT5Condition):
    def __init__(self, face_t5: FaceT5Encoder, clip_text: nn.Module, clip_tokenizer):
        super().__init__(face_t5)
        self.clip_text = clip_text
        self.clip_tokenizer = clip_tokenizer
        self.clip_text.eval()

    @property
    def pooled_dim(self) -> int:
        return self.clip_text.config.hidden_size

    def train(self, mode: bool = True):
        super().train(mode)
        self.clip_text.eval()  # frozen
        return self

    @torch.no_grad()
    def pooled(self, prompts: Sequence[str], device) -> torch.Tensor:
        """CLIP-L pooler output of the raw prompts (padded to 77, as FLUX tokenizes)."""
        ids = self.clip_tokenizer(list(prompts), max_length=self.clip_tokenizer.model_max_length,
                                  padding="max_length", truncation=True, return_tensors="pt").input_ids
        return self.clip_text(ids.to(device)).pooler_output

    def forward(self, prompts: Sequence[str], face_images: torch.Tensor | None, has_face: torch.Tensor,
                face_features: tuple[FaceFeatures] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (prompt_embeds [B, L, W], pooled [B, clip width]) (see JointCondition.forward)."""
        embeds = self.embeds(prompts, face_images, has_face, face_features)
        return embeds, self.pooled(prompts, has_face.device).to(embeds.dtype)
