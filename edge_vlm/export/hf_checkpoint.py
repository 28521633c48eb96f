"""Write an in-memory transformers causal LM as a plain HF folder (config.json + safetensors +
tokenizer), the input the torch-side quantizers (bitsandbytes, GPTQModel) load from.

`save_pretrained` is not used for the model: a model loaded from a GGUF cannot save itself."""
from __future__ import annotations

from pathlib import Path


def write_hf_folder(llm, tokenizer, folder: Path) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    cfg = llm.config
    state = {k: v.detach().contiguous() for k, v in llm.state_dict().items() if not k.endswith("rotary_emb.inv_freq")}
    if getattr(cfg, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied: stored once, as the input embedding
    cfg.to_json_file(str(folder / "config.json"))
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(str(folder))
    return folder


def folder_bytes(folder: Path, suffix: str = ".safetensors") -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob(f"*{suffix}"))
