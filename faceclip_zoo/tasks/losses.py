"""Contrastive terms of encoder pre-training (paper Eq. 3), on open_clip's losses.

Each term owns its learnable temperature (and bias for the sigmoid form). Unmasked
terms call open_clip's ClipLoss / SigLipLoss directly, in their DDP-correct form
(local loss, features gathered with gradients). The identity term must ignore rows that
have no face (guided image-text pairs); open_clip has no masked variant, so that one is
written here on top of open_clip's `gather_features`, and a test checks that it equals
open_clip's loss when nothing is masked.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss, gather_features
from torch import nn

LossKind = Literal["clip", "siglip"]


class ContrastiveTerm(nn.Module):
    def __init__(self, kind: LossKind = "clip"):
        super().__init__()
        if kind not in ("clip", "siglip"):
            raise ValueError(f"loss kind must be 'clip' or 'siglip', got {kind!r}")
        self.kind = kind
        # CLIP: temperature 0.07; SigLIP paper: t' = log 10, b = -10.
        init_scale = math.log(1 / 0.07) if kind == "clip" else math.log(10.0)
        self.logit_scale = nn.Parameter(torch.tensor(init_scale))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0)) if kind == "siglip" else None
        self.rank, self.world_size = 0, 1

    def set_distributed(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size

    def _library_loss(self, rank: int, world_size: int) -> nn.Module:
        if self.kind == "clip":
            return ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size)
        return SigLipLoss(rank=rank, world_size=world_size)

    def scale(self) -> torch.Tensor:
        # Clamp as CLIP does (max 100) so the temperature cannot run away.
        return self.logit_scale.clamp(max=math.log(100.0)).exp()

    def forward(self, a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None,
                local: bool = False) -> torch.Tensor:
        """`local=True` contrasts within this rank's batch only (no collective): for
        validation, whose batches may differ in size and count across ranks."""
        a = F.normalize(a.float(), dim=-1)
        b = F.normalize(b.float(), dim=-1)
        rank, world = (0, 1) if local else (self.rank, self.world_size)
        if mask is None:
            return self._library_loss(rank, world)(a, b, self.scale(), self.logit_bias)
        return self._masked(a, b, mask, rank, world)

    def _masked(self, a, b, mask, rank: int, world_size: int) -> torch.Tensor:
        """Local-loss form over gathered features; masked rows neither anchor a term nor
        serve as negatives. Equals the library loss when mask is all True."""
        n = a.shape[0]
        mask = mask.to(device=a.device, dtype=torch.bool)
        if world_size > 1:
            all_a, all_b = gather_features(a, b, local_loss=True, gather_with_grad=True,
                                           rank=rank, world_size=world_size)
            all_mask = torch.cat(torch.distributed.nn.all_gather(mask.float()), 0).bool()
        else:
            all_a, all_b, all_mask = a, b, mask
        scale = self.scale()
        logits_ab = scale * a @ all_b.T  # [n, N]
        logits_ba = scale * b @ all_a.T
        labels = torch.arange(n, device=a.device) + n * rank
        if self.kind == "clip":
            # Drop masked rows first (never multiply an infinite loss by zero), and mask
            # their columns out of every softmax.
            rows = mask.nonzero().squeeze(1)
            neg_inf = torch.finfo(logits_ab.dtype).min
            logits_ab = logits_ab[rows].masked_fill(~all_mask[None, :], neg_inf)
            logits_ba = logits_ba[rows].masked_fill(~all_mask[None, :], neg_inf)
            per_row = (F.cross_entropy(logits_ab, labels[rows], reduction="sum")
                       + F.cross_entropy(logits_ba, labels[rows], reduction="sum")) / 2
            # Normalise by the global count of valid rows so ranks with few faces do not
            # weigh more; DDP averages over ranks, hence the world_size factor.
            return per_row * world_size / all_mask.sum().clamp(min=1)
        signs = -torch.ones_like(logits_ab)
        signs[torch.arange(n), labels] = 1.0
        pair_ok = mask[:, None] & all_mask[None, :]
        loss = -F.logsigmoid(signs * (logits_ab + self.logit_bias)) * pair_ok
        return loss.sum() * world_size / all_mask.sum().clamp(min=1)
