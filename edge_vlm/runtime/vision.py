"""The vision side of a bundle: an ONNX model run by onnxruntime."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_vlm.errors import BundleError, MissingPackage
from edge_vlm.manifest import Preprocess, VisionSpec
from edge_vlm.preprocess import preprocess


class VisionModel:
    def __init__(self, path: Path, spec: VisionSpec, pre: Preprocess, providers: list[str], threads: int = 0):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise MissingPackage("onnxruntime", "pip install 'edge-vlm[cpu]' (or [gpu])") from e
        if hasattr(ort, "disable_telemetry_events"):
            ort.disable_telemetry_events()
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        so.log_severity_level = 3
        from edge_vlm.runtime.device import ort_providers

        try:
            self.session = ort.InferenceSession(str(path), so, providers=ort_providers(providers))
        except Exception as e:  # onnxruntime raises its own untyped errors for bad files
            raise BundleError(f"onnxruntime cannot load {path} ({e}): the file is damaged, export again") from e
        self.spec, self.pre = spec, pre
        self.providers = self.session.get_providers()

    def pixels(self, image) -> np.ndarray:
        p = self.pre
        return preprocess(image, p.image_size, p.mean, p.std, p.resize)

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """[B,3,S,S] -> [B, n_image_tokens, n_embd], checked against the manifest."""
        try:
            (out,) = self.session.run([self.spec.output_name], {self.spec.input_name: pixels})
        except Exception as e:  # onnxruntime's errors are untyped
            raise BundleError(f"the vision model rejected its input {tuple(pixels.shape)} ({str(e)[:200]}): "
                              "the manifest's preprocessing does not match vision.onnx; export again") from e
        want = (pixels.shape[0], self.spec.n_image_tokens, self.spec.n_embd)
        if tuple(out.shape) != want:
            from edge_vlm.errors import EmbeddingSizeMismatch

            raise EmbeddingSizeMismatch(f"vision.onnx produced {tuple(out.shape)}, the manifest promises {want}: "
                                        "the files come from different exports; export again")
        return out

    def embed(self, image) -> np.ndarray:
        """Image -> [n_image_tokens, n_embd] float32."""
        return self.embed_pixels(self.pixels(image))[0]

    def close(self):
        self.session = None
