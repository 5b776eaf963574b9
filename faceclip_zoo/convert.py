"""`python -m faceclip_zoo convert`: official release files -> faceclip_zoo model directories.

    python -m faceclip_zoo convert --official /path/to/FaceCLIP --out checkpoints/faceclip-official

Release file (Hugging Face ByteDance/FaceCLIP)   -> our directory
model/face_clip_encoder.pt                       -> <out>/faceclip-l14, <out>/faceclip-bigg14
model/unet.pt                                    -> <out>/sdxl-unet (diffusers folder)
model/dit.pt                                     -> <out>/flux-transformer (diffusers folder)
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from faceclip_zoo.utils import UserError, require_file

log = logging.getLogger(__name__)

# release files we convert, and those whose converter arrives with the FaceT5 stage
SUPPORTED = ("face_clip_encoder.pt", "unet.pt", "dit.pt")
KNOWN_NOT_YET = ("face_t5_encoder.pt",)


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
    from faceclip_zoo.models.convert_diffusion import convert_official_diffusers
    from faceclip_zoo.models.convert_faceclip import convert_official_faceclip

    src = require_file(official, "official release path")
    out_dir = Path(out)
    report: dict = {}
    for path in _find(src):
        if path.name == "unet.pt":
            report[path.name] = convert_official_diffusers(path, out_dir / "sdxl-unet", "sdxl-unet", "SDXL UNet")
        elif path.name == "dit.pt":
            report[path.name] = convert_official_diffusers(
                path, out_dir / "flux-transformer", "flux-dev-transformer", "FLUX transformer")
        elif path.name in KNOWN_NOT_YET:
            report[path.name] = "not converted: this release file is not supported yet"
        else:  # face_clip_encoder.pt, or a single file under another name
            report[path.name] = convert_official_faceclip(path, out_dir)
    converted = {k: v for k, v in report.items() if isinstance(v, dict)}
    if not converted:
        raise UserError(f"nothing converted from {src}: {json.dumps(report)}")
    for name, info in report.items():
        log.info("%s: %s", name, json.dumps(info) if not isinstance(info, str) else info)
    return report
