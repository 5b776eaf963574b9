"""Small shared helpers: user-facing errors and safe weight-file reading."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import torch


class UserError(RuntimeError):
    """A problem with the user's input (a path, a key, a file). The CLI prints its
    message as one line, without a traceback."""


RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"


def recipe_that_exports(folder: str | os.PathLike) -> str | None:
    """The shipped recipe whose ExportOnFitEnd writes `folder` (e.g. the quickstart encoder
    that the SDXL quickstart starts from), as a path relative to the checkout, or None."""
    import yaml

    wanted = Path(folder).as_posix().rstrip("/")
    for recipe in sorted(RECIPES_DIR.rglob("*.yaml")):
        try:
            callbacks = (yaml.safe_load(recipe.read_text()) or {}).get("trainer", {}).get("callbacks") or []
        except (yaml.YAMLError, AttributeError):
            continue
        for cb in callbacks:
            if (isinstance(cb, dict) and str(cb.get("class_path", "")).endswith("ExportOnFitEnd")
                    and str((cb.get("init_args") or {}).get("dirpath", "")).rstrip("/") == wanted):
                return recipe.relative_to(RECIPES_DIR.parent).as_posix()
    return None


def redirect_loggers(trainer: dict, save_dir: str, **init_args) -> None:
    """Point every logger of a recipe's `trainer` section (one, or a list) at `save_dir`
    (tests and the ablation run shipped recipes in their own folders)."""
    loggers = trainer.get("logger")
    for logger in loggers if isinstance(loggers, list) else [loggers] if loggers else []:
        if isinstance(logger, dict):
            logger.setdefault("init_args", {}).update(save_dir=save_dir, **init_args)


def require_file(path: str | os.PathLike, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise UserError(f"{what} not found: {p} (check the path in your recipe or command)")
    return p


def require_at_least(limits: Mapping[str, tuple[float | None, float]]) -> None:
    """{option: (value, minimum)}: the first value below its minimum is a UserError naming
    the option (None: not given, not checked). Checked before a command does any work."""
    for name, (value, minimum) in limits.items():
        if value is not None and value < minimum:
            raise UserError(f"{name} must be at least {minimum}, got {value}")


def check_output_folder(path: str | os.PathLike, what: str, overwrite: bool = False) -> Path:
    """Refuse, before any work, an output folder that cannot be written or would be
    clobbered: a file in its place, a non-empty folder (unless overwrite), a parent that is
    a file or not writable."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UserError(f"{what} {out} is a file; name a folder to write into")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{what} {out} exists and is not empty; pass --overwrite true to replace it")
    existing = out if out.exists() else next((p for p in out.absolute().parents if p.exists()), Path("/"))
    if not (existing.is_dir() and os.access(existing, os.W_OK)):
        raise UserError(f"{what} {out}: {existing} is not a writable folder")
    return out


def replace_folder(out: Path, write) -> Path:
    """Call `write(folder)` on a new sibling folder, then swap it in for `out`: a failed
    write leaves `out` as it was, and nothing of an earlier export lingers beside the new
    files."""
    import shutil

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def safe_torch_load(path: str | os.PathLike, mmap: bool = True):
    """torch.load with weights_only=True (the unpickler refuses anything but tensors and
    plain containers, so no pickled code runs), memory-mapped when the file allows it."""
    import pickle

    try:
        try:
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as exc:
            if not mmap or "mmap" not in str(exc):
                raise
            return torch.load(str(path), map_location="cpu", weights_only=True)  # legacy format
    except pickle.UnpicklingError as exc:
        raise UserError(f"refusing to load {path}: {unpickling_refusal(exc)}") from None
    except Exception as exc:
        raise UserError(f"cannot read {path}: {unreadable_reason(path, exc)}") from None


def unreadable_reason(path: str | os.PathLike, exc: BaseException) -> str:
    """Why a file could not be read, in a few words (torch's messages run over lines, and
    an empty file's is empty)."""
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        return "the file is empty"
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"


