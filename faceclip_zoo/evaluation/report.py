"""What `evaluate` writes: results.json, results.md, per_image.jsonl, contact sheets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from PIL import Image, ImageOps

HEADLINE = (("face_sim", "Face Sim"), ("face_sim_detected", "Face Sim (faces found)"),
            ("faces_missing", "generated images without a face"), ("identity_top1", "identity top-1"),
            ("clip_t", "CLIP-T"), ("fid", "FID"))


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def markdown(results: dict[str, Any]) -> str:
    m = results["metrics"]
    lines = [f"# {results['benchmark']}", "",
             f"pipeline `{results['pipeline']}`, {results['generation']['images']} images", "",
             "| metric | value (+- standard error over the images) |", "|---|---|"]
    for key, name in HEADLINE:
        if key in m:
            extra = ""
            if key == "identity_top1":
                extra = f" (chance {m['identity_top1_chance']:.3f})"
            if key == "fid":
                extra = f" ({m['fid_features']}, {m['fid_real_images']} real images)"
            se = f" +- {_fmt(m[key + '_se'])}" if m.get(key + "_se") is not None else ""
            lines.append(f"| {name} | {_fmt(m[key])}{se}{extra} |")
    for key, label in (("face_id_model", "face-ID model"), ("clip_model", "CLIP model")):
        if key in m:
            lines.append(f"| {label} | `{m[key]}` |")
    ident = results.get("per_identity", {})
    cols = [c for c in ("images", "face_sim", "faces_missing", "clip_t") if ident and c in next(iter(ident.values()))]
    if ident and len(cols) > 1:
        lines += ["", "| identity | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for name, row in sorted(ident.items()):
            lines.append(f"| {name} | " + " | ".join(_fmt(row[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def contact_sheet(reference: Image.Image, images: Sequence[Image.Image], columns: int, rows: int,
                  tile: int | None = None) -> Image.Image:
    """Rows of [reference | generation x columns]; the reference column is framed."""
    images = list(images)[: columns * rows]
    columns = max(1, min(columns, len(images)))
    tile = tile or min(256, max(images[0].size) if images else 256)
    n_rows = max(1, -(-len(images) // columns))
    gap = max(2, tile // 32)
    sheet = Image.new("RGB", ((columns + 1) * (tile + gap) + gap, n_rows * (tile + gap) + gap), "white")
    ref = ImageOps.expand(ImageOps.fit(reference.convert("RGB"), (tile - 2 * gap, tile - 2 * gap)),
                          border=gap, fill=(40, 40, 40))
    for r in range(n_rows):
        y = gap + r * (tile + gap)
        sheet.paste(ref, (gap, y))
        for c, im in enumerate(images[r * columns:(r + 1) * columns]):
            sheet.paste(ImageOps.fit(im.convert("RGB"), (tile, tile)), (gap + (c + 1) * (tile + gap), y))
    return sheet


def write_report(out: Path, results: dict[str, Any], records: list[dict], jobs, columns: int, rows: int
                 ) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    sheets: dict[str, list] = {}
    for job in jobs:
        sheets.setdefault(job.identity, [job.references[0], []])[1].append(out / "images" / f"{job.name}.png")
    sheet_paths = {}
    for identity, (reference, paths) in sorted(sheets.items()):
        images = [Image.open(p) for p in paths[: columns * rows]]
        path = out / "sheets" / f"{identity}.png"
        path.parent.mkdir(exist_ok=True)
        contact_sheet(Image.open(reference), images, columns, rows).save(path)
        sheet_paths[identity] = path
    results["sheets"] = {k: str(v.relative_to(out)) for k, v in sheet_paths.items()}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown(results))
    with open(out / "per_image.jsonl", "w") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    return {"results": out / "results.json", "markdown": out / "results.md", **sheet_paths}
