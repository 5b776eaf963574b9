"""What `prepare` reads: a folder of photos (or short videos) with caption files, or a table
(.jsonl, .csv, .parquet) with an image (or video) path and a caption per row. Every input becomes one Record; a
record whose caption or path is unusable carries its error and ends in the rejects file
(nothing is dropped silently).

Folder:  photo.jpg + photo.txt (caption, UTF-8); with identity_from_folder, the photo's
         parent folder names the person: people/anna/1.jpg -> identity "anna".
Table:   columns image (path, relative to the table's folder), caption, optional identity
         and reference (a separate photo of the same person to use as the face input).
References folder (optional): <dir>/<identity>/*.jpg, extra photos per person that only
         serve as reference faces (SPSV: the face comes from another photo when possible).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from typing import Iterator

from faceclip_zoo.utils import UserError

PHOTO_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")  # gif: its first frame
# short videos (PyAV): sampled to the recipe's clip length, the face found on the first frame
VIDEO_EXTS = (".mp4", ".mov", ".m4v", ".webm", ".mkv", ".avi")
INPUT_EXTS = PHOTO_EXTS + VIDEO_EXTS
CAPTION_EXT = ".txt"


@dataclass
class Record:
    source: str  # what the user calls it: relative path or "table.jsonl:line 12"
    image: str | None  # absolute path
    caption: str | None
    identity: str | None = None
    reference: str | None = None  # absolute path of an explicit reference photo
    kind: str = "sample"  # sample | reference
    error: tuple[str, str] | None = None  # (reason, detail) known before any pixel is read

    @property
    def key(self) -> str:
        """Stable, tar-safe sample key (WebDataset splits member names at the first dot)."""
        return hashlib.sha1(f"{self.kind}:{self.source}".encode("utf-8", "surrogateescape")).hexdigest()[:20]

    def to_dict(self) -> dict:
        return asdict(self)


def _read_caption_file(path: str) -> tuple[str | None, tuple[str, str] | None]:
    if not os.path.exists(path):
        return None, ("missing_caption", f"no caption file {os.path.basename(path)} beside the photo")
    with open(path, "rb") as f:
        raw = f.read()
    return _check_caption(raw, path)


def _check_caption(raw: bytes | str | None, where: str) -> tuple[str | None, tuple[str, str] | None]:
    if raw is None:
        return None, ("missing_caption", f"{where}: no caption")
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            return None, ("caption_not_utf8", f"{where}: caption is not UTF-8 ({exc.reason} at byte {exc.start})")
    elif any(0xDC80 <= ord(c) <= 0xDCFF for c in raw):  # bytes smuggled through surrogateescape
        return None, ("caption_not_utf8", f"{where}: caption is not UTF-8")
    text = raw.strip().lstrip("\ufeff").strip()
    if not text:
        return None, ("empty_caption", f"{where}: caption is empty")
    return text, None


def _walk_photos(root: str, unusable: list[tuple[str, tuple[str, str]]] | None = None) -> list[str]:
    """The photos below `root` (hidden files and folders aside). Linked folders are
    followed, each real folder once: a link back to a folder above it (a loop) or to one
    already read is not entered again. With `unusable`, also collects what cannot be an
    input, as (path, (reason, detail)): folders that cannot be read, links not followed and
    files of other formats (caption files aside), so every path is counted."""
    found = []
    seen: set[str] = set()

    def reject(path: str, reason: str, detail: str) -> None:
        if unusable is not None:
            unusable.append((path, (reason, detail)))

    def unreadable(exc: OSError) -> None:
        reject(exc.filename, "unreadable_folder", f"{exc.filename}: {exc.strerror or exc}; its photos were not read")

    for folder, dirs, files in os.walk(root, onerror=unreadable, followlinks=True):
        real = os.path.realpath(folder)
        seen.add(real)
        enter = []
        for d in sorted(d for d in dirs if not d.startswith(".")):
            path = os.path.join(folder, d)
            target = os.path.realpath(path)
            if target == real or real.startswith(target + os.sep):
                reject(path, "symlink_loop", f"{d}: a link back to {target}, a folder it is inside; not followed")
            elif target in seen:
                reject(path, "duplicate_folder", f"{d}: a link to {target}, read already; not read twice")
            else:
                seen.add(target)
                enter.append(d)
        dirs[:] = enter
        for f in sorted(files):
            path = os.path.join(folder, f)
            if f.lower().endswith(INPUT_EXTS):
                found.append(path)
            elif not f.startswith(".") and not f.lower().endswith(CAPTION_EXT):
                reject(path, "unsupported_format", f"{f}: not a format prepare reads ({' '.join(INPUT_EXTS)})")
    return found


def folder_records(root: str, identity_from_folder: bool = False) -> Iterator[Record]:
    unusable: list[tuple[str, tuple[str, str]]] = []
    photos = _walk_photos(root, unusable)
    for path, error in unusable:
        yield Record(source=os.path.relpath(path, root), image=os.path.abspath(path), caption=None, error=error)
    for path in photos:
        caption, error = _read_caption_file(os.path.splitext(path)[0] + ".txt")
        rel = os.path.relpath(path, root)
        identity = os.path.basename(os.path.dirname(path)) if identity_from_folder and os.path.dirname(rel) else None
        yield Record(source=rel, image=os.path.abspath(path), caption=caption, identity=identity, error=error)


def reference_records(root: str) -> Iterator[Record]:
    """<root>/<identity>/<photo>: reference-only photos."""
    if not os.path.isdir(root):
        raise UserError(f"references folder not found: {root}")
    for path in _walk_photos(root):
        rel = os.path.relpath(path, root)
        if os.path.dirname(rel) == "":
            raise UserError(f"{path}: reference photos go in one folder per person: {root}/<identity>/<photo>")
        yield Record(source=f"references/{rel}", image=os.path.abspath(path), caption=None,
                     identity=rel.split(os.sep)[0], kind="reference")


def _rows(path: str) -> Iterator[tuple[str, dict | None, str | None]]:
    """(where, row, error) per row of a table."""
    ext = os.path.splitext(path)[1].lower()
    name = os.path.basename(path)
    if ext == ".jsonl":
        with open(path, "rb") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line.decode("utf-8", "surrogateescape"))
                except ValueError as exc:
                    yield f"{name}:line {i}", None, f"not valid JSON ({exc})"
                    continue
                yield f"{name}:line {i}", row if isinstance(row, dict) else None, \
                    None if isinstance(row, dict) else "a line must be a JSON object"
    elif ext == ".csv":
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
            for i, row in enumerate(csv.DictReader(f), 2):
                yield f"{name}:line {i}", row, None
    elif ext == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"{name}:row {i}", row, None
    else:
        raise UserError(f"{path}: unsupported input table (use a folder, .jsonl, .csv or .parquet)")


def table_records(path: str, image_column: str = "image", caption_column: str = "caption",
                  identity_column: str = "identity", reference_column: str = "reference") -> Iterator[Record]:
    base = os.path.dirname(os.path.abspath(path))
    resolve = lambda p: p if os.path.isabs(p) else os.path.join(base, p)  # noqa: E731
    seen_columns = False
    for where, row, error in _rows(path):
        if row is None:
            yield Record(source=where, image=None, caption=None, error=("bad_record", f"{where}: {error}"))
            continue
        if not seen_columns:
            seen_columns = True
            missing = [c for c in (image_column, caption_column) if c not in row]
            if missing:
                raise UserError(f"{path}: no column {', '.join(map(repr, missing))} (columns: {sorted(row)}); "
                                f"name them with image_column / caption_column")
        image = row.get(image_column)
        if not isinstance(image, str) or not image:
            yield Record(source=where, image=None, caption=None,
                         error=("bad_record", f"{where}: no image path in column {image_column!r}"))
            continue
        caption, cap_error = _check_caption(row.get(caption_column), where)
        identity = row.get(identity_column)
        reference = row.get(reference_column)
        yield Record(source=f"{where} ({image})", image=resolve(image), caption=caption,
                     identity=str(identity) if identity not in (None, "") else None,
                     reference=resolve(reference) if isinstance(reference, str) and reference else None,
                     error=cap_error)


def read_inputs(input: str, references: str | None = None, identity_from_folder: bool = False,
                **columns) -> list[Record]:
    if os.path.isdir(input):
        records = list(folder_records(input, identity_from_folder))
    elif os.path.isfile(input):
        records = list(table_records(input, **columns))
    else:
        raise UserError(f"input not found: {input} (a folder of photos, or a .jsonl/.csv/.parquet table)")
    if references:
        records += list(reference_records(references))
    if not any(r.kind == "sample" for r in records):
        raise UserError(f"{input}: no photos or videos found (looked for {', '.join(INPUT_EXTS)})")
    return records
