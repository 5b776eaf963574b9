"""Diffusion backbones of the release -> diffusers model folders.

The release's model/unet.pt (SDXL UNet) and model/dit.pt (FLUX transformer) are bf16
state dicts already in diffusers key names. Converting them is a strict check against the
diffusers model built on the meta device (every key, every shape), then a diffusers
folder: config.json (diffusers' own, so `from_pretrained(folder)` works offline) +
diffusion_pytorch_model.safetensors written tensor by tensor.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from faceclip_zoo.config import diffusers_config
from faceclip_zoo.models.diffusers_models import WEIGHTS_NAME, build_diffusers_on_meta
from faceclip_zoo.models.io import atomic_write, write_safetensors
from faceclip_zoo.utils import UserError, mismatch_report, require_file, safe_torch_load, shapes_of


def convert_official_diffusers(path: str | os.PathLike, out: str | os.PathLike,
                               config: str | dict[str, Any], what: str) -> dict:
    """Strictly check `path` against the named (or given) diffusers config and write a
    diffusers folder at `out`. Returns key counts."""
    p = require_file(path, f"official {what}")
    config = diffusers_config(config) if isinstance(config, str) else dict(config)
    state = safe_torch_load(p, mmap=True)
    if not isinstance(state, dict):
        raise UserError(f"{p} holds a {type(state).__name__}, expected a state dict")
    state = {k[len("model."):] if k.startswith("model.") else k: v for k, v in state.items()}
    model = build_diffusers_on_meta(config)
    problems = mismatch_report(shapes_of(model.state_dict()), shapes_of(state))
    if problems:
        raise UserError(f"{p} does not match a {config['_class_name']} of this config: {problems}")
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder, WEIGHTS_NAME, lambda tmp: write_safetensors(tmp, state))
    model.save_config(folder)  # diffusers' config.json (no weights touched)
    atomic_write(folder, "recipe.yaml", lambda tmp: Path(tmp).write_text(
        f"# made by: python -m faceclip_zoo convert --official {p}\nconvert:\n  official: {p}\n  as: {what}\n"))
    return {"source": str(p), "source_keys": len(state), "converted_keys": len(state),
            "parameters": sum(v.numel() for v in state.values())}
