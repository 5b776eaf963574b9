"""Reading photos from the wild: every way a file can be bad ends in an ImageRejected with
a short reason code (for the rejects file) and a detail naming what was found.

Handled: zero-byte files, non-images with an image extension, corrupt and truncated
JPEG/PNG, decompression bombs (refused from the declared size, before any pixel is
decoded), EXIF orientation (applied, so faces come out upright), CMYK, 16-bit and float
images (scaled to 8 bit, not clipped), grayscale, palette and alpha (composited on white).
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# A truncated file is a reject, never a half-grey image.
ImageFile.LOAD_TRUNCATED_IMAGES = False

# Decoded, a photo costs several copies of itself (RGB, conversions, the detector's
# pyramid): a 7900 x 7900 PNG of 198 KB took 8 GB. 50 MP admits a 48 MP phone photo
# (8000 x 6000); larger ones are refused from their header unless the limit is raised.
DEFAULT_MAX_PIXELS = 50_000_000


class ImageRejected(Exception):
    """An input that cannot be used. `reason` is a stable code, `detail` says why."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class LoadedImage:
    rgb: np.ndarray  # [H, W, 3] uint8, upright
    original_size: tuple[int, int]  # (height, width) after EXIF rotation
    sha256: str  # of the file's bytes


def _to_8bit_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # PIL's convert("L") clips these to 0..255 instead of scaling them.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        if mode == "F":
            top = max(float(arr.max()), 1e-8) if arr.max() > 1.0 else 1.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")  # RGB, L, 1, CMYK, YCbCr, LAB, HSV


# The first bytes of the formats photo collections hold (JPEG, PNG, GIF, WebP, BMP, TIFF).
_IMAGE_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


def _has_image_signature(head: bytes) -> bool:
    """Whether a file starts like an image, so that a failure to open it means damage
    (corrupt_image) rather than another kind of file (not_an_image), whatever PIL version
    decides which of its errors to raise."""
    return head.startswith(_IMAGE_SIGNATURES) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def load_image(path: str, max_pixels: int = DEFAULT_MAX_PIXELS, min_size: int = 1) -> LoadedImage:
    """Read `path` as an upright 8-bit RGB array, or raise ImageRejected."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ImageRejected("unreadable_file", f"{path}: {exc.strerror or exc}") from None
    return decode_image(data, path, max_pixels, min_size)


def decode_image(data: bytes, where: str, max_pixels: int = DEFAULT_MAX_PIXELS, min_size: int = 1) -> LoadedImage:
    """The bytes of an image file (named `where` in messages: a path, or a tar member) as an
    upright 8-bit RGB array, or raise ImageRejected."""
    if not data:
        raise ImageRejected("empty_file", f"{where}: zero bytes")
    digest = hashlib.sha256(data).hexdigest()
    with warnings.catch_warnings():
        # PIL warns between MAX_IMAGE_PIXELS and 2x; we check the declared size ourselves.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            raise ImageRejected("too_many_pixels", f"{where}: {exc} Refused from its header; not decoded.") from None
        except UnidentifiedImageError:
            if _has_image_signature(data[:12]):  # an image whose header PIL cannot parse: damaged
                raise ImageRejected("corrupt_image", f"{where}: starts like an image file but its header "
                                                     "cannot be read") from None
            raise ImageRejected("not_an_image", f"{where}: not a readable image file "
                                                "(the extension says image, the bytes do not)") from None
        except OSError as exc:
            raise ImageRejected("corrupt_image", f"{where}: {exc}") from None
        with img:
            w, h = img.size
            if w * h > max_pixels:
                raise ImageRejected("too_many_pixels", f"{where}: declares {w}x{h} = {w * h} pixels "
                                                       f"(limit {max_pixels}); not decoded")
            try:
                img.load()
                img = ImageOps.exif_transpose(img)
                rgb = _to_8bit_rgb(img)
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
                raise ImageRejected("corrupt_image", f"{where}: cannot decode ({type(exc).__name__}: {exc})") from None
    arr = np.asarray(rgb, dtype=np.uint8)
    if min(arr.shape[:2]) < min_size:
        raise ImageRejected("image_too_small", f"{where}: {arr.shape[1]}x{arr.shape[0]} pixels, "
                                               f"shorter side below {min_size}")
    return LoadedImage(rgb=arr, original_size=(arr.shape[0], arr.shape[1]), sha256=digest)


def open_photo(path: str | os.PathLike, what: str = "photo", max_pixels: int = DEFAULT_MAX_PIXELS,
               min_size: int = 16) -> Image.Image:
    """A photo a command was given (generate's --face, the demo's uploads) as an upright
    8-bit RGB PIL image, decoded exactly as `prepare` decodes photos; a bad file is a
    UserError naming it."""
    from faceclip_zoo.utils import UserError

    if not os.path.exists(path):
        raise UserError(f"{what} {path} does not exist")
    try:
        return Image.fromarray(load_image(str(path), max_pixels=max_pixels, min_size=min_size).rgb)
    except ImageRejected as exc:
        hint = " (raise --max_pixels to read it)" if exc.reason == "too_many_pixels" else ""
        raise UserError(f"{what} {exc.detail}{hint}") from None


def as_rgb_array(image) -> np.ndarray:
    """A path, PIL image or array (HWC uint8 RGB, or float in [0, 1]) -> [H, W, 3] uint8."""
    if isinstance(image, (str, os.PathLike)):
        return load_image(str(image)).rgb
    if isinstance(image, Image.Image):
        return np.asarray(_to_8bit_rgb(ImageOps.exif_transpose(image)), dtype=np.uint8)
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise ValueError(f"expected an image array [H, W, 3], got shape {tuple(arr.shape)}")
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
        arr = np.clip(arr.astype(np.float64) * (255.0 if arr.max() <= 1.0 else 1.0) + 0.5, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr)
