"""One input of `prepare`, phase 1: read, check, detect, filter, align, and write its work
item (<work>/<key>.json last: its presence means done). The one-process run, the process
pool and the distributed predict loop (faceclip_zoo.tasks.prepare) all call
`process_record`, so their work items are the same bytes.
"""

from __future__ import annotations

import io
import json
import os
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image

from faceclip_zoo.data.align import crop_face, pick_face, sharpness
from faceclip_zoo.data.images import DEFAULT_MAX_PIXELS, ImageRejected, LoadedImage, load_image
from faceclip_zoo.data.prepare_inputs import VIDEO_EXTS, Record
from faceclip_zoo.utils import atomic_write_bytes


@dataclass
class Filters:
    """Which faces make usable training data. Defaults follow common practice for
    identity datasets; every threshold is a recipe option."""

    multiple_faces: Literal["largest", "reject"] = "largest"
    min_face_size: int = 64  # shorter side of the detected box, pixels of the photo
    min_score: float = 0.9  # detector confidence
    max_yaw: float = 0.6  # align.pose_of units: about 1 at full profile
    max_pitch: float = 0.3
    min_sharpness: float = 15.0  # variance of the Laplacian of the 112 px grey face
    min_image_size: int = 128  # shorter side of the photo
    max_pixels: int = DEFAULT_MAX_PIXELS  # declared width x height above this is refused unread (50 M)
    clip_frames: int = 9  # videos: frames a clip is sampled to (the video recipe's length; Wan: 1 + 4k)


# ---------------------------------------------------------------- phase 1: one input
_DETECTOR = None
_READY_AT = 0.0  # perf_counter when this process (and, distributed, every rank) could start work


def detector():
    """This process's detector (init_detector builds it)."""
    return _DETECTOR


def mark_ready() -> None:
    global _READY_AT
    _READY_AT = time.perf_counter()


def ready_at() -> float:
    return _READY_AT


def init_detector(detector: str, detector_model_dir: str | None, threads: int = 1, device: str = "cpu") -> None:
    """The detector of this process (each worker process, each rank builds its own), on
    `device` (cpu, or a rank's cuda:k)."""
    global _DETECTOR
    import torch

    torch.set_num_threads(threads)
    from faceclip_zoo.data.detect import build_detector

    _DETECTOR = build_detector(detector, model_dir=detector_model_dir, **({} if device == "cpu" else
                                                                         {"device": device}))
    mark_ready()


def _face_of(path: str, filters: Filters, face_size: int) -> tuple[np.ndarray, dict, object]:
    """-> (rgb, facts, aligned) or ImageRejected."""
    return face_of_image(load_image(path, max_pixels=filters.max_pixels, min_size=filters.min_image_size),
                         path, filters, face_size)


def face_of_image(loaded: LoadedImage, path: str, filters: Filters, face_size: int, faces: list | None = None
                  ) -> tuple[np.ndarray, dict, object]:
    """A decoded photo (named `path` in messages) -> (rgb, facts, aligned) or ImageRejected:
    detect (unless the faces are given: batched detection), pick the face, filter, align."""
    if faces is None:
        faces = _DETECTOR.detect(loaded.rgb)
    face, count = pick_face(faces, filters.multiple_faces, where=path)
    if face.score < filters.min_score:
        raise ImageRejected("low_score", f"{path}: detection score {face.score:.3f} < {filters.min_score}")
    if face.size < filters.min_face_size:
        raise ImageRejected("face_too_small", f"{path}: face {face.size:.0f} px < {filters.min_face_size} px")
    aligned = crop_face(loaded.rgb, face, face_size)
    pose = aligned.pose
    if abs(pose["yaw"]) > filters.max_yaw or abs(pose["pitch"]) > filters.max_pitch:
        raise ImageRejected("extreme_pose", f"{path}: yaw {pose['yaw']:+.2f}, pitch {pose['pitch']:+.2f} "
                                            f"(limits {filters.max_yaw}, {filters.max_pitch})")
    sharp = sharpness(aligned.crop)
    if sharp < filters.min_sharpness:
        raise ImageRejected("blurry", f"{path}: face sharpness {sharp:.1f} < {filters.min_sharpness}")
    facts = {"sha256": loaded.sha256, "original_size": list(loaded.original_size), "num_faces": count,
             "score": round(face.score, 4), "box": [round(float(v), 1) for v in face.box],
             "landmarks": [[round(float(x), 2), round(float(y), 2)] for x, y in face.landmarks],
             "pose": {k: round(v, 3) for k, v in pose.items()}, "sharpness": round(sharp, 1)}
    return loaded.rgb, facts, aligned


