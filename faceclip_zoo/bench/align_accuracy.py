"""How well does our detector + norm_crop reproduce the release's face alignment?

    python -m faceclip_zoo bench --only align --align_faces <folder of the release's aligned crops>

For each photo (skimage's astronaut, unaligned; the release's own aligned 448 crops):
- vs release: on an already aligned crop, how far our alignment would move the template
  points (0 = we align it exactly as the release did). Not defined for unaligned photos.
- re-align: align the photo, detect again on our crop, and measure the same: the
  consistency of our alignment (does our crop put the landmarks on the template?).
- fit residual: distance of the detected landmarks, mapped into our crop, from the
  template points (face shape the similarity transform cannot absorb: smiles, pose).
Pixels of a 448 crop; mean / max over the 5 landmarks.
"""

from __future__ import annotations

import glob
import os
import time

import numpy as np


def run(faces: str | None = None, detector: str = "mtcnn", model_dir: str | None = None) -> None:
    """Print the table for skimage's astronaut and, when `faces` names a folder of the
    release's aligned 448 crops (*.png), for each of them."""
    from PIL import Image
    from skimage import data

    from faceclip_zoo.data.align import align_face, arcface_template, crop_face, pick_face, template_deviation
    from faceclip_zoo.data.detect import build_detector

    detector = build_detector(detector, model_dir=model_dir)
    photos = {"astronaut (unaligned)": (data.astronaut(), False)}
    for path in sorted(glob.glob(os.path.join(faces, "*.png"))) if faces else []:
        photos[os.path.basename(path)] = (np.asarray(Image.open(path).convert("RGB")), True)
    template = arcface_template(448)
    print(f"detector: {detector.describe()}")
    print("| photo | vs release mean/max | re-align mean/max | fit residual mean/max | detect+align s |")
    print("|---|---|---|---|---|")
    for name, (rgb, aligned) in photos.items():
        t0 = time.perf_counter()
        face, _ = pick_face(detector.detect(rgb))
        ours = crop_face(rgb, face)
        seconds = time.perf_counter() - t0
        vs = template_deviation(face.landmarks) if aligned else None
        again = template_deviation(align_face(ours.crop, detector).source_landmarks)
        resid = np.linalg.norm(ours.landmarks - template, axis=1)
        fmt = lambda d: "-" if d is None else f"{d.mean():.1f} / {d.max():.1f}"  # noqa: E731
        print(f"| {name} | {fmt(vs)} | {fmt(again)} | {fmt(resid)} | {seconds:.2f} |")

