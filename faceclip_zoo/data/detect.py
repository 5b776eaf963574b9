"""Face detectors with 5 landmarks, chosen by name.

    build_detector("mtcnn")                       # offline: facenet-pytorch ships its weights
    build_detector("insightface", model_dir=...)  # SCRFD from a local model pack folder
    build_detector("auto", model_dir=...)         # insightface when the pack is there, else mtcnn

Landmark order everywhere (insightface's): left eye, right eye (as seen in the image),
nose tip, left mouth corner, right mouth corner; pixel (x, y) of the RGB input.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from faceclip_zoo.utils import UserError


@dataclass
class Face:
    box: np.ndarray  # [4] x1, y1, x2, y2
    score: float
    landmarks: np.ndarray  # [5, 2]
    extra: dict = field(default_factory=dict)

    @property
    def size(self) -> float:
        """Shorter side of the box, in pixels."""
        return float(min(self.box[2] - self.box[0], self.box[3] - self.box[1]))

    @property
    def area(self) -> float:
        return float(max(self.box[2] - self.box[0], 0) * max(self.box[3] - self.box[1], 0))


class Detector(Protocol):
    name: str

    def detect(self, rgb: np.ndarray) -> list[Face]:
        """rgb: [H, W, 3] uint8 -> faces, highest score first."""
        ...

    def detect_batch(self, rgbs: list[np.ndarray]) -> list[list[Face]]:
        """Several photos in one call (what an accelerator wants): detect's answer for each."""
        ...

    def describe(self) -> dict:
        """What produced the landmarks (name, package versions, settings): goes into manifests."""
        ...


def package_version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def _box_iou(a: np.ndarray, b: np.ndarray) -> float:
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(x2 - x1, 0) * max(y2 - y1, 0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def _unflip(face: Face, width: int) -> Face:
    """A face found in the mirrored image, in the original image's coordinates."""
    box = face.box.copy()
    box[0], box[2] = width - face.box[2], width - face.box[0]
    lm = face.landmarks.copy()
    lm[:, 0] = width - lm[:, 0]
    return Face(box, face.score, lm[[1, 0, 2, 4, 3]])  # left and right swap in a mirror


class MTCNNDetector:
    """facenet-pytorch's MTCNN (P/R/O-Net cascade; weights ship inside the wheel, so it
    works offline). Install: pip install --no-deps facenet-pytorch (its metadata pins an
    old torch; the code runs on current torch).

    Two measured fixes (tests/test_align.py, faceclip_zoo/bench/align_accuracy.py): the image is
    padded by a quarter of its size first (MTCNN's landmarks drift by up to 60 px on 448
    px faces that touch the border), and landmarks are averaged with those found in the
    mirrored image (halves the disagreement between re-alignments of the same face)."""

    name = "mtcnn"

    def __init__(self, min_face_size: int = 20, thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7),
                 pad: float = 0.25, flip_average: bool = True, device: str = "cpu"):
        try:
            from facenet_pytorch import MTCNN
        except ImportError:
            raise UserError("the mtcnn detector needs facenet-pytorch: "
                            "pip install --no-deps facenet-pytorch==2.6.0") from None
        self.settings = {"min_face_size": min_face_size, "thresholds": list(thresholds), "pad": pad,
                         "flip_average": flip_average}
        self.model = MTCNN(keep_all=True, min_face_size=min_face_size, thresholds=list(thresholds),
                           device=device)

    def _detect_many(self, rgbs: list[np.ndarray]) -> list[list[Face]]:
        """One cascade pass over photos of one size (facenet-pytorch batches equal sizes)."""
        import torch

        p = int(round(max(rgbs[0].shape[:2]) * self.settings["pad"]))
        padded = [np.pad(x, ((p, p), (p, p), (0, 0))) if p else np.ascontiguousarray(x) for x in rgbs]
        with torch.inference_mode():
            if len(padded) == 1:  # one image: facenet-pytorch answers without the batch level
                boxes, probs, points = ([v] for v in self.model.detect(padded[0], landmarks=True))
            else:
                boxes, probs, points = self.model.detect(np.stack(padded), landmarks=True)
        return [[] if b is None else [Face(np.asarray(bb, dtype=np.float32) - p, float(s),
                                           np.asarray(k, dtype=np.float32) - p) for bb, s, k in zip(b, pr, pt)]
                for b, pr, pt in zip(boxes, probs, points)]

    def _detect_once(self, rgb: np.ndarray) -> list[Face]:
        return self._detect_many([rgb])[0]

    def _average_with_mirror(self, faces: list[Face], mirrored: list[Face]) -> list[Face]:
        for f in faces:
            match = max(mirrored, key=lambda m: _box_iou(f.box, m.box), default=None)
            if match is not None and _box_iou(f.box, match.box) > 0.5:
                f.box = (f.box + match.box) / 2
                f.landmarks = (f.landmarks + match.landmarks) / 2
        return sorted(faces, key=lambda f: -f.score)

    def detect(self, rgb: np.ndarray) -> list[Face]:
        faces = self._detect_once(rgb)
        if faces and self.settings["flip_average"]:
            w = rgb.shape[1]
            mirrored = [_unflip(f, w) for f in self._detect_once(np.ascontiguousarray(rgb[:, ::-1]))]
            return self._average_with_mirror(faces, mirrored)
        return sorted(faces, key=lambda f: -f.score)

    def detect_batch(self, rgbs: list[np.ndarray]) -> list[list[Face]]:
        """Photos of equal size share each cascade pass (and their mirrored copies another);
        the rest go one by one. Equal to `detect` up to float rounding of batched kernels."""
        out: list[list[Face]] = [[] for _ in rgbs]
        groups: dict[tuple, list[int]] = {}
        for i, x in enumerate(rgbs):
            groups.setdefault(x.shape, []).append(i)
        for shape, idx in groups.items():
            found = self._detect_many([rgbs[i] for i in idx])
            need = [j for j, faces in enumerate(found) if faces] if self.settings["flip_average"] else []
            mirrored = self._detect_many([np.ascontiguousarray(rgbs[idx[j]][:, ::-1]) for j in need]) if need else []
            for j, faces in enumerate(found):
                out[idx[j]] = sorted(faces, key=lambda f: -f.score)
            for j, m in zip(need, mirrored):
                out[idx[j]] = self._average_with_mirror(found[j], [_unflip(f, shape[1]) for f in m])
        return out

    def describe(self) -> dict:
        return {"name": self.name, "package": f"facenet-pytorch {package_version('facenet-pytorch')}", **self.settings}


