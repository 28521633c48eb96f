"""LLM -> bitsandbytes checkpoint: nf4 with double quantization (--bits 4) or LLM.int8 (--bits 8),
saved as a transformers folder in the bundle and run through transformers with `inputs_embeds`.

Any transformers decoder works (llama, our TinyGPT-V Phi-2 variant). bitsandbytes quantizes
while the fp32 weights load; the checkpoint is saved before any forward pass, because on CPU
bitsandbytes repacks 4-bit weights in place on the first forward and a model saved after that
reloads wrong (platform-notes.md). Validation then loads the saved folder exactly as the runtime
does and compares it with the fp32 torch reference.
"""
from __future__ import annotations

import shutil

from edge_vlm.errors import BadInput
from edge_vlm.export.llm_validate import FLOOR_4BIT

STAGES = ("LLM -> bitsandbytes", "validate LLM")

# (metric, floor) per bits: catch broken exports, not quality (see llm_validate.check_agreement)
MIN_AGREEMENT = {8: ("top1_agreement", 0.75), 4: FLOOR_4BIT}
LLM_DIR = "llm"


def bnb_config(bits: int):
    import torch
    from transformers import BitsAndBytesConfig

    if bits == 4:
        # fp32 compute: exact on CPU; on a GPU a bf16/fp16 compute dtype is faster (a later option)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.float32)
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    raise BadInput(f"the bnb backend takes --bits 4 (nf4) or 8 (int8), not {bits}")


def export_llm(ctx):
    from edge_vlm.export import llm_validate
    from edge_vlm.export.hf_checkpoint import folder_bytes, quantized_share, write_hf_folder
    from edge_vlm.manifest import LLMSpec
    from edge_vlm.runtime.llm_torch import load_bnb

    cfg, src = ctx.cfg, ctx.src
    qcfg = bnb_config(cfg.bits)
    ctx.step("LLM -> bitsandbytes")
    from transformers import AutoModelForCausalLM

    from edge_vlm.llms import register_architectures

    register_architectures()
    plain = write_hf_folder(src.llm, src.tokenizer, ctx.bw.path("llm-fp32.tmp"))
    model = AutoModelForCausalLM.from_pretrained(plain, quantization_config=qcfg, device_map="cpu")
    out = ctx.bw.path(LLM_DIR)
    model.save_pretrained(out)  # before any forward: see the module docstring
    src.tokenizer.save_pretrained(out)
    del model
    shutil.rmtree(plain)
    ctx.step("validate LLM")
    tokenizer_check, agreement = llm_validate.validate_llm(
        ctx, load_bnb(out, "cpu"), f"bitsandbytes LLM at {cfg.bits} bits", MIN_AGREEMENT[cfg.bits], "saved tokenizer")
    n = sum(p.numel() for p in src.llm.parameters())
    share = quantized_share(src.llm)
    kind = "nf4 (double quant)" if cfg.bits == 4 else "int8 (LLM.int8)"
    quant = {"requested": f"bnb-{'nf4' if cfg.bits == 4 else 'int8'}", "bits": cfg.bits, "method": f"bitsandbytes {kind}",
             "compute_dtype": "float32" if cfg.bits == 4 else "float16/float32",
             "tensor_types": {kind: round(share, 4), "float32": round(1 - share, 4)},
             "bits_per_weight": round(8 * folder_bytes(out) / n, 3), "n_params": n}
    spec = LLMSpec(backend="bnb", file=LLM_DIR, arch=src.llm_arch, n_embd=ctx.llm_config.hidden_size,
                   n_ctx_train=ctx.llm_config.max_position_embeddings, quant=quant)
    return spec, {"llm": {"prompt": ctx.validation_prompt, **agreement}, "tokenizer": tokenizer_check}
