"""The SPSV sample schema shared by every faceclip_zoo shard (WebDataset tar files).

One sample = files sharing a key inside a tar:

    <key>.jpg | <key>.png         target image x_0 (required)
    <key>.txt                     caption, UTF-8 (required)
    <key>.ref.png | .ref.jpg      aligned reference face (absent for guided image-text pairs)
    <key>.video.png | .video.jpg  a clip (video families): its T frames stacked top to bottom,
                                  T in the json's "frames"; the target image is its first frame
    <key>.json                    {"identity": str | null, ...free metadata}
    <key>.<feature>.npy           optional cached frozen-model outputs, float16/32:
                                  arcface [D], clip_image [E], clip_text [E],
                                  face_identity [D] and face_patches [N, F] (the
                                  branch's own face ViT: normalised identity, patch
                                  tokens; only samples with a reference);
                                  for the diffusion stage vae_latents [C, h, w] (scaled),
                                  prompt_embeds [77, W], pooled_prompt_embeds [W]

Decoded, a sample is a dict: image [3, S, S] and face [3, F, F] float in [0, 1] (the
reference resized by the release's bilinear interpolation, see square_face),
has_face bool, caption str, identity str ("" if unknown), key str, original_size and
crop_top_left (SDXL micro-conditioning), a clip's video [3, T, S, S] (each frame resized
and cropped as the image), and every cached feature as a float tensor. Everything here is
plain Python/numpy/PIL so shard writers need no torch.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
REF_EXTS = tuple(f"ref.{e}" for e in IMAGE_EXTS)
VIDEO_EXTS = tuple(f"video.{e}" for e in IMAGE_EXTS)
CACHED_FEATURES = ("arcface", "clip_image", "clip_text", "face_identity", "face_patches",
                   "vae_latents", "prompt_embeds", "pooled_prompt_embeds")
# Outputs of a model looking at the reference face: present only on samples that have one.
FACE_FEATURES = ("arcface", "face_identity", "face_patches")

# Refuse decompression bombs before decoding (PIL raises DecompressionBombError above 2x).
Image.MAX_IMAGE_PIXELS = 64_000_000


class CorruptSample(ValueError):
    """A sample that cannot be decoded; the loader skips and counts it."""


def encode_image(img: Image.Image, fmt: str = "png") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG" if fmt == "png" else "JPEG", **({} if fmt == "png" else {"quality": 95}))
    return buf.getvalue()


def make_sample(
    key: str, image: Image.Image | bytes, caption: str, reference: Image.Image | bytes | None = None,
    identity: str | None = None, meta: dict | None = None,
    features: dict[str, np.ndarray] | None = None, image_format: str = "png",
    frames: list[Image.Image] | tuple[bytes, int] | None = None,
) -> dict[str, Any]:
    """Tar members of one sample. `image` / `reference` may be already encoded bytes (in
    `image_format` / PNG), which are stored as they are (no second JPEG generation).
    `frames`: a clip's frames (one size), stored as one strip in `image_format`, or a strip
    already encoded in `image_format` and its frame count."""
    count = frames[1] if isinstance(frames, tuple) else len(frames or ())
    meta = {**(meta or {}), **({"frames": count} if frames else {})}
    sample = {
        "__key__": key,
        image_format: image if isinstance(image, bytes) else encode_image(image, image_format),
        "txt": caption.encode("utf-8"),
        "json": json.dumps({"identity": identity, **meta}).encode("utf-8"),
    }
    if isinstance(frames, tuple):
        sample[f"video.{image_format}"] = frames[0]
    elif frames:
        w, h = frames[0].size
        strip = Image.new("RGB", (w, h * len(frames)))
        for i, frame in enumerate(frames):
            if frame.size != (w, h):
                raise ValueError(f"sample {key!r}: clip frames differ in size ({frame.size} vs {(w, h)})")
            strip.paste(frame.convert("RGB"), (0, i * h))
        sample[f"video.{image_format}"] = encode_image(strip, image_format)
    if reference is not None:
        sample["ref.png"] = reference if isinstance(reference, bytes) else encode_image(reference, "png")
    for name, value in (features or {}).items():
        if name not in CACHED_FEATURES:
            raise ValueError(f"unknown cached feature {name!r}; known: {CACHED_FEATURES}")
        buf = io.BytesIO()
        np.save(buf, np.asarray(value, dtype=np.float32))
        sample[f"{name}.npy"] = buf.getvalue()
    return sample


def _open_rgb(data: bytes, what: str) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
        img = ImageOps.exif_transpose(img)
        return img.convert("RGB")
    except Exception as exc:  # PIL raises many types for bad bytes
        raise CorruptSample(f"{what}: cannot decode image ({type(exc).__name__}: {exc})") from None


def resize_crop(img: Image.Image, size: int | tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
    """Resize to cover `size` (an int = square, or (height, width)), centre crop ->
    (float [3, H, W] in [0, 1], crop (top, left) in the resized image: SDXL's crop
    micro-conditioning)."""
    th, tw = (size, size) if isinstance(size, int) else size
    w, h = img.size
    top = left = 0
    if (w, h) != (tw, th):
        s = max(tw / w, th / h)
        img = img.resize((max(tw, round(w * s)), max(th, round(h * s))), Image.BICUBIC)
        w, h = img.size
        left, top = (w - tw) // 2, (h - th) // 2
        img = img.crop((left, top, left + tw, top + th))
    return pil_to_tensor(img), (top, left)


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL -> float [3, H, W] in [0, 1], nothing resized (torchvision's ToTensor)."""
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def square_face(face: torch.Tensor, size: int) -> torch.Tensor:
    """An aligned crop, float [3, H, W] in [0, 1] -> [3, size, size] by the release's own
    resize of its 448 crops (bilinear, align_corners=False, no antialiasing; the face ViT's
    `to_face_input`), so the encoder sees what the release's encoder sees. A crop that is
    not square is centre-cropped to a square first (prepared crops always are square)."""
    from faceclip_zoo.models.face_vit import to_face_input

    _, h, w = face.shape
    if h != w:
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        face = face[:, top:top + side, left:left + side]
    return to_face_input(face[None], size)[0]