class InsightFaceDetector:
    """insightface FaceAnalysis detection (SCRFD) from a local model pack folder, e.g. a
    copy of ~/.insightface/models/buffalo_l (det_10g.onnx). Nothing is downloaded."""

    name = "insightface"

    def __init__(self, model_dir: str, det_size: int = 640, det_thresh: float = 0.5, providers=None,
                 device: str = "cpu"):
        if not model_dir or not os.path.isdir(model_dir):
            raise UserError(f"insightface model pack folder not found: {model_dir!r}; pass the folder "
                            "holding the detection .onnx (e.g. buffalo_l/det_10g.onnx) as model_dir, "
                            "or use detector: mtcnn")
        from insightface.app import FaceAnalysis

        if providers is None and device.startswith("cuda"):  # onnxruntime-gpu's CUDA provider, CPU as fallback
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        kwargs = {"providers": providers} if providers else {}
        try:
            self.app = FaceAnalysis(name=os.path.abspath(model_dir), allowed_modules=["detection"], **kwargs)
        except AssertionError:
            raise UserError(f"{model_dir}: no face detection model (.onnx) found in this folder") from None
        gpu = int(device.split(":")[1]) if device.startswith("cuda:") else 0
        self.app.prepare(ctx_id=-1 if not providers or "CUDA" not in str(providers) else gpu,
                         det_thresh=det_thresh, det_size=(det_size, det_size))
        self.settings = {"model_dir": os.path.abspath(model_dir), "det_size": det_size, "det_thresh": det_thresh}

    def detect(self, rgb: np.ndarray) -> list[Face]:
        bgr = np.ascontiguousarray(rgb[..., ::-1])  # insightface models take OpenCV's BGR order
        faces = [Face(np.asarray(f.bbox, dtype=np.float32), float(f.det_score),
                      np.asarray(f.kps, dtype=np.float32)) for f in self.app.get(bgr)]
        return sorted(faces, key=lambda f: -f.score)

    def detect_batch(self, rgbs: list[np.ndarray]) -> list[list[Face]]:
        # insightface's FaceAnalysis runs one image per ONNX call; its session uses the
        # accelerator (onnxruntime-gpu) for each
        return [self.detect(x) for x in rgbs]

    def describe(self) -> dict:
        return {"name": self.name, "package": f"insightface {package_version('insightface')}", **self.settings}


def _has_insightface_pack(model_dir: str | None) -> bool:
    return bool(model_dir) and os.path.isdir(model_dir) and any(
        n.endswith(".onnx") for n in os.listdir(model_dir))


def build_detector(name: str = "auto", model_dir: str | None = None, **kwargs) -> Detector:
    """name: mtcnn | insightface (alias scrfd) | auto (insightface when model_dir holds a
    model pack, else mtcnn)."""
    if name == "auto":
        name = "insightface" if _has_insightface_pack(model_dir) else "mtcnn"
    if name in ("insightface", "scrfd"):
        return InsightFaceDetector(model_dir, **kwargs)
    if name == "mtcnn":
        return MTCNNDetector(**kwargs)
    raise UserError(f"unknown face detector {name!r}; choose mtcnn, insightface or auto")
