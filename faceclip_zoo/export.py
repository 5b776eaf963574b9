"""`python -m faceclip_zoo export`: a fit checkpoint -> a self-describing model directory.

The Lightning checkpoint records (in `checkpoint["faceclip_zoo"]["exports"]`) which of its
sub-models are exportable, under which key prefix, with which config. The output holds
model.safetensors + config.json + recipe.yaml (the resolved recipe of the run, read from
the run's config.yaml beside the checkpoint).
"""

from __future__ import annotations

from pathlib import Path

from faceclip_zoo.models.io import _builders, save_model_dir
from faceclip_zoo.utils import UserError, load_strict, require_file, safe_torch_load


def find_run_config(ckpt: Path) -> Path | None:
    """LightningCLI saves the resolved config as config.yaml in the run's log dir; the
    checkpoint usually sits in <log_dir>/checkpoints/."""
    for folder in (ckpt.parent, ckpt.parent.parent):
        if (folder / "config.yaml").exists():
            return folder / "config.yaml"
    return None


def export_checkpoint(ckpt: str, out: str, part: str = "encoder", recipe: str | None = None) -> Path:
    """Export sub-model `part` of a fit checkpoint to `out`.

    Args:
        ckpt: a Lightning checkpoint written by `fit`.
        out: output directory (created).
        part: which exportable sub-model (see the checkpoint's export table).
        recipe: the recipe to store beside the weights (default: the run's config.yaml).
    """
    ckpt_path = require_file(ckpt, "checkpoint")
    checkpoint = safe_torch_load(ckpt_path, mmap=False)
    exports = checkpoint.get("faceclip_zoo", {}).get("exports", {})
    if part not in exports:
        raise UserError(f"{ckpt_path} has no exportable part {part!r}; it has {sorted(exports) or 'none'} "
                        "(was it written by a faceclip_zoo task?)")
    spec = exports[part]
    cfg_cls, build = _builders()[spec["model_type"]]
    config = cfg_cls.from_dict(spec["config"])
    module = build(config)
    prefix = spec["prefix"]
    state = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    load_strict(module, state, f"{ckpt_path} [{part}]")
    recipe_path = Path(recipe) if recipe else find_run_config(ckpt_path)
    recipe_text = recipe_path.read_text() if recipe_path and recipe_path.exists() else None
    extra = {"source_checkpoint": str(ckpt_path), "global_step": checkpoint.get("global_step")}
    return save_model_dir(module, out, config=config, recipe=recipe_text, extra=extra)
