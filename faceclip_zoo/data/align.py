"""Align a face the way the release's training data was aligned: a 5-point similarity
transform onto the ArcFace template scaled to the crop size (insightface
face_align.norm_crop; 448 for FaceCLIP references, 112 for face-ID models; the template
only scales, so a 112 crop equals the 448 crop resized).

    from faceclip_zoo.data import align_face
    aligned = align_face("selfie.jpg")          # MTCNN unless a detector is given
    aligned.crop                                 # [448, 448, 3] uint8 RGB
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np

from faceclip_zoo.data.detect import Detector, Face, build_detector
from faceclip_zoo.data.images import ImageRejected, as_rgb_array


def arcface_template(size: int = 448) -> np.ndarray:
    """The 5 landmark positions [5, 2] of an aligned crop of `size` pixels."""
    from insightface.utils.face_align import arcface_dst

    if size % 112:
        raise ValueError(f"aligned crop size must be a multiple of 112, got {size}")
    return arcface_dst * (size / 112.0)


def alignment_matrix(landmarks: np.ndarray, size: int = 448) -> np.ndarray:
    """[2, 3] similarity transform taking image landmarks onto the template."""
    from insightface.utils.face_align import estimate_norm

    with warnings.catch_warnings():  # scikit-image 0.26 deprecates the call insightface makes
        warnings.simplefilter("ignore", FutureWarning)
        return estimate_norm(np.asarray(landmarks, dtype=np.float32), image_size=size)


def transform_points(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    pts = np.asarray(points, dtype=np.float64)
    return pts @ matrix[:, :2].T + matrix[:, 2]


def pose_of(aligned_landmarks: np.ndarray) -> dict[str, float]:
    """Head pose proxies from the 5 landmarks in the aligned (roll-free) frame; 0 = frontal.
    yaw: nose offset from the eyes' midline over half the eye distance (about +-1 at
    profile); pitch: nose height between the eye and mouth lines, minus the template's.
    Written here because no installed library gives pose from 5 points."""
    p = np.asarray(aligned_landmarks, dtype=np.float64)
    eye_mid, mouth_mid = (p[0] + p[1]) / 2, (p[3] + p[4]) / 2
    half_eye = max(np.linalg.norm(p[1] - p[0]) / 2, 1e-6)
    yaw = (p[2, 0] - (eye_mid[0] + mouth_mid[0]) / 2) / half_eye
    t = arcface_template(112)
    ref = (t[2, 1] - (t[0, 1] + t[1, 1]) / 2) / ((t[3, 1] + t[4, 1]) / 2 - (t[0, 1] + t[1, 1]) / 2)
    span = max(mouth_mid[1] - eye_mid[1], 1e-6)
    pitch = (p[2, 1] - eye_mid[1]) / span - ref
    return {"yaw": float(yaw), "pitch": float(pitch)}


def sharpness(crop: np.ndarray) -> float:
    """Variance of the Laplacian of the grey 112 px aligned face (low = blurred)."""
    import cv2

    grey = cv2.cvtColor(np.ascontiguousarray(crop), cv2.COLOR_RGB2GRAY)
    if grey.shape[0] != 112:
        grey = cv2.resize(grey, (112, 112), interpolation=cv2.INTER_AREA)
    return float(cv2.Laplacian(grey, cv2.CV_64F).var())


@dataclass
class AlignedFace:
    crop: np.ndarray  # [size, size, 3] uint8 RGB
    landmarks: np.ndarray  # [5, 2] in the crop
    source_landmarks: np.ndarray  # [5, 2] in the input image
    box: np.ndarray  # [4] in the input image
    score: float
    num_faces: int

    @property
    def pose(self) -> dict[str, float]:
        return pose_of(self.landmarks)


def pick_face(faces: list[Face], multiple: Literal["largest", "reject"] = "largest",
              where: str = "image") -> tuple[Face, int]:
    if not faces:
        raise ImageRejected("no_face", f"{where}: no face detected")
    if len(faces) > 1 and multiple == "reject":
        raise ImageRejected("several_faces", f"{where}: {len(faces)} faces detected (policy: reject)")
    return max(faces, key=lambda f: f.area), len(faces)


def crop_face(rgb: np.ndarray, face: Face, size: int = 448) -> AlignedFace:
    from insightface.utils.face_align import norm_crop

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        crop = norm_crop(np.ascontiguousarray(rgb), face.landmarks, image_size=size)
    matrix = alignment_matrix(face.landmarks, size)  # the same transform, to carry the landmarks
    return AlignedFace(crop=crop, landmarks=transform_points(matrix, face.landmarks).astype(np.float32),
                       source_landmarks=face.landmarks, box=face.box, score=face.score, num_faces=1)


_DEFAULT_DETECTOR: Detector | None = None


def default_detector() -> Detector:
    """One MTCNN per process, built on first use."""
    global _DEFAULT_DETECTOR
    if _DEFAULT_DETECTOR is None:
        _DEFAULT_DETECTOR = build_detector("mtcnn")
    return _DEFAULT_DETECTOR


def align_face(image, detector: Detector | None = None, size: int = 448,
               multiple: Literal["largest", "reject"] = "largest") -> AlignedFace:
    """A photo (path, PIL image or [H, W, 3] array) -> the aligned crop of its largest face.
    Raises ImageRejected("no_face", ...) when there is none."""
    rgb = as_rgb_array(image)
    where = image if isinstance(image, str) else "image"
    face, count = pick_face((detector or default_detector()).detect(rgb), multiple, where=str(where))
    aligned = crop_face(rgb, face, size)
    aligned.num_faces = count
    return aligned


def template_deviation(landmarks: np.ndarray, size: int = 448) -> np.ndarray:
    """How far aligning an image with `landmarks` would move each template point [5], in
    pixels of a `size` crop. On an already aligned crop this is the disagreement between
    its alignment and ours; on our own aligned crop (re-detected) it is our consistency."""
    template = arcface_template(size)
    return np.linalg.norm(transform_points(alignment_matrix(landmarks, size), template) - template, axis=1)
