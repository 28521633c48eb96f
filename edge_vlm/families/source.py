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
