"""ONNX vision export: dynamic batch, validated against torch at untraced batch sizes."""
import numpy as np
import onnxruntime as ort
import pytest
import torch

from edge_vlm.errors import ExportValidationError
from edge_vlm.export.vision_onnx import VisionOnnxExporter
from edge_vlm.families import load_source


@pytest.fixture(scope="module")
def vision(tiny_source):
    return load_source(str(tiny_source)).vision


def test_onnx_matches_torch_at_other_batch_sizes(vision, tmp_path):
    x = VisionOnnxExporter()
    path = tmp_path / "v.onnx"
    x.export(vision, 64, path)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for b in (1, 3, 5):  # traced with 2
        px = np.random.default_rng(b).standard_normal((b, 3, 64, 64)).astype(np.float32)
        (got,) = sess.run(None, {x.input_name: px})
        with torch.no_grad():
            want = vision(torch.from_numpy(px)).numpy()
        assert got.shape == want.shape == (b, 2, 64)
        np.testing.assert_allclose(got, want, atol=x.atol, rtol=x.rtol)


def test_validation_catches_a_model_that_differs(vision, tmp_path):
    import copy

    x = VisionOnnxExporter()
    path = tmp_path / "v.onnx"
    x.export(vision, 64, path)
    changed = copy.deepcopy(vision)
    with torch.no_grad():
        changed.proj.bias += 0.01
    with pytest.raises(ExportValidationError) as e:
        x.validate(changed, path, 64)
    assert "batch1" in str(e.value) and "batch3" in str(e.value)
