"""FaceT5 weights: the release's model/face_t5_encoder.pt -> faceclip_zoo directories.

The file is the state dict of the release's `FaceT5FluxWrapper` (keys optionally under
`model.`):
- `encoder_1.*`: the CLIP-L text model (transformers CLIPTextModel keys) whose pooled
  output is FLUX's pooled_prompt_embeds -> <out>/clip-l-text (a transformers folder);
- `encoder_2.*`: the FaceT5 encoder -> <out>/facet5-xxl (our model directory). Its T5 is
  stored in the release's own (FlashT5) names and renamed to transformers'
  T5EncoderModel names; `fuser.encoder.X` -> `fuser.X`; `fuser.enc_output*` (never used
  by the release's forward) are dropped and reported.

The written FaceT5 config has release_compat on: it reproduces the released forward
(face positions unused, face attention across the batch). Set it off to fine-tune.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Mapping

import torch

from faceclip_zoo.config import CLIP_TEXT_CONFIGS, FaceT5Config
from faceclip_zoo.models.convert_faceclip import UNUSED_PREFIXES, load_official
from faceclip_zoo.models.io import TOKENIZER_DIR, atomic_write, build_on_meta, write_model_dir, write_safetensors
from faceclip_zoo.utils import UserError, mismatch_report, shapes_of

# release T5 (FlashT5) name -> transformers T5EncoderModel name, per block
_T5_BLOCK_RENAMES = (
    ("self_attention_layer.self_attention.Wq.", "layer.0.SelfAttention.q."),
    ("self_attention_layer.self_attention.Wk.", "layer.0.SelfAttention.k."),
    ("self_attention_layer.self_attention.Wv.", "layer.0.SelfAttention.v."),
    ("self_attention_layer.self_attention.o.", "layer.0.SelfAttention.o."),
    ("self_attention_layer.self_attention.pe_encoding.relative_attention_bias.",
     "layer.0.SelfAttention.relative_attention_bias."),
    ("self_attention_layer.layer_norm.", "layer.0.layer_norm."),
    ("ff_layer.act.wi_0.", "layer.1.DenseReluDense.wi_0."),
    ("ff_layer.act.wi_1.", "layer.1.DenseReluDense.wi_1."),
    ("ff_layer.wo.", "layer.1.DenseReluDense.wo."),
    ("ff_layer.layer_norm.", "layer.1.layer_norm."),
)
_BLOCK = re.compile(r"^block\.(\d+)\.(.*)$")


def t5_official_to_hf(key: str) -> str:
    """A key under the release's `t5_encoder.` -> the T5EncoderModel key (raises on an
    unknown name, so nothing is silently dropped)."""
    if key == "embed_tokens.weight":
        return "shared.weight"
    if key == "final_layer_norm.weight":
        return "encoder.final_layer_norm.weight"
    m = _BLOCK.match(key)
    if m:
        for old, new in _T5_BLOCK_RENAMES:
            if m.group(2).startswith(old):
                return f"encoder.block.{m.group(1)}.{new}{m.group(2)[len(old):]}"
    raise UserError(f"unknown T5 key in the release file: t5_encoder.{key}")


def t5_hf_to_official(key: str) -> str:
    if key == "shared.weight":
        return "embed_tokens.weight"
    if key == "encoder.final_layer_norm.weight":
        return "final_layer_norm.weight"
    m = re.match(r"^encoder\.block\.(\d+)\.(.*)$", key)
    for old, new in _T5_BLOCK_RENAMES:
        if m and m.group(2).startswith(new):
            return f"block.{m.group(1)}.{old}{m.group(2)[len(new):]}"
    raise KeyError(key)


def facet5_official_to_ours(key: str) -> str | None:
    """Key under `encoder_2.` -> ours; None for the release's unused modules."""
    if key.startswith(UNUSED_PREFIXES):
        return None
    if key.startswith("t5_encoder."):
        return "t5_encoder." + t5_official_to_hf(key[len("t5_encoder."):])
    if key.startswith("fuser.encoder."):
        return "fuser." + key[len("fuser.encoder."):]
    return key


