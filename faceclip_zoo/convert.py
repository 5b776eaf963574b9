"""`python -m faceclip_zoo convert`: official release files -> faceclip_zoo model directories.

    python -m faceclip_zoo convert --official /path/to/FaceCLIP --out checkpoints/faceclip-official

Release file (Hugging Face ByteDance/FaceCLIP)   -> our directory
model/face_clip_encoder.pt                       -> <out>/faceclip-l14, <out>/faceclip-bigg14
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from faceclip_zoo.utils import UserError, require_file

log = logging.getLogger(__name__)

# release file name -> converter (more arrive with the SDXL, FLUX and FaceT5 stages)
SUPPORTED = ("face_clip_encoder.pt",)
KNOWN_NOT_YET = ("unet.pt", "dit.pt", "face_t5_encoder.pt")


def _find(official: Path) -> list[Path]:
    if official.is_file():
        return [official]
    found = [p for name in SUPPORTED + KNOWN_NOT_YET
             for p in (official / "model" / name, official / name) if p.exists()]
    if not found:
        raise UserError(f"no release files in {official}: expected model/{{{','.join(SUPPORTED + KNOWN_NOT_YET)}}}")
    return found


def convert(official: str, out: str) -> dict:
    """Convert every release file found at `official` (a file, or the release folder).

    Args:
        official: model/face_clip_encoder.pt, or the downloaded release folder.
        out: output folder; one model directory per converted model.
    """
    from faceclip_zoo.models.convert_faceclip import convert_official_faceclip

    src = require_file(official, "official release path")
    report: dict = {}
    for path in _find(src):
        if path.name == "face_clip_encoder.pt" or (src.is_file() and path.name not in KNOWN_NOT_YET):
            report[path.name] = convert_official_faceclip(path, out)
        else:
            report[path.name] = "not converted: this release file is not supported yet"
    converted = {k: v for k, v in report.items() if isinstance(v, dict)}
    if not converted:
        raise UserError(f"nothing converted from {src}: {json.dumps(report)}")
    for name, info in report.items():
        log.info("%s: %s", name, json.dumps(info) if not isinstance(info, str) else info)
    return report
