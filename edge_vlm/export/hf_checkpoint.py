"""Write an in-memory transformers causal LM as a plain HF folder (config.json + safetensors +
tokenizer), the input the torch-side quantizers (bitsandbytes, GPTQModel) load from.

`save_pretrained` is not used for the model: a model loaded from a GGUF cannot save itself."""
from __future__ import annotations

import json
from pathlib import Path


def write_hf_folder(llm, tokenizer, folder: Path) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    cfg = llm.config
    state = {k: v.detach().contiguous() for k, v in llm.state_dict().items() if not k.endswith("rotary_emb.inv_freq")}
    if getattr(cfg, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied: stored once, as the input embedding
    # a model loaded from a GGUF carries the GGUF's quantization_config: the weights written here are
    # plain floats, and a quantizer seeing that field would take the folder for a quantized checkpoint
    d = cfg.to_diff_dict()
    d.pop("quantization_config", None)
    (folder / "config.json").write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(str(folder))
    return folder


def folder_bytes(folder: Path, suffix: str = ".safetensors") -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob(f"*{suffix}"))


def quantized_share(llm) -> float:
    """Fraction of parameters a torch-side quantizer converts: every nn.Linear but the output head."""
    import torch

    total = sum(p.numel() for p in llm.parameters())
    head = llm.get_output_embeddings()
    linear = sum(m.weight.numel() for m in llm.modules() if isinstance(m, torch.nn.Linear) and m is not head)
    return linear / total
