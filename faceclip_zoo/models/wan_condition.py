"""FaceT5 as Wan's conditioning: the joint embedding replaces Wan's umT5 text encoder.

    prompt_embeds = FaceT5(prompt, face)    [B, L, 4096]   (umT5-XXL backbone at real size)

Wan's transformer reads only these text tokens (cross-attention); it has no pooled text
vector, so the pooled output the families share is an empty [B, 0] tensor. The
unconditional branch is a zero face with the negative (or empty) prompt
(models/condition.py: what the families share, FaceT5Condition).
"""

from __future__ import annotations

from faceclip_zoo.models.condition import FaceT5Condition


class WanCondition(FaceT5Condition):
    """FaceT5's tokens alone (FaceT5Condition as it is)."""
