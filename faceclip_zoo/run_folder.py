"""A run's folder is one key: `trainer.default_root_dir`.

Lightning's loggers and ModelCheckpoint each take their own folder, so our recipes spell
the run folder three times (logger `save_dir`s, the checkpoints' `dirpath`). A user who
points a run elsewhere with `--trainer.default_root_dir` expects all of it to move: here
every logger folder and checkpoint folder that the recipe placed inside its own
`default_root_dir` follows the new one. A folder the recipe put elsewhere, or that the user
set on the command line, stays where it was named.

And a fit that fails before it trains a step leaves nothing behind: the folders it created
(the run folder, version_N, checkpoints/) are removed again, so a typo in a recipe never
leaves an empty run that looks like a result. Lightning has neither rule; both are ours.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Iterable


def recipe_root(config_files: Iterable[Any] | None) -> str | None:
    """The `trainer.default_root_dir` the recipe file(s) wrote (the last one that sets it)."""
    import yaml

    root = None
    for path in config_files or []:
        try:
            trainer = (yaml.safe_load(Path(str(path)).read_text()) or {}).get("trainer") or {}
        except (OSError, yaml.YAMLError, AttributeError):
            continue
        if isinstance(trainer, dict) and trainer.get("default_root_dir"):
            root = str(trainer["default_root_dir"])
    return root


def _moved(path: str | None, old: Path, new: Path) -> str | None:
    if not path:
        return path
    p = Path(path)
    try:
        rel = p.relative_to(old)
    except ValueError:
        return path
    return str(new / rel)


def _entries(section: Any) -> list:
    if section is None or isinstance(section, bool):
        return []
    return list(section) if isinstance(section, list) else [section]


def follow_run_folder(trainer: Any, recipe_default_root: str | None, given: set[str]) -> None:
    """Re-root the loggers' `save_dir` and the checkpoints' `dirpath` that lie inside the
    recipe's `default_root_dir` onto the run's (the command line's) `default_root_dir`.
    `trainer` is the parsed trainer section (a jsonargparse Namespace); `given` holds the
    option names set on the command line (never moved: the user named them)."""
    new = trainer.get("default_root_dir")
    if not recipe_default_root or not new or Path(new) == Path(recipe_default_root):
        return
    old, new = Path(recipe_default_root), Path(new)
    if not any(name.startswith("trainer.logger") for name in given):
        for logger in _entries(trainer.get("logger")):
            args = logger.get("init_args") if hasattr(logger, "get") else None
            if args is not None and "save_dir" in args:
                args["save_dir"] = _moved(args["save_dir"], old, new)
    if not any(name.startswith("trainer.callbacks") for name in given):
        for callback in _entries(trainer.get("callbacks")):
            args = callback.get("init_args") if hasattr(callback, "get") else None
            if args is not None and str(callback.get("class_path", "")).endswith("ModelCheckpoint"):
                args["dirpath"] = _moved(args.get("dirpath"), old, new)


def run_folders(trainer: Any) -> list[Path]:
    """Every folder a fit of this trainer section writes into: the run folder, the loggers'
    folders, the checkpoint folders."""
    folders = [trainer.get("default_root_dir") or os.getcwd()]
    for logger in _entries(trainer.get("logger")):
        args = logger.get("init_args") if hasattr(logger, "get") else None
        if args is not None and args.get("save_dir"):
            folders.append(args["save_dir"])
    for callback in _entries(trainer.get("callbacks")):
        args = callback.get("init_args") if hasattr(callback, "get") else None
        if args is not None and args.get("dirpath") and str(callback.get("class_path", "")).endswith("ModelCheckpoint"):
            folders.append(args["dirpath"])
    return list(dict.fromkeys(Path(f).absolute() for f in folders))


class CreatedFolders:
    """What a command's folders held before it ran, to take back what it created when it
    fails before training a step."""

    def __init__(self, folders: list[Path]):
        self.folders = folders
        self.existed = {f: f.is_dir() for f in folders}
        self.children = {f: set(os.listdir(f)) if self.existed[f] else set() for f in folders}

    def remove_created(self) -> list[Path]:
        """Remove the folders (and new subfolders of existing ones, e.g. version_N) made
        since; never one holding a checkpoint. Returns what was removed."""
        removed = []
        for folder in sorted(self.folders, key=lambda f: len(f.parts), reverse=True):
            if not folder.is_dir():
                continue
            if not self.existed[folder]:
                candidates = [folder]
            else:
                candidates = [folder / name for name in set(os.listdir(folder)) - self.children[folder]
                              if (folder / name).is_dir()]
            for path in candidates:
                if path.is_dir() and not any(path.rglob("*.ckpt")):
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(path)
        return removed
