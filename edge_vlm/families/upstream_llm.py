"""The upstream families' LLM folders -> torch models (fp32 reference), strictly.

llama   Vicuna v0 / Llama-2-chat: a transformers Llama folder (MiniGPT-4, MiniGPT-v2).
phi2    TinyGPT-V's Phi-2: an old-format Phi-2 folder (`model_type` "phi", fused
        `self_attn.query_key_value`, families.md corrections 7) loaded into our
        `edge_vlm.llms.phi_qknorm` model; the QK-norms and post-attention RMSNorm exist in no
        Phi-2 file and come from the TinyGPT-V stage checkpoint.
"""
from __future__ import annotations

import json
from pathlib import Path

from edge_vlm.errors import CheckpointMismatch, SourceError

# config.json fields of an old-format Phi-2 (transformers 4.36 PhiConfig) -> TinyGPTVPhiConfig
PHI_CONFIG_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "partial_rotary_factor", "rope_theta", "layer_norm_eps", "max_position_embeddings",
                     "bos_token_id", "eos_token_id", "pad_token_id")
# values in no Phi-2 file: TinyGPT-V's added norms (from the stage checkpoint; q/k biases stay 0)
PHI_ADDED = (r"model\.layers\.\d+\.self_attn\.[qk]_layernorm\.(weight|bias)",
             r"model\.layers\.\d+\.post_layernorm\.weight")


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as e:
        raise SourceError(f"cannot load the tokenizer from {folder}: {str(e)[:300]}") from e
    return tok


def load_llama(folder: Path, dtype: str = "float32"):
    from transformers import AutoModelForCausalLM

    cfg = _config(folder)
    if cfg.get("model_type") != "llama":
        raise SourceError(f"{folder}: config.json says model_type {cfg.get('model_type')!r}; this family needs a "
                          "Llama folder (Vicuna / Llama-2-chat in transformers format)")
    return _from_pretrained(AutoModelForCausalLM, folder, dtype=dtype)


def load_phi2(folder: Path, dtype: str = "float32"):
    """Old-format Phi-2 weights into our TinyGPT-V Phi model; the added norms stay at their init
    (ones, zero biases) until the stage checkpoint overrides them."""
    from edge_vlm.llms import register_architectures
    from edge_vlm.llms.phi_qknorm import TinyGPTVPhiConfig, TinyGPTVPhiForCausalLM

    register_architectures()
    cfg = _config(folder)
    if cfg.get("model_type") not in ("phi", "tinygpt_v_phi"):
        raise SourceError(f"{folder}: config.json says model_type {cfg.get('model_type')!r}; TinyGPT-V needs an "
                          "old-format Phi-2 folder (model_type 'phi')")
    config = TinyGPTVPhiConfig(**{k: cfg[k] for k in PHI_CONFIG_FIELDS if cfg.get(k) is not None})
    return _from_pretrained(TinyGPTVPhiForCausalLM, folder, dtype, config=config, allowed_missing=PHI_ADDED,
                            new_release_hint=(
        f"{folder} looks like the current microsoft/phi-2 release (split q_proj/k_proj/v_proj). TinyGPT-V was "
        "trained on the old-format Phi-2 (fused self_attn.query_key_value, e.g. susnato/phi-2 or the phi-2 folder "
        "of the llizhx/TinyGPT-V space); upstream issues #9 and #26 describe the garbage the new release gives"))


def _from_pretrained(cls, folder: Path, dtype: str = "float32", allowed_missing=(), new_release_hint: str = "", **kw):
    """transformers' loader (mmap, shards, .bin with weights_only) with its key report made strict."""
    import re

    import torch

    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # its load report would list the norms we add below as "missing"
    hf_logging.disable_progress_bar()
    try:
        model, info = cls.from_pretrained(folder, dtype=getattr(torch, dtype), output_loading_info=True, **kw)
    except (OSError, ValueError, RuntimeError) as e:
        raise SourceError(f"cannot load the LLM from {folder}: {str(e)[:300]}") from e
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    missing = sorted(k for k in info["missing_keys"] if not any(re.fullmatch(p, k) for p in allowed_missing))
    unexpected = sorted(k for k in info["unexpected_keys"] if not k.endswith("rotary_emb.inv_freq"))  # old buffers
    mismatched = info.get("mismatched_keys") or []
    if new_release_hint and any(k.endswith("self_attn.q_proj.weight") for k in unexpected):
        raise SourceError(new_release_hint)
    if missing or unexpected or mismatched:
        raise CheckpointMismatch(f"LLM folder {folder}", missing, unexpected,
                                 hint=("shape mismatch: " + ", ".join(map(str, mismatched[:4]))) if mismatched else "")
    return model.eval().requires_grad_(False)


def llm_config(folder: Path) -> dict:
    """The LLM folder's config.json (cheap: no weights), with a SourceError if it is missing or bad."""
    return _config(folder)


def _config(folder: Path) -> dict:
    folder = Path(folder)
    f = folder / "config.json"
    if not f.is_file():
        raise SourceError(f"LLM folder {folder} has no config.json (expected a transformers-format model folder)")
    try:
        return json.loads(f.read_text())
    except ValueError as e:
        raise SourceError(f"{f} is not valid JSON: {e}") from e

