"""The adapters of a LoRA run's fit checkpoint, as diffusers' LoRA file and folded into
the base pipeline.

A LoRA checkpoint holds only the adapter weights (and their EMA); its export entry names
the base pipeline folder and the adapter settings. The adapter file is diffusers' own
format (`pytorch_lora_weights.safetensors`, written by the pipeline's `save_lora_weights`
with the peft config as metadata), so `pipe.load_lora_weights(folder)` reads it into our
pipelines as into diffusers' own; merging goes through exactly that loader, then
diffusers' `fuse_lora`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from faceclip_zoo.models.adapters import LoraSettings, adapter_state, add_lora, is_adapter_weight
from faceclip_zoo.utils import UserError, state_under

LORA_FILE = "pytorch_lora_weights.safetensors"


def adapted_denoiser(checkpoint: dict, spec: dict, source: str, use_ema: bool = True):
    """The run's denoiser architecture (random base: only the adapters matter here) with the
    checkpoint's adapter weights (EMA ones when kept and wanted)."""
    from faceclip_zoo.models.diffusers_models import build_diffusers
    from faceclip_zoo.pipelines.components import ema_state

    lora = spec["lora"]
    name = lora["denoiser"]
    denoiser = build_diffusers(spec[name])
    add_lora(denoiser, LoraSettings.from_dict(lora["settings"]), name)
    state = {**state_under(checkpoint["state_dict"], spec["prefixes"][name]), **ema_state(checkpoint, use_ema)}
    expected = {n for n in denoiser.state_dict() if is_adapter_weight(n)}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise UserError(f"{source}: its adapter weights do not match its lora settings "
                        f"({len(missing)} missing, e.g. {missing[:1]}; {len(unexpected)} unexpected, e.g. {unexpected[:1]})")
    denoiser.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
    return denoiser


def save_adapter(pipeline_cls, denoiser, out: str | Path) -> Path:
    """Write diffusers' LoRA file of an adapted denoiser into `out` (the peft config goes
    into its metadata, so rank, alpha and DoRA load back as trained)."""
    name = pipeline_cls.DENOISER
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pipeline_cls.save_lora_weights(out, **{f"{name}_lora_layers": adapter_state(denoiser),
                                           f"{name}_lora_adapter_metadata": denoiser.peft_config["default"].to_dict()},
                                   safe_serialization=True)
    return out / LORA_FILE


def base_pipeline(pipeline_cls, spec: dict, source: str):
    base = spec["lora"]["base"]
    if base is None:
        raise UserError(f"{source} is a LoRA run on named components, not on a pipeline folder: there is no "
                        "pipeline to merge into (export the adapter alone, without --merge, and load it with "
                        "load_lora_weights onto your pipeline)")
    if not (Path(base) / "model_index.json").is_file():
        raise UserError(f"{source} adapts the pipeline {base}, which is not there any more; export needs it "
                        "(copy it back, or export the adapter alone without --merge)")
    return pipeline_cls.from_pretrained(base, local_files_only=True)


def merged_pipeline(pipeline_cls, checkpoint: dict, spec: dict, source: str, use_ema: bool = True):
    """The base pipeline with the checkpoint's adapters folded into its weights (through the
    adapter file and diffusers' loader, as a user would)."""
    denoiser = adapted_denoiser(checkpoint, spec, source, use_ema)
    pipe = base_pipeline(pipeline_cls, spec, source)
    with tempfile.TemporaryDirectory() as tmp:
        save_adapter(pipeline_cls, denoiser, tmp)
        pipe.load_lora_weights(tmp)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    return pipe


def lora_base(folder: str | Path) -> str | None:
    """The base pipeline a LoRA export adapts (None for any other folder)."""
    import json

    own = Path(folder) / "faceclip_zoo.json"
    if not (Path(folder) / LORA_FILE).is_file() or not own.is_file():
        return None
    base = json.loads(own.read_text()).get("base")
    if base is None:
        raise UserError(f"{folder} holds adapters trained on named components, not on a pipeline folder: name "
                        f"the pipeline they belong to (--pipeline <pipeline folder> --lora {folder})")
    return base