def nearest_bucket(height: int, width: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The (height, width) bucket whose aspect ratio is closest (in log space) to the image's."""
    import math

    aspect = math.log(height / width)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - aspect))


def decode_sample(raw: dict[str, Any], image_size: int, face_size: int,
                  buckets: list[tuple[int, int]] | None = None) -> dict[str, Any]:
    """Raw tar members -> training sample; raises CorruptSample naming what is wrong.

    With `buckets` ((height, width) pairs) the target image goes to the bucket nearest its
    aspect ratio instead of an image_size square."""
    key = raw.get("__key__", "?")
    where = f"sample {key!r} in {raw.get('__url__', '?')}"
    image_ext = next((e for e in IMAGE_EXTS if e in raw), None)
    if image_ext is None:
        raise CorruptSample(f"{where}: no target image (.jpg/.png); members: {sorted(raw)}")
    if "txt" not in raw:
        raise CorruptSample(f"{where}: no caption (.txt)")
    try:
        caption = raw["txt"].decode("utf-8")
    except UnicodeDecodeError:
        raise CorruptSample(f"{where}: caption is not UTF-8") from None
    meta = {}
    if "json" in raw:
        try:
            meta = json.loads(raw["json"])
        except ValueError:
            raise CorruptSample(f"{where}: metadata .json is not valid JSON") from None
    target = _open_rgb(raw[image_ext], f"{where} target")
    w, h = target.size
    size = nearest_bucket(h, w, buckets) if buckets else image_size
    image, crop = resize_crop(target, size)
    landmarks = _landmarks_in_image(meta, (h, w), image.shape[-2:], crop)
    out: dict[str, Any] = {
        "key": key,
        "caption": caption,
        "identity": str(meta.get("identity") or ""),
        "image": image,
        # SDXL micro-conditioning: the source size (before any earlier resize, when the
        # shard writer recorded it) and where the crop starts.
        "original_size": tuple(meta.get("original_size") or (h, w)),
        "crop_top_left": crop,
    }
    if landmarks is not None:
        out["face_landmarks"] = landmarks
    video_ext = next((e for e in VIDEO_EXTS if e in raw), None)
    if video_ext is not None:
        out["video"] = _decode_clip(_open_rgb(raw[video_ext], f"{where} clip"), meta.get("frames"), size, where)
    ref_ext = next((e for e in REF_EXTS if e in raw), None)
    if ref_ext is not None:
        # Stored at the crop's own size (448 from `prepare`), resized here as the release
        # resizes inside its encoder: identical to handing the encoder the full crop.
        out["face"] = square_face(pil_to_tensor(_open_rgb(raw[ref_ext], f"{where} reference")), face_size)
        out["has_face"] = True
    else:
        out["face"] = torch.zeros(3, face_size, face_size)
        out["has_face"] = False
    for name in CACHED_FEATURES:
        if f"{name}.npy" in raw:
            try:
                arr = np.load(io.BytesIO(raw[f"{name}.npy"]), allow_pickle=False)
            except Exception:
                raise CorruptSample(f"{where}: cached feature {name}.npy is unreadable") from None
            out[name] = torch.from_numpy(np.asarray(arr, dtype=np.float32))
    return out


def _decode_clip(strip: Image.Image, frames, size, where: str) -> torch.Tensor:
    """A clip's strip of `frames` frames (top to bottom) -> [3, T, H, W], each frame resized
    and cropped as the target image is."""
    w, h = strip.size
    if not isinstance(frames, int) or frames < 1 or h % frames:
        raise CorruptSample(f"{where}: a clip strip of height {h} cannot hold the {frames!r} frames its .json says")
    step = h // frames
    return torch.stack([resize_crop(strip.crop((0, i * step, w, (i + 1) * step)), size)[0]
                        for i in range(frames)], dim=1)


def _landmarks_in_image(meta: dict, stored_hw: tuple[int, int], image_hw, crop: tuple[int, int]
                        ) -> torch.Tensor | None:
    """`prepare`'s 5 landmarks (pixels of the original photo, whose (h, w) is
    original_size) -> pixels of the training image [5, 2]: through the stored copy's
    resize, then resize_crop's cover-resize and centre crop. None without them."""
    marks, original = meta.get("landmarks"), meta.get("original_size")
    if not marks or not original:
        return None
    points = torch.tensor(marks, dtype=torch.float32).reshape(-1, 2)
    (oh, ow), (sh, sw), (th, tw) = original, stored_hw, tuple(image_hw)
    points = points * torch.tensor([sw / ow, sh / oh])  # stored copy (prepare's max_image_side)
    s = max(tw / sw, th / sh) if (sw, sh) != (tw, th) else 1.0
    return points * s - torch.tensor([crop[1], crop[0]], dtype=torch.float32)


def strip_face(sample: dict[str, Any]) -> dict[str, Any]:
    """Turn a tuple into a guided image-text pair: the face input is zeroed. A sample that
    had no face (a guided shard's image-text pair) keeps its cached embeddings: they were
    computed with the face zeroed, as it is now."""
    if not sample["has_face"]:
        return sample
    sample = dict(sample)
    sample["face"] = torch.zeros_like(sample["face"])
    sample["has_face"] = False
    for name in (*FACE_FEATURES, "prompt_embeds", "pooled_prompt_embeds"):  # cached with the face: stale now
        sample.pop(name, None)
    return sample
