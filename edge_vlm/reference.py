"""The unquantized torch reference: the source model run the way the upstream demos run it.

It implements the same `LLMSession` as the bundle backends, so reference and bundle share the
splice, the sampler and the stop logic: any difference in their answers is the export.
"""
from __future__ import annotations

import numpy as np

from edge_vlm.preprocess import preprocess
from edge_vlm.runtime.generate import generate
from edge_vlm.runtime.llm_torch import TorchLLMSession
from edge_vlm.runtime.sampling import SamplingConfig

__all__ = ["ReferencePipeline", "TorchLLMSession"]


class ReferencePipeline:
    """`Pipeline`-compatible wrapper around a loaded `SourceModel`."""

    def __init__(self, src, n_ctx: int = 2048):
        self.src = src
        self.llm = TorchLLMSession(src.llm, src.tokenizer, n_ctx)
        self.prompt = src.prompt

    @classmethod
    def load(cls, source: str | None = None, n_ctx: int = 2048, llm_dtype: str = "float32"):
        """`llm_dtype` float16: the LLM as the upstream demos run it (a 7B in fp32 needs 27 GB)."""
        from edge_vlm.families import load_source

        return cls(load_source(source, {"llm_dtype": llm_dtype} if llm_dtype != "float32" else None), n_ctx)

    def pixels(self, image) -> np.ndarray:
        p = self.src.preprocess
        return preprocess(image, p.image_size, p.mean, p.std, p.resize)

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """[1,3,S,S] -> [n_image_tokens, n_embd] float32."""
        import torch

        with torch.no_grad():
            return self.src.vision(torch.from_numpy(pixels))[0].float().numpy()

    def embed(self, image) -> np.ndarray:
        return self.embed_pixels(self.pixels(image))

    def generate(self, image, prompt: str, sampling: SamplingConfig = SamplingConfig(), stats=None):
        yield from generate(self.llm, self.prompt, prompt, self.embed(image), sampling, stats)

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
