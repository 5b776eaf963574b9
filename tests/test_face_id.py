"""Pluggable face-ID models: an insightface ArcFace ONNX file in place of the face ViT."""

import numpy as np
import pytest
import torch

from conftest import linear_arcface

from faceclip_zoo.models import OnnxArcFace
from faceclip_zoo.utils import UserError


def test_onnx_arcface_matches_insightface_preprocessing(tmp_path):
    w = linear_arcface(tmp_path / "r.onnx")
    model = OnnxArcFace(str(tmp_path / "r.onnx"))
    assert model.dim == 8
    images = torch.rand(2, 3, 112, 112)
    feats = model(images)
    # insightface's ArcFace convention: RGB uint8, (x - 127.5) / 127.5
    rgb = (images * 255).round().numpy()
    expected = ((rgb - 127.5) / 127.5).reshape(2, -1) @ w
    np.testing.assert_allclose(feats.numpy(), expected, rtol=1e-4, atol=1e-4)


def test_missing_onnx_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="ArcFace ONNX model not found"):
        OnnxArcFace(str(tmp_path / "missing.onnx"))


def _astronaut_crop() -> torch.Tensor:
    from PIL import Image
    from skimage import data

    from faceclip_zoo.evaluation.models import FaceLocator

    return FaceLocator("detect", detector="mtcnn")(Image.fromarray(data.astronaut()))


def _augmented(crops: torch.Tensor, seed: int) -> torch.Tensor:
    """What another photo of the same person differs by: blur, a small turn, exposure."""
    import torchvision.transforms.functional as TF

    gen = torch.Generator().manual_seed(seed)
    out = TF.gaussian_blur(crops, kernel_size=7, sigma=1.2)
    out = TF.rotate(out, angle=float(torch.empty(()).uniform_(-6, 6, generator=gen)))
    return (out * float(torch.empty(()).uniform_(0.85, 1.15, generator=gen))).clamp(0, 1)


def test_dlib_judge_recognises_real_people_across_photos():
    """dlib's recogniser (face_sim.model: dlib) on real faces: the astronaut (skimage) and the
    aligned portraits beside the repository when present; each face's augmented copies are
    nearer to it than to any other person, and inside dlib's same-person distance."""
    from conftest import SHARED_FACES
    from PIL import Image

    from faceclip_zoo.evaluation.models import load_face_id

    judge = load_face_id("dlib")
    crops = [_astronaut_crop()]
    if SHARED_FACES.is_dir():
        crops += [torch.from_numpy(np.asarray(Image.open(p).convert("RGB").resize((112, 112)), dtype=np.float32)
                                   / 255).permute(2, 0, 1) for p in sorted(SHARED_FACES.glob("*.png"))]
    crops = torch.stack(crops)
    base = judge(crops)
    assert base.shape == (len(crops), 128) and torch.allclose(base.norm(dim=-1), torch.ones(len(crops)))
    for seed in range(2):
        dist = torch.cdist(judge(_augmented(crops, seed)), base)
        assert (dist.diagonal() < 0.6).all(), dist
        assert (dist.argmin(1) == torch.arange(len(crops))).all(), dist
        if len(crops) > 1:
            others = dist + torch.eye(len(crops)) * 10
            assert others.min() > dist.diagonal().max(), dist


def test_dlib_judge_without_its_models_is_one_clear_error(tmp_path):
    from faceclip_zoo.evaluation.models import load_face_id

    with pytest.raises(UserError, match="dlib landmark model not found"):
        load_face_id(f"dlib:{tmp_path}")
