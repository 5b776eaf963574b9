"""Distinct JPEG photos of one real face for the `prepare` benchmark: skimage's astronaut,
varied in exposure and mirrored, scaled to the requested side, each with a caption."""

from __future__ import annotations

import os

import numpy as np


def write_photos(folder: str, n: int, size: int) -> list[str]:
    from PIL import Image
    from skimage import data

    base = Image.fromarray(data.astronaut()).resize((size, size), Image.LANCZOS)
    paths = []
    for i in range(n):
        arr = np.clip(np.asarray(base).astype(np.int16) + (i * 7) % 40 - 20, 0, 255).astype(np.uint8)
        img = Image.fromarray(arr)
        img = img.transpose(Image.FLIP_LEFT_RIGHT) if i % 2 else img
        path = os.path.join(folder, f"p{i:03d}.jpg")
        img.save(path, quality=92)
        with open(path[:-4] + ".txt", "w") as f:
            f.write(f"photo {i}")
        paths.append(path)
    return paths
