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
