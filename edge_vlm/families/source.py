"""`SourceModel`: what every family loader returns, and all that export and the reference use."""
from __future__ import annotations

from dataclasses import dataclass

from edge_vlm.manifest import Preprocess, PromptSpec


@dataclass
class SourceModel:
    family: str
    description: dict  # name, description, image_tokens, tokenizer_pre, provenance: goes into the manifest
    vision: object  # torch module: pixels [B,3,S,S] -> embeddings [B, n_image_tokens, n_embd]
    llm: object  # transformers causal LM (fp32)
    tokenizer: object
    preprocess: Preprocess
    prompt: PromptSpec
    llm_arch: str  # the LLM's HF model_type: decides which backends can take it
    llm_loader: object = None  # deferred loading (upstream families): () -> (llm, tokenizer)

    def load_llm(self):
        """Load a deferred LLM now (no-op when it is loaded). Export calls it after the vision model is
        converted and freed, so a 7B LLM and the 1B ViT never sit in memory together with the ONNX export."""
        if self.llm is None and self.llm_loader is not None:
            self.llm, self.tokenizer = self.llm_loader()
            self.llm_loader = None
        return self.llm
