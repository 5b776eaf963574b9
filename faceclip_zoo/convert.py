"""`python -m faceclip_zoo convert`: official release files -> faceclip_zoo model directories.

    python -m faceclip_zoo convert --official /path/to/FaceCLIP --out checkpoints/faceclip-official

Release file (Hugging Face ByteDance/FaceCLIP)   -> our directory
model/face_clip_encoder.pt                       -> <out>/faceclip-l14, <out>/faceclip-bigg14
model/face_t5_encoder.pt                         -> <out>/facet5-xxl-release, <out>/clip-l-text
model/unet.pt                                    -> <out>/sdxl-unet (diffusers folder)
model/dit.pt                                     -> <out>/flux-transformer (diffusers folder)
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from faceclip_zoo.utils import UserError, check_output_folder, require_file

log = logging.getLogger(__name__)

SUPPORTED = ("face_clip_encoder.pt", "face_t5_encoder.pt", "unet.pt", "dit.pt")
KNOWN_NOT_YET: tuple[str, ...] = ()


def _find(official: Path) -> list[Path]:
    if official.is_file():
        return [official]
    found = [p for name in SUPPORTED + KNOWN_NOT_YET
             for p in (official / "model" / name, official / name) if p.exists()]
    if not found:
        raise UserError(f"no release files in {official}: expected model/{{{','.join(SUPPORTED + KNOWN_NOT_YET)}}}")
    return found


def _t5_tokenizer_folder(official: Path, given: str | None) -> Path | None:
    """The T5 tokenizer to store with FaceT5: given, or one shipped beside the weights."""
    if given:
        return require_file(given, "T5 tokenizer folder")
    root = official if official.is_dir() else official.parent.parent
    for cand in (root / "model" / "tokenizer_2", root / "model" / "tokenizer", root / "tokenizer_2"):
        if (cand / "spiece.model").exists():  # SentencePiece: a T5 vocabulary (CLIP's is BPE)
            return cand
    return None


def convert(official: str, out: str, t5_tokenizer: str | None = None, overwrite: bool = False) -> dict:
    """Convert every release file found at `official` (a file, or the release folder).

    Args:
        official: a release file (model/face_clip_encoder.pt, ...), or the downloaded release folder.
        out: output folder; one model directory per converted model.
        t5_tokenizer: a T5 v1.1 tokenizer folder (e.g. FLUX.1-dev/tokenizer_2) to store in
            the FaceT5 directory (found automatically when the release folder has one).
        overwrite: write into a non-empty --out (its model folders are replaced file by file).
    """
    from faceclip_zoo.models.convert_diffusion import convert_official_diffusers
    from faceclip_zoo.models.convert_faceclip import convert_official_faceclip
    from faceclip_zoo.models.convert_facet5 import convert_official_facet5

    src = require_file(official, "official release path")
    check_output_folder(out, "--out", overwrite)
    out_dir = Path(out)
    report: dict = {}
    for path in _find(src):
        if path.name == "unet.pt":
            report[path.name] = convert_official_diffusers(path, out_dir / "sdxl-unet", "sdxl-unet", "SDXL UNet")
        elif path.name == "dit.pt":
            report[path.name] = convert_official_diffusers(
                path, out_dir / "flux-transformer", "flux-dev-transformer", "FLUX transformer")
        elif path.name == "face_t5_encoder.pt":
            report[path.name] = convert_official_facet5(path, out_dir,
                                                        tokenizer=_t5_tokenizer_folder(src, t5_tokenizer))
        elif path.name in KNOWN_NOT_YET:
            report[path.name] = "not converted: this release file is not supported yet"
        else:  # face_clip_encoder.pt, or a single file under another name
            report[path.name] = convert_official_faceclip(path, out_dir)
    converted = {k: v for k, v in report.items() if isinstance(v, dict)}
    if not converted:
        raise UserError(f"nothing converted from {src}: {json.dumps(report)}")
    for name, info in report.items():
        log.info("%s: %s", name, json.dumps(info) if not isinstance(info, str) else info)
    _write_cards(out_dir, src)
    return report


def _write_cards(out_dir: Path, src: Path) -> None:
    """A model card in every folder this conversion wrote: the release's licence and name."""
    from faceclip_zoo.cards import RELEASE_REPO, CardFacts, describe_folder, write_model_card

    for folder in sorted(p for p in out_dir.iterdir() if p.is_dir()):
        recipe = folder / "recipe.yaml"
        if recipe.is_file() and recipe.read_text().startswith("# made by: python -m faceclip_zoo convert"):
            kind, what = describe_folder(folder)
            write_model_card(folder, CardFacts(
                kind=kind, what=what, made_by=f"`python -m faceclip_zoo convert` of the official release ({src})",
                from_release=True, base_model=RELEASE_REPO))
