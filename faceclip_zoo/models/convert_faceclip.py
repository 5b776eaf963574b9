"""FaceCLIP weights: official release layout <-> faceclip_zoo.

The release's model/face_clip_encoder.pt is a plain state dict of its
`FaceCLIP_L_G_Wrapper` (keys optionally prefixed `model.`):
`face_clip_l.<branch key>` (ViT-L/14 text tower) and `face_clip_g.<branch key>` (bigG/14).
A branch key maps to ours unchanged except the fuser: `fuser.encoder.X` -> `fuser.X`;
`fuser.enc_output*` (never used by the release's forward) are dropped and reported.

The file is read memory-mapped with weights_only=True (no pickled code runs) and each
branch is written tensor by tensor, so converting needs about the file's size in memory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import torch

from faceclip_zoo.config import FaceCLIPConfig
from faceclip_zoo.models.io import build_on_meta, write_model_dir
from faceclip_zoo.utils import UserError, mismatch_report, require_file, safe_torch_load, shapes_of

OFFICIAL_BRANCHES = {"face_clip_l": "faceclip-l14", "face_clip_g": "faceclip-bigg14"}
UNUSED_PREFIXES = ("fuser.enc_output.", "fuser.enc_output_norm.")


def official_to_ours(key: str) -> str | None:
    """Branch-level key rename; None for the release's unused modules."""
    if key.startswith(UNUSED_PREFIXES):
        return None
    if key.startswith("fuser.encoder."):
        return "fuser." + key[len("fuser.encoder."):]
    return key


def ours_to_official(key: str) -> str:
    return "fuser.encoder." + key[len("fuser."):] if key.startswith("fuser.") else key


def load_official(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """torch.load(weights_only=True, mmap=True): tensors stay on disk until read."""
    p = require_file(path, "official checkpoint")
    state = safe_torch_load(p, mmap=True)
    if not isinstance(state, Mapping):
        raise UserError(f"{p} holds a {type(state).__name__}, expected a state dict")
    if "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    return {k[len("model."):] if k.startswith("model.") else k: v for k, v in state.items()}


def split_branches(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, dict], list[str]]:
    """{branch: {our key: tensor}}, and the official keys that were dropped as unused."""
    branches: dict[str, dict[str, torch.Tensor]] = {b: {} for b in OFFICIAL_BRANCHES}
    dropped, unknown = [], []
    for key, value in state.items():
        branch, _, rest = key.partition(".")
        if branch not in branches:
            unknown.append(key)
            continue
        ours = official_to_ours(rest)
        if ours is None:
            dropped.append(key)
        else:
            branches[branch][ours] = value
    if unknown:
        raise UserError(f"{len(unknown)} keys belong to no FaceCLIP branch (expected prefixes "
                        f"{sorted(OFFICIAL_BRANCHES)}), e.g. {unknown[:3]}")
    return branches, dropped


def convert_official_faceclip(
    path: str | os.PathLike, out: str | os.PathLike,
    configs: Mapping[str, FaceCLIPConfig] | None = None,
) -> dict[str, dict]:
    """face_clip_encoder.pt -> <out>/faceclip-l14 and <out>/faceclip-bigg14 (our export
    format). `configs` overrides the config of a branch (tests use small ones).
    Returns a report per branch: key counts and dropped keys."""
    state = load_official(path)
    branches, dropped = split_branches(state)
    report = {}
    for branch, tensors in branches.items():
        cfg = (configs or {}).get(branch) or FaceCLIPConfig.from_name(OFFICIAL_BRANCHES[branch])
        if not tensors:
            raise UserError(f"{path} holds no {branch}.* keys")
        expected = shapes_of(build_on_meta("faceclip", cfg).state_dict())
        problems = mismatch_report(expected, shapes_of(tensors))
        if problems:
            raise UserError(f"{path} [{branch}] does not match {cfg.name}: {problems}")
        branch_dropped = [k for k in dropped if k.startswith(branch + ".")]
        info = {"source": str(path), "source_keys": len(tensors) + len(branch_dropped),
                "converted_keys": len(tensors), "dropped_unused": branch_dropped}
        recipe = (f"# made by: python -m faceclip_zoo convert --official {path} --out {out}\n"
                  f"convert:\n  official: {path}\n  branch: {branch}\n")
        write_model_dir(Path(out) / cfg.name, "faceclip", cfg, tensors, recipe=recipe,
                        extra={"converted_from_official": info})
        report[cfg.name] = info
    return report
