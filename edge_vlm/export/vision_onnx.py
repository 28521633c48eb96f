"""Vision encoder + connector -> one ONNX file with a dynamic batch, validated against torch.

Validation runs at batch sizes *other* than the traced one (a batch that silently became
static fails here), on seeded random pixels and on a real image.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_vlm.errors import ExportValidationError


@dataclass(frozen=True)
class VisionOnnxExporter:
    input_name: str = "pixel_values"
    output_name: str = "image_embeds"
    trace_batch: int = 2  # never 1: a batch-1 example makes the batch dimension static under dynamo
    validate_batches: tuple = (1, 3)
    atol: float = 1e-4  # fp32 ONNX Runtime vs fp32 torch, after LayerNorm/BatchNorm and matmuls
    rtol: float = 1e-3
    opset: int = 18

    def export(self, module, image_size: int, path: Path) -> None:
        import torch

        module = module.eval()
        example = torch.randn(self.trace_batch, 3, image_size, image_size)
        batch = torch.export.Dim("batch", min=1, max=1024)
        torch.onnx.export(module, (example,), str(path), input_names=[self.input_name],
                          output_names=[self.output_name], dynamo=True, external_data=False,
                          dynamic_shapes=({0: batch},), opset_version=self.opset,
                          verbose=False, report=False)
        self._check_dynamic_batch(path)

    def _check_dynamic_batch(self, path: Path) -> None:
        import onnx

        m = onnx.load(str(path), load_external_data=False)
        dim = m.graph.input[0].type.tensor_type.shape.dim[0]
        if dim.HasField("dim_value"):
            raise ExportValidationError("vision ONNX", {"batch_dim_static": float(dim.dim_value)},
                                        "a dynamic batch dimension")

    def validate(self, module, path: Path, image_size: int, real_pixels: np.ndarray | None = None) -> dict:
        """Compare ONNX Runtime with torch; return the max |diff| per case, raise if over tolerance."""
        import onnxruntime as ort
        import torch

        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(1234)
        cases = {f"batch{b}": rng.standard_normal((b, 3, image_size, image_size)).astype(np.float32)
                 for b in self.validate_batches}
        if real_pixels is not None:
            cases["real_image"] = real_pixels.astype(np.float32)
        diffs, bad = {}, {}
        for name, x in cases.items():
            (got,) = sess.run([self.output_name], {self.input_name: x})
            with torch.no_grad():
                want = module(torch.from_numpy(x)).numpy()
            if got.shape != want.shape:
                raise ExportValidationError("vision ONNX", {f"{name}_shape": float("nan")},
                                            f"shape {want.shape} (got {got.shape})")
            d = float(np.max(np.abs(got - want)))
            diffs[name] = d
            if not np.allclose(got, want, atol=self.atol, rtol=self.rtol):
                bad[name] = d
        if bad:
            raise ExportValidationError("vision ONNX", diffs, f"atol={self.atol}, rtol={self.rtol}")
        return {"max_abs_diff": diffs, "atol": self.atol, "rtol": self.rtol,
                "traced_batch": self.trace_batch}
