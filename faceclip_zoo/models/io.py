"""Self-describing model directories: model.safetensors + config.json (+ recipe.yaml).

    save_model_dir(encoder, "out/", recipe="...yaml text...")
    encoder = load_model_dir("out/")
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple

import torch
from safetensors.torch import load_file

from faceclip_zoo.config import CLIPConfig, FaceCLIPConfig, FaceT5Config, FaceViTConfig
from faceclip_zoo.utils import UserError, check_safetensors, load_strict, require_file, state_under

FORMAT_VERSION = 1


class ModelKind(NamedTuple):
    """One kind of model directory: its config class, how to build the model from a config,
    and the class of the models it holds."""

    config: type
    build: Callable[[Any], torch.nn.Module]
    model: type


def model_builders() -> dict[str, ModelKind]:
    """The registry of model directory kinds, by the `model_type` their config.json names
    (the one place that knows them: save, load, export and evaluation read it from here)."""
    import open_clip

    from faceclip_zoo.models.clip import build_clip
    from faceclip_zoo.models.face_vit import FaceViT
    from faceclip_zoo.models.faceclip import FaceCLIPEncoder
    from faceclip_zoo.models.facet5 import FaceT5Encoder

    return {
        "faceclip": ModelKind(FaceCLIPConfig, FaceCLIPEncoder, FaceCLIPEncoder),
        "facet5": ModelKind(FaceT5Config, FaceT5Encoder, FaceT5Encoder),
        "face_vit": ModelKind(FaceViTConfig, FaceViT, FaceViT),
        "clip": ModelKind(CLIPConfig, build_clip, open_clip.CLIP),
    }


def checkpoint_exports(checkpoint: dict) -> dict[str, dict]:
    """The exportable parts a faceclip_zoo fit checkpoint records: part name -> export entry
    (`{"model_type", ...}`; written by the tasks' on_save_checkpoint)."""
    return checkpoint.get("faceclip_zoo", {}).get("exports", {})


def model_from_checkpoint(checkpoint: dict, spec: dict, source: str):
    """The model a fit checkpoint's export entry names (`{"model_type", "config",
    "prefix"}`, written by the encoder tasks), with its weights -> (model, config)."""
    kind = model_builders()[spec["model_type"]]
    config = kind.config.from_dict(spec["config"])
    module = kind.build(config)
    load_strict(module, state_under(checkpoint["state_dict"], spec["prefix"]), source)
    return module, config


def model_type_of(module: torch.nn.Module) -> str:
    for name, kind in model_builders().items():
        if type(module) is kind.model:
            return name
    raise TypeError(f"no model directory format for {type(module).__name__}")


_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                      metadata: dict[str, str] | None = None) -> None:
    """Write a .safetensors file one tensor at a time.

    Hand-written because safetensors' own writer first copies every tensor to bytes in
    memory; converting a 24 GB release file that way needs twice its size in RAM. The
    header needs only shapes and dtypes, so memory-mapped inputs are read tensor by tensor.
    The format is safetensors' documented one (8-byte header length, JSON header, data).
    """
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    # a lazy mapping (bench/standins.py) states shapes and dtypes up front as `specs`, so
    # the header costs no tensor
    specs = getattr(tensors, "specs", None)
    offset = 0
    for name in sorted(tensors):
        if specs is not None:
            shape, dtype = specs[name]
        else:
            shape, dtype = tensors[name].shape, tensors[name].dtype
        if dtype not in _ST_DTYPES:
            raise TypeError(f"{name}: dtype {dtype} cannot be stored in safetensors")
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in sorted(tensors):
            t = tensors[name].detach().cpu().contiguous()
            if t.numel():
                f.write(memoryview(t.view(-1).view(torch.uint8).numpy()))


def current_umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: set it back at once
    os.umask(mask)
    return mask


def atomic_write(folder: Path, name: str, write: Callable[[str], None]) -> None:
    """`write(tmp_path)` into a temporary file of `folder`, then rename it to `name`: a
    reader never sees a half-written file, and an interrupted write leaves none behind."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.")
    os.close(fd)
    try:
        write(tmp)
        # mkstemp makes the file 0600; the result gets the mode any new file of the user
        # gets (0644 under the usual umask), or a model folder is unreadable to the group
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, folder / name)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_model_dir(
    out_dir: str | os.PathLike, model_type: str, config, tensors: Mapping[str, torch.Tensor],
    recipe: str | None = None, extra: dict | None = None,
) -> Path:
    """Weights + config.json (+ recipe.yaml). Each file is written under a temporary name
    and renamed, so a crash never leaves a half-written model that looks complete."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format_version": FORMAT_VERSION, "model_type": model_type, "config": config.to_dict(),
            **(extra or {})}
    atomic_write(out, "model.safetensors", lambda p: write_safetensors(p, tensors))
    atomic_write(out, "config.json", lambda p: Path(p).write_text(json.dumps(meta, indent=2) + "\n"))
    if recipe is not None:
        atomic_write(out, "recipe.yaml", lambda p: Path(p).write_text(recipe))
    return out


def save_model_dir(
    module: torch.nn.Module, out_dir: str | os.PathLike, config=None,
    recipe: str | None = None, extra: dict | None = None,
) -> Path:
    """Write a module's weights, its config and (optionally) the recipe that made it."""
    config = config if config is not None else module.config
    out = write_model_dir(out_dir, model_type_of(module), config, module.state_dict(), recipe, extra)
    save_tokenizer(module, out)
    return out


TOKENIZER_DIR = "tokenizer"


def save_tokenizer(module: torch.nn.Module, out: Path) -> None:
    """A FaceT5 encoder with a real (file-based) T5 tokenizer keeps it beside its weights,
    so the directory is usable alone; builtin vocabularies are rebuilt from the config."""
    tok = getattr(module, "_tokenizer", None)
    cfg = getattr(module, "config", None)
    if tok is not None and isinstance(cfg, FaceT5Config) and cfg.t5.tokenizer is None:
        tok.save_pretrained(str(out / TOKENIZER_DIR))


def build_on_meta(model_type: str, config) -> torch.nn.Module:
    """The model of a directory, without allocating its weights (for key/shape checks)."""
    build = model_builders()[model_type].build
    with torch.device("meta"):
        return build(config)


def read_config(model_dir: str | os.PathLike) -> tuple[str, Any]:
    path = require_file(Path(model_dir) / "config.json", "model config")
    try:
        meta = json.loads(path.read_text())
        model_type = meta["model_type"]
        return model_type, model_builders()[model_type].config.from_dict(meta["config"])
    except (KeyError, ValueError) as exc:
        raise UserError(f"{path} is not a faceclip_zoo model config ({exc})") from None


def load_model_dir(model_dir: str | os.PathLike, expect: str | None = None) -> torch.nn.Module:
    """Rebuild a model from its directory alone (strict key and shape check)."""
    model_type, cfg = read_config(model_dir)
    if expect is not None and model_type != expect:
        raise UserError(f"{model_dir} holds a {model_type!r} model, expected {expect!r}")
    module = model_builders()[model_type].build(cfg)
    weights = require_file(Path(model_dir) / "model.safetensors", "model weights")
    check_safetensors([weights], "model weights")
    load_strict(module, load_file(str(weights)), str(weights))
    if model_type == "facet5" and (Path(model_dir) / TOKENIZER_DIR).is_dir():
        module.set_tokenizer(Path(model_dir) / TOKENIZER_DIR)
    if not hasattr(module, "config"):
        module.config = cfg
    return module.eval()