def facet5_ours_to_official(key: str) -> str:
    if key.startswith("t5_encoder."):
        return "t5_encoder." + t5_hf_to_official(key[len("t5_encoder."):])
    return "fuser.encoder." + key[len("fuser."):] if key.startswith("fuser.") else key


def split_release(state: Mapping[str, torch.Tensor]) -> tuple[dict, dict, list[str]]:
    """(FaceT5 tensors in our names, CLIP text tensors, dropped official keys)."""
    facet5, clip, dropped, unknown = {}, {}, [], []
    for key, value in state.items():
        if key.startswith("encoder_1."):
            clip[key[len("encoder_1."):]] = value
        elif key.startswith("encoder_2."):
            ours = facet5_official_to_ours(key[len("encoder_2."):])
            if ours is None:
                dropped.append(key)
            else:
                facet5[ours] = value
        else:
            unknown.append(key)
    if unknown:
        raise UserError(f"{len(unknown)} keys belong to neither encoder_1 (CLIP text) nor encoder_2 (FaceT5), "
                        f"e.g. {unknown[:3]}: is this model/face_t5_encoder.pt?")
    return facet5, clip, dropped


def write_clip_text_dir(out: Path, config: dict, tensors: Mapping[str, torch.Tensor], recipe: str) -> None:
    """A transformers CLIPTextModel folder (config.json + model.safetensors), written tensor
    by tensor; `CLIPTextModel.from_pretrained(out)` loads it offline."""
    from transformers import CLIPTextConfig

    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out, "model.safetensors", lambda tmp: write_safetensors(tmp, tensors))
    cfg = CLIPTextConfig(**config)
    cfg.architectures = ["CLIPTextModel"]
    atomic_write(out, "config.json", lambda tmp: Path(tmp).write_text(cfg.to_json_string()))
    atomic_write(out, "recipe.yaml", lambda tmp: Path(tmp).write_text(recipe))


def convert_official_facet5(
    path: str | os.PathLike, out: str | os.PathLike, config: FaceT5Config | None = None,
    clip_config: dict | None = None, tokenizer: str | os.PathLike | None = None,
) -> dict:
    """face_t5_encoder.pt -> <out>/<config.name> (FaceT5) and <out>/clip-l-text.
    `config` / `clip_config` replace the full-size ones (tests use small ones);
    `tokenizer`: a T5 tokenizer folder copied into the FaceT5 directory."""
    from transformers import CLIPTextConfig, CLIPTextModel

    state = load_official(path)
    facet5, clip, dropped = split_release(state)
    cfg = config or FaceT5Config.from_name("facet5-xxl-release")
    clip_cfg = clip_config or dict(CLIP_TEXT_CONFIGS["clip-l-text"])
    expected = shapes_of(build_on_meta("facet5", cfg).state_dict())
    problems = mismatch_report(expected, shapes_of(facet5))
    if problems:
        raise UserError(f"{path} [encoder_2] does not match {cfg.name}: {problems}")
    with torch.device("meta"):
        clip_model = CLIPTextModel(CLIPTextConfig(**clip_cfg))
    clip_expected = {k: v for k, v in shapes_of(clip_model.state_dict()).items()}
    clip = {k: v for k, v in clip.items() if not k.endswith("position_ids")}  # a buffer older files kept
    problems = mismatch_report(clip_expected, shapes_of(clip))
    if problems:
        raise UserError(f"{path} [encoder_1] does not match the CLIP-L text model: {problems}")
    out_dir = Path(out)
    recipe = f"# made by: python -m faceclip_zoo convert --official {path} --out {out}\nconvert:\n  official: {path}\n"
    info = {"source": str(path), "source_keys": len(state), "facet5_keys": len(facet5),
            "clip_text_keys": len(clip), "dropped_unused": dropped}
    target = write_model_dir(out_dir / cfg.name, "facet5", cfg, facet5, recipe=recipe + "  part: encoder_2\n",
                             extra={"converted_from_official": info})
    if tokenizer is not None:
        shutil.copytree(tokenizer, target / TOKENIZER_DIR, dirs_exist_ok=True)
    write_clip_text_dir(out_dir / "clip-l-text", clip_cfg, clip, recipe + "  part: encoder_1\n")
    (out_dir / "clip-l-text" / "conversion.json").write_text(json.dumps(info, indent=2) + "\n")
    return info