def _clip_of(path: str, filters: Filters, face_size: int, work: str, key: str, max_image_side: int
             ) -> tuple[np.ndarray, dict, object]:
    """A short video -> its first sampled frame's (rgb, facts, aligned), the clip written as
    <key>.video.jpg (its clip_frames frames, evenly spaced over the video, stacked top to
    bottom), or ImageRejected: unreadable, too short, too small, or no usable face on the
    first frame."""
    import hashlib

    from faceclip_zoo.data.video import read_frames
    from faceclip_zoo.utils import UserError

    try:
        frames, fps = read_frames(path)
    except UserError as exc:
        raise ImageRejected("unreadable_video", str(exc)) from None
    if len(frames) < filters.clip_frames:
        raise ImageRejected("too_short", f"{path}: {len(frames)} frames; clips of {filters.clip_frames} are asked for "
                                         "(filters.clip_frames)")
    w, h = frames[0].size
    if min(w, h) < filters.min_image_size:
        raise ImageRejected("image_too_small", f"{path}: frames of {w}x{h} < {filters.min_image_size} px")
    picked = np.linspace(0, len(frames) - 1, filters.clip_frames).round().astype(int)
    clip = [np.asarray(frames[i].convert("RGB")) for i in picked]
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    rgb, facts, aligned = face_of_image(LoadedImage(clip[0], (h, w), digest), f"{path} (first frame)", filters,
                                        face_size)
    atomic_write_bytes(os.path.join(work, f"{key}.video.jpg"),
                       encode_image_bytes(np.concatenate([_fit(c, max_image_side) for c in clip]), "jpg"))
    facts.update(frames=filters.clip_frames, source_frames=len(frames), fps=round(fps, 3),
                 frame_indices=picked.tolist())
    return rgb, facts, aligned


def _fit(rgb: np.ndarray, max_side: int) -> np.ndarray:
    """A frame downscaled to max_side (longer side), as encode_image_bytes does photos."""
    img = Image.fromarray(rgb)
    if max(img.size) > max_side:
        s = max_side / max(img.size)
        img = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.LANCZOS)
    return np.asarray(img)


def encode_image_bytes(arr: np.ndarray, fmt: str, max_side: int | None = None) -> bytes:
    img = Image.fromarray(arr)
    if max_side and max(img.size) > max_side:
        s = max_side / max(img.size)
        img = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="PNG" if fmt == "png" else "JPEG", **({} if fmt == "png" else {"quality": 95}))
    return buf.getvalue()


def _file_stamp(path: str | None) -> list | None:
    try:
        st = os.stat(path)
        return [st.st_size, st.st_mtime_ns]
    except (OSError, TypeError):
        return None


def process_record(record: Record, work: str, filters: Filters, face_size: int, max_image_side: int) -> dict:
    """Phase 1 for one input; writes <work>/<key>.json last (its presence = done)."""
    key = record.key
    result = {"key": key, "source": record.source, "kind": record.kind,
              "stamp": [_file_stamp(record.image), _file_stamp(record.reference)]}
    try:
        if record.error:
            raise ImageRejected(*record.error)
        if record.image is None or not os.path.isfile(record.image):
            if record.image is not None and os.path.islink(record.image):  # a dangling link or a link loop
                raise ImageRejected("unreadable_file", f"{record.image}: a link to nothing readable "
                                                  f"({os.readlink(record.image)})")
            raise ImageRejected("missing_file", f"{record.image}: no such file")
        if record.image.lower().endswith(VIDEO_EXTS):
            rgb, facts, aligned = _clip_of(record.image, filters, face_size, work, key, max_image_side)
        else:
            rgb, facts, aligned = _face_of(record.image, filters, face_size)
        atomic_write_bytes(os.path.join(work, f"{key}.face.png"), encode_image_bytes(aligned.crop, "png"))
        if record.kind == "sample":
            atomic_write_bytes(os.path.join(work, f"{key}.image.jpg"), encode_image_bytes(rgb, "jpg", max_image_side))
        if record.reference:
            try:
                _, ref_facts, ref_aligned = _face_of(record.reference, filters, face_size)
            except ImageRejected as exc:
                raise ImageRejected("bad_reference", f"reference photo: {exc}") from None
            atomic_write_bytes(os.path.join(work, f"{key}.ref.png"), encode_image_bytes(ref_aligned.crop, "png"))
            facts["reference_sha256"] = ref_facts["sha256"]
        result.update(status="accepted", caption=record.caption, identity=record.identity, **facts)
    except ImageRejected as exc:
        result.update(status="rejected", reason=exc.reason, detail=exc.detail)
    except Exception as exc:  # a library failing on a strange file must not end the run
        result.update(status="rejected", reason="processing_error", detail=f"{record.source}: "
                      f"{type(exc).__name__}: {exc}")
    atomic_write_bytes(os.path.join(work, f"{key}.json"), json.dumps(result).encode("utf-8"))
    return result


def pending(records: list[Record], work: str) -> list[Record]:
    """The records whose work item is missing or stale (its input file changed since)."""
    todo = []
    for r in records:
        path = os.path.join(work, f"{r.key}.json")
        try:
            with open(path, "rb") as f:
                done = json.load(f)
            if done.get("stamp") == [_file_stamp(r.image), _file_stamp(r.reference)]:
                continue
        except (OSError, ValueError):
            pass
        todo.append(r)
    return todo
