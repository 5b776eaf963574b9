"""Optimizer + schedule shared by the tasks: AdamW param groups (no decay on norms,
biases, layer-scale gammas and logit leftovers), linear warm-up, then constant or cosine."""

from __future__ import annotations

import math
from typing import Callable

import torch


def default_optimizer(params):
    # The paper's settings (AnyPrecisionAdamW is plain AdamW in fp32 state).
    return torch.optim.AdamW(params, lr=2e-5, betas=(0.9, 0.999), weight_decay=0.01)


def configure(module, factory: Callable, warmup_steps: int, lr_schedule: str) -> dict:
    """What a LightningModule's configure_optimizers returns."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "gamma" in name or "logit_" in name else decay).append(p)
    optimizer = factory([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}])
    total = max(1, int(module.trainer.estimated_stepping_batches)) if module._trainer else 1
    cosine = lr_schedule == "cosine"

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if not cosine:
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total - warmup_steps))
        return 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
