"""Small shared helpers: user-facing errors and safe weight-file reading."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import torch


class UserError(RuntimeError):
    """A problem with the user's input (a path, a key, a file). The CLI prints its
    message as one line, without a traceback."""


def require_file(path: str | os.PathLike, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise UserError(f"{what} not found: {p} (check the path in your recipe or command)")
    return p


def load_weights_file(path: str | os.PathLike, what: str = "weights file") -> dict[str, torch.Tensor]:
    """Read a safetensors file, or a foreign torch pickle with weights_only=True (never
    executing pickled code). A directory means its model.safetensors."""
    p = require_file(path, what)
    if p.is_dir():
        p = require_file(p / "model.safetensors", what)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p))
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:  # the unpickler refuses anything but tensors and containers
        raise UserError(
            f"refusing to load {p}: it is not a plain tensor checkpoint ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200]})"
        ) from None
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise UserError(f"{p} holds a {type(obj).__name__}, expected a state dict")
    return dict(obj)


def load_strict(module: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """load_state_dict with a readable report instead of a long library traceback."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        def head(items):
            return ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")

        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys [{head(missing)}]")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys [{head(unexpected)}]")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches [{head(shapes)}]")
        raise UserError(f"{source} does not match {type(module).__name__}: " + "; ".join(parts))
    module.load_state_dict(state, strict=True)
