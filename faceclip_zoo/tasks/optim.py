"""Optimizer + schedule shared by the tasks: AdamW param groups (no decay on norms,
biases, layer-scale gammas and logit leftovers), linear warm-up, then constant or cosine;
and AnyPrecisionAdamW for bf16 weights and optimizer state."""

from __future__ import annotations

import math
from typing import Callable

import torch

from faceclip_zoo.utils import UserError


def default_optimizer(params):
    # The paper's settings (AnyPrecisionAdamW is plain AdamW in fp32 state).
    return torch.optim.AdamW(params, lr=2e-5, betas=(0.9, 0.999), weight_decay=0.01)


def configure(module, factory: Callable, warmup_steps: int, lr_schedule: str,
              lr_scales: dict[str, float] | None = None) -> dict:
    """What a LightningModule's configure_optimizers returns. lr_scales: parameter-name
    substring -> factor on the optimizer's lr for the parameters whose name contains it
    (the first that matches), e.g. {"attn2": 4.0} for a UNet's cross-attention."""
    scales = dict(lr_scales or {})
    groups: dict[tuple[bool, float], list] = {(True, 1.0): [], (False, 1.0): []}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        decays = not (p.ndim < 2 or "gamma" in name or "logit_" in name)
        scale = next((f for key, f in scales.items() if key in name), 1.0)
        groups.setdefault((decays, float(scale)), []).append(p)
    unmatched = [key for key in scales if not any(key in n for n, p in module.named_parameters() if p.requires_grad)]
    if unmatched:
        raise UserError(f"lr_scales: no trainable parameter name contains {', '.join(map(repr, unmatched))}")
    # the plain groups first, so a run without lr_scales keeps its two groups in order
    ordered = sorted(groups.items(), key=lambda kv: (kv[0][1] != 1.0, kv[0][1], not kv[0][0]))
    optimizer = factory([{"params": ps, **({} if decays else {"weight_decay": 0.0})}
                         for (decays, _), ps in ordered])
    for group, ((_, scale), _) in zip(optimizer.param_groups, ordered):
        group["lr"] *= scale  # before the scheduler records each group's initial lr
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


class AnyPrecisionAdamW(torch.optim.Optimizer):
    """AdamW for low-precision (bf16) weights and optimizer state, the paper's optimizer.

    Weights stay in their own dtype (bf16 under `precision: bf16-true`); moments are kept
    in `state_dtype`; every update is computed in fp32, then written back with
    `compensation`:
      "kahan": a bf16 buffer per weight keeps what rounding dropped and adds it to the
          next update (Kahan summation), so updates far below a bf16 ulp still accumulate;
      "stochastic": the fp32 result is rounded up or down at random in proportion to its
          distance to each neighbour, unbiased in expectation;
      "none": round to nearest (small updates are lost in bf16).
    With fp32 weights and state_dtype float32 it is torch.optim.AdamW.

    Written here: the reference implementation (torchdistx's AnyPrecisionAdamW) is archived
    and has no build for current torch, and torchao's stochastic-rounding AdamW is private
    (`torchao.optim._AdamW`, documented for its quantized training only, compiling every
    step with torch.compile). The algorithm is the published one; the cost is a per-tensor
    Python loop, negligible next to a training step of the models it is meant for.
    """

    def __init__(self, params, lr: float = 2e-5, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, state_dtype: str = "bfloat16", compensation: str = "kahan",
                 seed: int = 0):
        if compensation not in ("kahan", "stochastic", "none"):
            raise ValueError(f"compensation must be 'kahan', 'stochastic' or 'none', got {compensation!r}")
        dtype = getattr(torch, state_dtype, None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"state_dtype must name a torch float dtype (bfloat16, float32), got {state_dtype!r}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.state_dtype, self.compensation, self.seed = dtype, compensation, seed

    @staticmethod
    def _round_stochastic(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """fp32 -> bf16, up or down with probability given by the dropped low 16 bits."""
        noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
        bits = (x.view(torch.int32) + noise) & -65536  # clear the 16 bits bf16 does not keep
        return bits.view(torch.float32).to(torch.bfloat16)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = 0
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            for p in group["params"]:
                index += 1
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=self.state_dtype)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.state_dtype)
                    if self.compensation == "kahan" and p.dtype != torch.float32:
                        state["compensation"] = torch.zeros_like(p)
                state["step"] += 1
                step = float(state["step"])
                grad = p.grad.float()
                m = state["exp_avg"].float().lerp_(grad, 1 - beta1)
                v = state["exp_avg_sq"].float().lerp_(grad.square(), 1 - beta2)
                state["exp_avg"].copy_(m)
                state["exp_avg_sq"].copy_(v)
                denom = (v / (1 - beta2 ** step)).sqrt_().add_(eps)
                p32 = p.float()
                update = (m / (1 - beta1 ** step)).div_(denom).mul_(-lr).sub_(p32 * (lr * wd))
                if p.dtype == torch.float32:
                    p.add_(update)
                elif "compensation" in state:
                    y = update.add_(state["compensation"].float())
                    new = (p32 + y).to(p.dtype)
                    state["compensation"].copy_(y.sub_(new.float() - p32))  # what rounding dropped
                    p.copy_(new)
                elif self.compensation == "stochastic" and p.dtype == torch.bfloat16:
                    g = torch.Generator(device=p.device).manual_seed(
                        self.seed * 1_000_003 + int(step) * 10_007 + index)  # resumable: no hidden state
                    p.copy_(self._round_stochastic(p32 + update, g))
                else:
                    p.copy_(p32 + update)
        return loss
