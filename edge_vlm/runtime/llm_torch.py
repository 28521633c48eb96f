"""The torch `LLMSession`: a transformers causal LM run with a `DynamicCache`.

It serves the fp32 reference (export validation, `edge-vlm eval SOURCE`) and the bundles whose
LLM is a quantized transformers checkpoint (gptq, bnb), so reference and bundle share the
splice, the sampler and the stop logic: any difference in their answers is the quantization.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_vlm.errors import BundleError

# Token texts llama.cpp also treats as end-of-generation when they are special tokens
# (llama-vocab.cpp's EOG list); the reference must stop where the bundle stops.
EOG_TEXTS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "</s>", "<|end_of_text|>")


class TorchLLMSession:
    def __init__(self, model, tokenizer, n_ctx: int = 2048, device: str = "cpu"):
        self.model, self.tok, self.device = model, tokenizer, device
        self.n_embd = model.config.hidden_size
        self.n_ctx = min(n_ctx, getattr(model.config, "max_position_embeddings", n_ctx))
        self.embed = model.get_input_embeddings()
        special = set(tokenizer.all_special_tokens) | {
            t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if getattr(t, "special", False)}
        self.eog = {tokenizer.eos_token_id} | {tokenizer.convert_tokens_to_ids(t) for t in EOG_TEXTS if t in special}
        # the config's flag, applied as transformers 4.x did (transformers 5 skips it for BPE tokenizers)
        self.clean_up_spaces = bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))
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
        pos = torch.arange(self.n_past, self.n_past + n, device=self.device)[None]
        with torch.no_grad():
            out = self.model(inputs_embeds=embeds, past_key_values=self.cache, position_ids=pos, use_cache=True)
        self.n_past += n
        self._logits = out.logits[0, -1].float().cpu().numpy()

    def eval_tokens(self, ids):
        import torch

        with torch.no_grad():
            self._run(self.embed(torch.tensor([ids], device=self.device)))

    def eval_embeds(self, embeds):
        import torch

        dtype = self.embed.weight.dtype if self.embed.weight.is_floating_point() else torch.float32
        self._run(torch.from_numpy(np.asarray(embeds, np.float32))[None].to(self.device, dtype))

    def logits(self):
        return self._logits

    def is_eog(self, token):
        return token in self.eog

    def detokenize(self, ids):
        from edge_vlm.runtime.tokenizer import clean_up_spaces

        text = self.tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return clean_up_spaces(text) if self.clean_up_spaces else text

    def close(self):
        self.model = self.cache = None


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise BundleError(f"cannot load the tokenizer saved in {folder} ({e}): export the bundle again") from e


def load_bnb(folder: Path, device: str = "cpu", n_ctx: int = 2048) -> TorchLLMSession:
    """A bitsandbytes checkpoint folder (quantization_config in its config.json) as a session."""
    from transformers import AutoModelForCausalLM

    from edge_vlm.llms import register_architectures

    register_architectures()
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, device_map=device)
    except (OSError, ValueError) as e:
        raise BundleError(f"cannot load the bitsandbytes LLM in {folder} ({e}): export the bundle again") from e
    return TorchLLMSession(model.eval(), _tokenizer(folder), n_ctx, device)


def load_gptq(folder: Path, device: str = "cpu", n_ctx: int = 2048) -> TorchLLMSession:
    """A GPTQModel checkpoint folder as a session (GPTQModel's torch kernel: every bits/group size,
    CPU or CUDA). transformers alone cannot load it without optimum."""
    import contextlib
    import io

    import torch

    # GPTQModel's torch kernel otherwise torch.compiles its dequantization on the first forward
    # (~25 s on 2 cores); eager is what every other backend here runs too. This switch is
    # process-wide: a program that loads a GPTQ bundle and also relies on torch.compile must
    # set it back itself (edge-vlm compiles nothing).
    torch._dynamo.config.disable = True
    try:
        from edge_vlm.logs import root_logging_preserved

        with contextlib.redirect_stdout(io.StringIO()), root_logging_preserved():  # banners and tables
            from gptqmodel import BACKEND, GPTQModel

            model = GPTQModel.load(str(folder), device=device, backend=BACKEND.TORCH).model
    except (OSError, ValueError) as e:
        raise BundleError(f"cannot load the GPTQ LLM in {folder} ({e}): export the bundle again") from e
    return TorchLLMSession(model.eval(), _tokenizer(folder), n_ctx, device)


LOADERS = {"bnb": load_bnb, "gptq": load_gptq}


def open_session(bundle: Path, manifest, cfg, plan) -> TorchLLMSession:
    """Pipeline hook: build the session from a bundle's checkpoint folder."""
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return LOADERS[manifest.llm.backend](bundle / manifest.llm.file, plan.torch_device, cfg.n_ctx)
