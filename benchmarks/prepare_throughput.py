"""Images per second of `prepare` against its detector alone (the pipeline's overhead).

    python benchmarks/prepare_throughput.py [--images 24] [--detector mtcnn] [--size 1024]

Inputs are distinct JPEG photos of one real face (skimage's astronaut, varied in exposure
and mirrored, scaled to --size). Rows, one process each, median of --repeats:
- detector alone: decode + detect on already loaded arrays (the floor).
- prepare, per image: read + checks + detect + align + encode + atomic writes (phase 1),
  plus assembling the shards, manifest and rejects (phase 2), in one process.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np


def photos(folder: str, n: int, size: int) -> list[str]:
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


def main() -> None:
    import torch

    from faceclip_zoo.data.detect import build_detector
    from faceclip_zoo.data.images import load_image
    from faceclip_zoo.data.prepare import prepare

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=24)
    p.add_argument("--size", type=int, default=1024, help="photo side in pixels")
    p.add_argument("--detector", default="mtcnn")
    p.add_argument("--model-dir", default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (one process)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        os.makedirs(os.path.join(tmp, "in"))
        paths = photos(os.path.join(tmp, "in"), args.images, args.size)
        detector = build_detector(args.detector, model_dir=args.model_dir)
        arrays = [load_image(p).rgb for p in paths]
        detector.detect(arrays[0])  # warm-up
        alone, full = [], []
        for r in range(args.repeats):
            t = time.perf_counter()
            for a in arrays:
                detector.detect(a)
            alone.append(args.images / (time.perf_counter() - t))
            t = time.perf_counter()
            manifest = prepare(os.path.join(tmp, "in"), os.path.join(tmp, f"out{r}"), detector=args.detector,
                               detector_model_dir=args.model_dir, workers=1, progress=False)
            full.append(args.images / (time.perf_counter() - t))
            assert manifest["counts"]["accepted"] == args.images, manifest["counts"]
    a, f = statistics.median(alone), statistics.median(full)
    print(f"{args.images} photos of {args.size}x{args.size}, detector {args.detector}, "
          f"{args.threads} torch thread(s), median of {args.repeats}")
    print(f"| {'stage':<44} | {'images/s':>8} | {'ms/image':>8} |")
    print(f"|{'-' * 46}|{'-' * 10}|{'-' * 10}|")
    print(f"| {'detector alone (decoded arrays)':<44} | {a:8.2f} | {1000 / a:8.0f} |")
    print(f"| {'prepare: read+detect+align+write+assemble':<44} | {f:8.2f} | {1000 / f:8.0f} |")
    print(f"| {'overhead of the pipeline (1 - prepare/alone)':<44} | {1 - f / a:8.1%} | {1000 / f - 1000 / a:8.0f} |")


if __name__ == "__main__":
    main()