def unpickling_refusal(exc: BaseException) -> str:
    """torch's weights-only refusal in one line, naming what it refused (its message is a
    paragraph whose first line never names the global)."""
    import re

    text = str(exc)
    # torch words it "Unsupported global: GLOBAL x.y ..." or "unsupported GLOBAL x.y whose module ..."
    found = re.search(r"GLOBAL ([\w.]+)", text)
    operand = re.search(r"[Uu]nsupported operand (\d+)", text)
    what = (f"it would import {found.group(1)}" if found else
            f"unsupported pickle operand {operand.group(1)}" if operand else "it holds more than tensors")
    return (f"it is not a plain tensor checkpoint ({what}); weights are read with weights_only=True, so "
            "pickled code never runs (convert a file you trust with torch.load and torch.save of its state dict)")


def safe_open_safetensors(file: str, what: str):
    """safetensors' safe_open, a damaged file refused in one line naming it."""
    from safetensors import safe_open

    try:
        return safe_open(file, framework="pt")
    except Exception as exc:  # noqa: BLE001 (safetensors raises its own error types)
        size = os.path.getsize(file) if os.path.exists(file) else None
        why = "empty" if size == 0 else (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        raise UserError(f"{what}: {file} is not a readable safetensors file ({why}); it was cut short or is not "
                        "safetensors: write or download it again") from None


def check_safetensors(files, what: str) -> None:
    """Every file's header is whole and its tensors lie inside the file (safetensors checks
    both when it opens one; a truncated or empty file is refused here, naming it, instead
    of deep inside a library's loader)."""
    for file in files:
        safe_open_safetensors(str(file), what)


def load_weights_file(path: str | os.PathLike, what: str = "weights file") -> dict[str, torch.Tensor]:
    """Read a safetensors file, or a foreign torch pickle with weights_only=True (never
    executing pickled code). A directory means its model.safetensors."""
    p = require_file(path, what)
    if p.is_dir():
        p = require_file(p / "model.safetensors", what)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        check_safetensors([p], what)
        return load_file(str(p))
    obj = safe_torch_load(p)
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise UserError(f"{p} holds a {type(obj).__name__}, expected a state dict")
    return dict(obj)


def mismatch_report(expected: Mapping[str, tuple], got: Mapping[str, tuple]) -> str | None:
    """Missing keys, unexpected keys and shape mismatches between two {key: shape} maps,
    summarised on one line (None when they agree)."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    shapes = [f"{k}: got {tuple(got[k])} expected {tuple(expected[k])}"
              for k in sorted(set(expected) & set(got)) if tuple(got[k]) != tuple(expected[k])]

    def head(items):
        return ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")

    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys [{head(missing)}]")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys [{head(unexpected)}]")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches [{head(shapes)}]")
    return "; ".join(parts) or None


def shapes_of(state: Mapping[str, torch.Tensor]) -> dict[str, tuple]:
    if hasattr(state, "shapes"):  # a lazy view over files (models/weights.py): headers only
        return state.shapes()
    return {k: tuple(v.shape) for k, v in state.items()}


def state_under(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of a state dict under `prefix`, with the prefix removed (one sub-model
    of a fit checkpoint)."""
    if hasattr(state, "under"):  # a lazy view stays lazy
        return state.under(prefix)
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load_strict(module: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str,
                dtype: torch.dtype | None = None) -> None:
    """load_state_dict with a readable one-line report instead of a library traceback.

    A module built without memory (models/weights.py `empty_weights`) gets the tensors
    themselves, read one at a time and cast to `dtype` (floating-point ones; default: the
    dtype the module was built in), so real-size weights are held once."""
    targets = module.state_dict(keep_vars=True)
    report = mismatch_report(shapes_of(targets), shapes_of(state))
    if report:
        raise UserError(f"{source} does not match {type(module).__name__}: {report}")
    if any(t.is_meta for t in targets.values()):
        assigned = {}
        for key, target in targets.items():
            value = state[key]
            want = dtype if dtype is not None and value.is_floating_point() else target.dtype
            # A tensor of its file's dtype is the file's memory-mapped pages (read in place,
            # never copied). When the weights are cast, the few that are not (integer
            # buffers) are copied, or they alone would keep the whole file mapped.
            assigned[key] = value.to(want, copy=dtype is not None and not value.is_floating_point())
            del value
        module.load_state_dict(assigned, strict=True, assign=True)
        return
    module.load_state_dict(state if isinstance(state, dict) else dict(state.items()), strict=True)
    if dtype is not None:
        module.to(dtype)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write through a temporary file in the same folder and rename: readers (and a re-run
    after a kill) see the old file or the whole new one, never a part."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
