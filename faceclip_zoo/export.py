"""`python -m faceclip_zoo export`: a fit checkpoint -> a self-describing model directory
(encoder runs) or a FaceCLIPSDXLPipeline folder (SDXL runs, EMA weights when kept).

The Lightning checkpoint records (in `checkpoint["faceclip_zoo"]["exports"]`) which of its
sub-models are exportable, under which key prefix, with which config. The output holds
model.safetensors + config.json + recipe.yaml (the resolved recipe of the run, read from
the run's config.yaml beside the checkpoint).
"""

from __future__ import annotations

from pathlib import Path

from faceclip_zoo.cards import (
    CardFacts, describe_folder, final_metrics, inherited_lineage, run_samples, starting_points,
    write_model_card,
)
from faceclip_zoo.models.io import checkpoint_exports, model_from_checkpoint, save_model_dir
from faceclip_zoo.utils import UserError, check_output_folder, replace_folder, require_file, safe_torch_load


def find_run_config(ckpt: Path) -> Path | None:
    """LightningCLI saves the resolved config as config.yaml in the run's log dir; the
    checkpoint sits in <log_dir>/checkpoints/ or <root>/checkpoints/."""
    for folder in (ckpt.parent, ckpt.parent.parent):
        if (folder / "config.yaml").exists():
            return folder / "config.yaml"
    # Production recipes keep checkpoints in <root>/checkpoints beside the logger's
    # <root>/version_N folders (one per restart): the newest run's config.
    versions = sorted(ckpt.parent.parent.glob("version_*/config.yaml"), key=lambda p: p.stat().st_mtime)
    return versions[-1] if versions else None


def export_checkpoint(ckpt: str, out: str, part: str | None = None, recipe: str | None = None,
                      use_ema: bool = True, merge: bool = False, overwrite: bool = False) -> Path:
    """Export a fit checkpoint to `out`: an encoder checkpoint becomes a model directory,
    an SDXL / FLUX checkpoint a FaceCLIPSDXLPipeline / FaceT5FluxPipeline folder, a LoRA
    run's checkpoint its adapters in diffusers' format (`pipe.load_lora_weights(out)` on
    the base pipeline) or, with merge, the base pipeline with the adapters folded in.

    Args:
        ckpt: a Lightning checkpoint written by `fit`.
        out: output directory (created).
        part: which exportable part (default: the checkpoint's only one).
        recipe: the recipe to store beside the weights (default: the run's config.yaml).
        use_ema: export the EMA weights of the UNet when the run kept an EMA.
        merge: LoRA runs: write the whole pipeline with the adapters folded in, instead of
            the adapter file alone.
        overwrite: replace an existing, non-empty `out` (it is swapped for the new folder
            once that is written whole; otherwise refused before anything is read).
    """
    ckpt_path = require_file(ckpt, "checkpoint")
    check_output_folder(out, "--out", overwrite)
    checkpoint = safe_torch_load(ckpt_path, mmap=False)
    exports = checkpoint_exports(checkpoint)
    if part is None and len(exports) == 1:
        part = next(iter(exports))
    if part not in exports:
        raise UserError(f"{ckpt_path} has no exportable part {part!r}; it has {sorted(exports) or 'none'} "
                        "(was it written by a faceclip_zoo task?)")
    spec = exports[part]
    if merge and "lora" not in spec:
        raise UserError(f"{ckpt_path} is not from a LoRA run: there is nothing to merge (export it without --merge)")
    recipe_path = Path(recipe) if recipe else find_run_config(ckpt_path)
    recipe_text = recipe_path.read_text() if recipe_path and recipe_path.exists() else None
    extra = {"source_checkpoint": str(ckpt_path), "global_step": checkpoint.get("global_step")}
    from_release, base = inherited_lineage(recipe_text)
    run_dir = recipe_path.parent if recipe_path else None

    def write(folder: Path) -> None:
        if "lora" in spec and not merge:
            _export_adapter(checkpoint, spec, ckpt_path, folder, recipe_text, extra, use_ema)
        else:
            _export_weights(checkpoint, spec, ckpt_path, part, folder, recipe_text, extra, use_ema)
        kind, what = describe_folder(folder)
        write_model_card(folder, CardFacts(
            kind=kind, what=what,
            made_by=f"`python -m faceclip_zoo export` of a fit checkpoint at step {extra['global_step']}",
            from_release=from_release, base_model=base, recipe=recipe_text is not None,
            starts_from=starting_points(recipe_text), adapts=spec.get("lora", {}).get("base"),
            metrics=final_metrics(run_dir), samples=run_samples(run_dir)), final=out)

    return replace_folder(Path(out), write)


def _export_adapter(checkpoint: dict, spec: dict, ckpt_path: Path, out: str, recipe_text: str | None,
                    extra: dict, use_ema: bool) -> Path:
    """A LoRA run: diffusers' adapter file + recipe.yaml + faceclip_zoo.json (the base)."""
    import json

    from faceclip_zoo.pipelines.adapters import adapted_denoiser, save_adapter
    from faceclip_zoo.pipelines.export import pipeline_classes

    pipeline_cls = pipeline_classes()[spec["model_type"]]
    denoiser = adapted_denoiser(checkpoint, spec, str(ckpt_path), use_ema)
    out_dir = Path(out)
    save_adapter(pipeline_cls, denoiser, out_dir)
    if recipe_text is not None:
        (out_dir / "recipe.yaml").write_text(recipe_text)
    lora = spec["lora"]
    has_ema = "ema" in checkpoint.get("faceclip_zoo", {})
    (out_dir / "faceclip_zoo.json").write_text(json.dumps({
        "kind": "lora", "pipeline_kind": spec["model_type"], "base": lora["base"], "lora": lora["settings"],
        "trained_on": {k: lora.get(k) for k in ("quantize_base", "base_dtype")},
        **extra, "ema": bool(use_ema and has_ema)}, indent=2) + "\n")
    return out_dir


def _export_weights(checkpoint: dict, spec: dict, ckpt_path: Path, part: str, out: str,
                    recipe_text: str | None, extra: dict, use_ema: bool) -> Path:
    from faceclip_zoo.pipelines.export import pipeline_classes, save_pipeline

    pipelines = pipeline_classes()
    if spec["model_type"] in pipelines:
        pipe = pipelines[spec["model_type"]].from_checkpoint(checkpoint, spec, str(ckpt_path), use_ema=use_ema)
        has_ema = "ema" in checkpoint.get("faceclip_zoo", {})
        return save_pipeline(pipe, out, recipe_text, {**extra, "ema": bool(use_ema and has_ema)})
    module, config = model_from_checkpoint(checkpoint, spec, f"{ckpt_path} [{part}]")
    return save_model_dir(module, out, config=config, recipe=recipe_text, extra=extra)
