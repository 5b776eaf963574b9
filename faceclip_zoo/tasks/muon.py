"""MuonAdamW: Muon on every weight matrix and convolution filter, AdamW on the rest.

Muon (Jordan et al. 2024, "Muon: An optimizer for hidden layers") replaces each matrix's
momentum by the nearest semi-orthogonal matrix (five Newton-Schulz iterations), so every
direction of the update moves at the same rate. Its update is scaled by
0.2 * sqrt(max(rows, cols)) to match AdamW's update RMS (Liu et al. 2025, "Muon is
scalable for LLM training"), so the learning rate, weight decay and schedule of an AdamW
recipe carry over unchanged.

Written here: torch.optim.Muon takes 2-D parameters only, and a UNet's learning happens as
much in its convolution filters (4-D) as in its linear layers. Here a filter is treated as
the matrix out_channels x (in_channels * k * k), the usual way Muon trains convolutions;
biases, norms and other 1-D parameters get AdamW. Matrices of one shape are orthogonalised
in one batched matmul chain (the quickstart's UNet has 134 matrices of 21 shapes; a
chain per matrix costs more than the model's own step on a CPU). All
state lives in `self.state` (Muon: `momentum_buffer`; AdamW: `step`, `exp_avg`,
`exp_avg_sq`), so checkpoints resume exactly. It needs whole parameters: single device or
DDP, not FSDP, whose shards are not the model's matrices. Every parameter of >= 2 dims goes to
Muon, token-embedding tables too (Muon's authors keep those on AdamW): it is meant for the
UNet / transformer being fine-tuned, not for text towers trained from their vocabulary.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch.optim.optimizer import ParamsT

# The quintic's coefficients from the Muon reference: they push every singular value of
# the normalised matrix into ~[0.5, 1.5] in five steps, faster than a cubic that converges.
_NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """[B, m, n] -> approximately U V^T of each matrix's SVD (Newton-Schulz iteration)."""
    a, b, c = _NS_COEFFICIENTS
    x = g / (g.flatten(1).norm(dim=1).view(-1, 1, 1) + 1e-7)
    tall = x.shape[1] > x.shape[2]
    if tall:
        x = x.transpose(1, 2)
    for _ in range(steps):
        gram = x @ x.transpose(1, 2)
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.transpose(1, 2) if tall else x


class MuonAdamW(torch.optim.Optimizer):
    """Muon for parameters with >= 2 dimensions, AdamW for the others, in the same param
    groups (so `tasks.optim.configure`'s groups, lr_scales and schedules apply as to AdamW).

    Args:
        lr, betas, eps, weight_decay: as torch.optim.AdamW; lr and weight_decay apply to the
            Muon parameters too (decoupled decay, the update RMS-matched to AdamW's).
        momentum, nesterov: Muon's momentum (0.95 and Nesterov, as its reference).
        ns_steps: Newton-Schulz iterations.
    """

    def __init__(self, params: ParamsT, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      momentum=momentum, nesterov=nesterov, ns_steps=ns_steps))
        if any(type(p).__name__ == "DTensor" for g in self.param_groups for p in g["params"]):
            raise ValueError("MuonAdamW orthogonalises whole weight matrices, and these parameters are "
                             "sharded (FSDP): train with DDP or on one device, or use AdamW")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            self._muon([p for p in params if p.ndim >= 2], group)
            self._adamw([p for p in params if p.ndim < 2], group)
        return loss

    def _muon(self, params: list[torch.Tensor], group: dict) -> None:
        if not params:
            return
        mu, lr, wd = group["momentum"], group["lr"], group["weight_decay"]
        grads = [p.grad for p in params]
        bufs = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            bufs.append(state["momentum_buffer"])
        torch._foreach_lerp_(bufs, grads, 1 - mu)  # torch.optim.Muon's form of the momentum
        updates = torch._foreach_lerp(grads, bufs, mu) if group["nesterov"] else bufs
        by_shape: dict[tuple, list[int]] = defaultdict(list)
        for i, u in enumerate(updates):
            by_shape[(u.shape[0], u[0].numel(), u.dtype, u.device)].append(i)
        directions: list[torch.Tensor | None] = [None] * len(params)
        for (rows, cols, _, _), idx in by_shape.items():
            stacked = torch.stack([updates[i].reshape(rows, cols) for i in idx]).float()
            ortho = orthogonalize(stacked, group["ns_steps"]) * (0.2 * max(rows, cols) ** 0.5)
            for i, o in zip(idx, ortho.unbind(0)):
                directions[i] = o.view_as(params[i]).to(params[i].dtype)
        if wd:
            torch._foreach_mul_(params, 1 - lr * wd)
        torch._foreach_add_(params, directions, alpha=-lr)

    def _adamw(self, params: list[torch.Tensor], group: dict) -> None:
        if not params:
            return
        (beta1, beta2), lr, wd, eps = group["betas"], group["lr"], group["weight_decay"], group["eps"]
        m, v, steps = [], [], []
        for p in params:
            state = self.state[p]
            if "exp_avg" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            m.append(state["exp_avg"])
            v.append(state["exp_avg_sq"])
            steps.append(float(state["step"]))
        grads = [p.grad for p in params]
        torch._foreach_lerp_(m, grads, 1 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, [(1 - beta2 ** s) ** 0.5 for s in steps])
        torch._foreach_add_(denom, eps)
        if wd:
            torch._foreach_mul_(params, 1 - lr * wd)
        torch._foreach_addcdiv_(params, m, denom, [-lr / (1 - beta1 ** s) for s in steps])
