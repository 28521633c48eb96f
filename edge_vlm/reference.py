"""The unquantized torch reference: the source model run the way the upstream demos run it.

It implements the same `LLMSession` as the bundle backends, so reference and bundle share the
splice, the sampler and the stop logic: any difference in their answers is the export.
"""
from __future__ import annotations

import numpy as np

from edge_vlm.preprocess import preprocess
from edge_vlm.runtime.generate import generate
from edge_vlm.runtime.sampling import SamplingConfig


# Token texts llama.cpp also treats as end-of-generation when they are special tokens
# (llama-vocab.cpp's EOG list); the reference must stop where the bundle stops.
EOG_TEXTS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "</s>", "<|end_of_text|>")


class TorchLLMSession:
    def __init__(self, model, tokenizer, n_ctx: int = 2048):
        self.model, self.tok = model, tokenizer
        self.n_embd = model.config.hidden_size
        self.n_ctx = min(n_ctx, getattr(model.config, "max_position_embeddings", n_ctx))
        self.embed = model.get_input_embeddings()
        special = set(tokenizer.all_special_tokens) | {
            t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if getattr(t, "special", False)}
        self.eog = {tokenizer.eos_token_id} | {tokenizer.convert_tokens_to_ids(t) for t in EOG_TEXTS if t in special}
        self.reset()

    def tokenize(self, text: str, add_bos: bool) -> list[int]:
        ids = self.tok(text, add_special_tokens=False).input_ids
        if add_bos and self.tok.bos_token_id is not None:
            ids = [self.tok.bos_token_id] + ids
        return ids

    def reset(self):
        from transformers import DynamicCache

        self.cache = DynamicCache()
        self.n_past = 0
        self._logits = None

    def _run(self, embeds):
        import torch

        n = embeds.shape[1]
        pos = torch.arange(self.n_past, self.n_past + n)[None]
        with torch.no_grad():
            out = self.model(inputs_embeds=embeds, past_key_values=self.cache, position_ids=pos, use_cache=True)
        self.n_past += n
        self._logits = out.logits[0, -1].float().numpy()

    def eval_tokens(self, ids):
        import torch

        with torch.no_grad():
            self._run(self.embed(torch.tensor([ids])))

    def eval_embeds(self, embeds):
        import torch

        self._run(torch.from_numpy(np.asarray(embeds, np.float32))[None])

    def logits(self):
        return self._logits

    def is_eog(self, token):
        return token in self.eog

    def detokenize(self, ids):
        return self.tok.decode(ids, skip_special_tokens=False)

    def close(self):
        pass


class ReferencePipeline:
    """`Pipeline`-compatible wrapper around a loaded `SourceModel`."""

    def __init__(self, src, n_ctx: int = 2048):
        self.src = src
        self.llm = TorchLLMSession(src.llm, src.tokenizer, n_ctx)
        self.prompt = src.prompt

    @classmethod
    def load(cls, source: str | None = None, n_ctx: int = 2048):
        from edge_vlm.families import load_source

        return cls(load_source(source), n_ctx)

    def pixels(self, image) -> np.ndarray:
        p = self.src.preprocess
        return preprocess(image, p.image_size, p.mean, p.std, p.resize)

    def embed(self, image) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.src.vision(torch.from_numpy(self.pixels(image)))[0].numpy()

    def generate(self, image, prompt: str, sampling: SamplingConfig = SamplingConfig(), stats=None):
        yield from generate(self.llm, self.prompt, prompt, self.embed(image), sampling, stats)

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
