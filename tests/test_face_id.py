"""Pluggable face-ID models: an insightface ArcFace ONNX file in place of the face ViT."""

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from faceclip_zoo.models import OnnxArcFace
from faceclip_zoo.utils import UserError


def _linear_arcface(path, dim=8, seed=0):
    """A stand-in recognition net with ArcFace's interface: [N,3,112,112] -> [N,dim]."""
    w = np.random.default_rng(seed).normal(size=(3 * 112 * 112, dim)).astype(np.float32) / 100
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["data"], ["flat"], axis=1),
         helper.make_node("MatMul", ["flat", "W"], ["fc1"])],
        "arcface_stub",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 3, 112, 112])],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, ["N", dim])],
        [numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return w


def test_onnx_arcface_matches_insightface_preprocessing(tmp_path):
    w = _linear_arcface(tmp_path / "r.onnx")
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
