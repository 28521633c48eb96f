"""LLM -> GGUF: written with gguf-py from the torch weights, then quantized by llama.cpp.

gguf-py owns the format and the tensor-name tables (`get_tensor_name_map`); we add only the
HF->llama.cpp Q/K row permutation that llama.cpp's RoPE layout needs for Llama models.
k-quants need rows that are multiples of 256: llama.cpp silently falls back to other types for
narrower tensors, so the manifest records the real tensor-type mix and bits per weight.
"""
from __future__ import annotations

import ctypes
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_vlm.errors import BadInput, ExportError, SourceError

BITS_TO_QUANT = {4: "Q4_K_M", 8: "Q8_0", 16: "F16"}

# Agreement floors for export-time validation (teacher-forced top-1 vs the torch reference on the
# validation prompt). They catch broken exports (a wrong permutation scores ~0), not quality:
# `edge-vlm eval` measures quality.
MIN_AGREEMENT = {"F32": 0.95, "F16": 0.9, "BF16": 0.8, "Q8_0": 0.75}
MIN_AGREEMENT_DEFAULT = 0.4

STAGES = ("LLM -> GGUF", "quantize LLM", "validate LLM")

# --bits 4 without --quant: the llama.cpp types of that budget, tried on the model itself (the first is the
# default where no probe runs). Which one loses least depends on the model: the built-in model's LLM was
# itself Q4_1, so Q4_1 re-encodes it exactly where Q4_K_M rounds it again. 8 bits has one type, Q8_0.
PROBE_CANDIDATES = {4: ("Q4_K_M", "Q4_K_S", "Q4_1", "Q4_0")}
PROBE_QUESTIONS = 6  # image questions from the calibration set
PROBE_TOKENS = 8  # teacher-forced positions each, after the prompt and image
PROBE_MAX_PARAMS = 4e9  # larger LLMs get the default type (each candidate is a whole quantization pass)


def quant_ftype(name: str) -> int:
    import llama_cpp

    name = name.upper()
    attr = "LLAMA_FTYPE_ALL_F32" if name == "F32" else f"LLAMA_FTYPE_MOSTLY_{name}"
    if not hasattr(llama_cpp, attr):
        known = sorted(a[len("LLAMA_FTYPE_MOSTLY_"):] for a in dir(llama_cpp) if a.startswith("LLAMA_FTYPE_MOSTLY_"))
        raise BadInput(f"unknown llama.cpp quantization type {name!r}; known: F32, {', '.join(known)}")
    return getattr(llama_cpp, attr)


def _permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF stores each head's rotary halves as [first half; second half]; llama.cpp interleaves them."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _vocab(tokenizer, n_vocab: int):
    import gguf

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if by_id and max(by_id) >= n_vocab:
        raise SourceError(f"the tokenizer has ids up to {max(by_id)} but the LLM's embedding has {n_vocab} rows")
    added = getattr(tokenizer, "added_tokens_decoder", {})  # id -> AddedToken(special=...)
    specials = set(tokenizer.all_special_ids) | {i for i, t in added.items() if getattr(t, "special", False)}
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if i in specials
                         else gguf.TokenType.USER_DEFINED if i in added else gguf.TokenType.NORMAL)
    return tokens, types


def _spm_vocab(model_file: Path, n_vocab: int):
    """LLaMA's SentencePiece vocabulary (Vicuna, Llama-2): pieces, scores (merge priority) and types read
    from tokenizer.model itself, as llama.cpp's SPM tokenizer needs them."""
    import gguf

    try:
        vocab = gguf.SentencePieceVocab(Path(model_file).parent)
    except (RuntimeError, OSError, ValueError) as e:
        raise SourceError(f"cannot read the SentencePiece model {model_file}: {e} "
                          "(pip install sentencepiece)") from e
    rows = list(vocab.all_tokens())
    if len(rows) > n_vocab:
        raise SourceError(f"the tokenizer has {len(rows)} tokens but the LLM's embedding has {n_vocab} rows")
    rows += [(f"[PAD{i}]".encode(), -1000.0, gguf.TokenType.UNUSED) for i in range(len(rows), n_vocab)]
    return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]


@dataclass(frozen=True)
class LlamaGGUFWriter:
    """Writes a transformers Llama-architecture causal LM as an F32 GGUF (F16 matrices for an fp16 LLM). Tokenizers: byte-level BPE
    (tokenizer_pre names llama.cpp's pre-tokenizer), or SentencePiece when `spm_model` is given."""

    tokenizer_pre: str = "smollm"
    spm_model: Path | None = None  # the LLM folder's tokenizer.model (LLaMA, Vicuna, Llama-2)

    def write(self, llm, tokenizer, path: Path, name: str = "edge-vlm") -> None:
        import gguf
        import torch

        c = llm.config
        if c.model_type != "llama":
            raise SourceError(f"the GGUF writer handles the llama architecture; this LLM is {c.model_type!r}")
        n_layer, n_head = c.num_hidden_layers, c.num_attention_heads
        n_kv = c.num_key_value_heads or n_head
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // n_head
        rope = getattr(c, "rope_parameters", None) or {}
        theta = rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))
        if getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False):
            raise SourceError("Llama models with attention/MLP biases are not supported by this GGUF writer yet")
        if rope.get("rope_type", "default") != "default":
            raise SourceError(f"rope scaling {rope.get('rope_type')!r} is not supported by this exporter yet")
        w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        w.add_name(name)
        w.add_context_length(c.max_position_embeddings)
        w.add_embedding_length(c.hidden_size)
        w.add_block_count(n_layer)
        w.add_feed_forward_length(c.intermediate_size)
        w.add_head_count(n_head)
        w.add_head_count_kv(n_kv)
        w.add_rope_dimension_count(head_dim)
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_layer_norm_rms_eps(c.rms_norm_eps)
        w.add_rope_freq_base(float(theta))
        w.add_file_type(gguf.LlamaFileType.ALL_F32)
        n_vocab = c.vocab_size
        w.add_vocab_size(n_vocab)
        if self.spm_model:
            tokens, scores, types = _spm_vocab(self.spm_model, n_vocab)
            w.add_tokenizer_model("llama")
            w.add_tokenizer_pre("default")
            w.add_token_scores(scores)
            w.add_add_space_prefix(True)  # SentencePiece's dummy prefix: added when tokenizing, removed when decoding
        else:
            tokens, types = _vocab(tokenizer, n_vocab)
            w.add_tokenizer_model("gpt2")
            w.add_tokenizer_pre(self.tokenizer_pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        with tempfile.TemporaryDirectory() as tdir:
            tokenizer.save_pretrained(tdir)
            special = gguf.SpecialVocab(tdir, load_merges=not self.spm_model, n_vocab=n_vocab)
            if not self.spm_model and not special.merges:
                raise SourceError("the tokenizer has neither BPE merges nor a tokenizer.model (SentencePiece) in its "
                                  "folder: this GGUF writer supports those two; try --backend onnx")
            special.add_to_gguf(w, quiet=True)
            if getattr(tokenizer, "chat_template", None) and not special.chat_template:
                w.add_chat_template(tokenizer.chat_template)
        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layer)
        state = llm.state_dict()
        tied = bool(getattr(c, "tie_word_embeddings", False))
        for key, t in state.items():
            if key.endswith("rotary_emb.inv_freq") or (tied and key == "lm_head.weight"):
                continue
            new = names.get_name(key, try_suffixes=(".weight", ".bias"))
            if new is None:
                raise SourceError(f"no GGUF name for tensor {key!r} of the llama architecture")
            # matrices keep the source's dtype (an fp16 LLM becomes an F16 file without an fp32 copy of
            # 27 GB); norms are F32, as llama.cpp expects
            arr = t.detach().numpy() if t.dtype == torch.float16 and t.ndim == 2 else t.detach().float().numpy()
            if key.endswith("self_attn.q_proj.weight"):
                arr = _permute_rope(arr, n_head)
            elif key.endswith("self_attn.k_proj.weight"):
                arr = _permute_rope(arr, n_kv)
            w.add_tensor(new, np.ascontiguousarray(arr))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=False)
        w.close()


def quantize(src: Path, dst: Path, quant: str, threads: int = 0) -> None:
    import shutil

    from edge_vlm.runtime.llm_gguf import _llama, recent_log

    llama_cpp = _llama()  # llama.cpp's per-tensor log goes to a buffer, not the terminal
    ftype = quant_ftype(quant)
    if quant.upper() == "F32":
        shutil.copyfile(src, dst)
        return
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = ftype
    p.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p))
    if rc != 0 or not dst.is_file():
        raise ExportError(f"llama.cpp failed to quantize to {quant} (code {rc}; llama.cpp: {recent_log()})")


def tensor_mix(path: Path) -> dict:
    """What the file really holds: weight fraction per tensor type and bits per weight."""
    import gguf

    r = gguf.GGUFReader(str(path))
    by_type, elems, nbytes = {}, 0, 0
    for t in r.tensors:
        name = t.tensor_type.name
        by_type[name] = by_type.get(name, 0) + int(t.n_elements)
        elems += int(t.n_elements)
        nbytes += int(t.n_bytes)
    return {"tensor_types": {k: round(v / elems, 4) for k, v in sorted(by_type.items(), key=lambda kv: -kv[1])},
            "bits_per_weight": round(8 * nbytes / elems, 3), "n_params": elems}


def export_llm(ctx):
    """The gguf backend's export stages; returns the manifest's LLM section and its validation."""
    import torch

    from edge_vlm.export import llm_validate
    from edge_vlm.manifest import LLMSpec
    from edge_vlm.plan.shapes import gguf_bits
    from edge_vlm.runtime.llm_gguf import LlamaCppConfig, LlamaCppSession

    cfg, src = ctx.cfg, ctx.src
    quant = ctx.quant.upper()
    ctx.step("LLM -> GGUF")
    base = ctx.bw.path("llm-source.tmp.gguf")
    spm = src.description.get("spm_model")
    fp16 = next(src.llm.parameters()).dtype != torch.float32
    if fp16 and quant == "F32":
        raise BadInput("--quant F32 from an fp16-loaded LLM would only widen fp16 values: use --bits 16 (F16), "
                       "or load the LLM with --llm-dtype float32")
    ctx.reference_trace()  # recorded before the torch LLM is freed below
    candidates = probe_candidates(ctx)
    traces = probe_traces(ctx) if candidates else []
    LlamaGGUFWriter(src.description.get("tokenizer_pre", "smollm"), Path(spm) if spm else None).write(
        src.llm, src.tokenizer, base, name=src.description.get("name", "edge-vlm"))
    ctx.release_torch_llm()  # quantizing maps the whole GGUF: one copy of the LLM in memory, not two
    ctx.step("quantize LLM")
    probe = None
    if candidates:
        quant, probe = choose_quant(ctx, base, candidates, traces)
        ctx.quant = quant
    llm_file = f"llm-{quant.lower()}.gguf"
    if not ctx.bw.path(llm_file).is_file():
        quantize(base, ctx.bw.path(llm_file), quant, cfg.threads)
    base.unlink()
    mix = tensor_mix(ctx.bw.path(llm_file))
    ctx.step("validate LLM")
    test = LlamaCppSession(ctx.bw.path(llm_file), LlamaCppConfig(n_ctx=512, exact=True, n_threads=cfg.threads))
    floor = ("top1_agreement", MIN_AGREEMENT.get(quant, MIN_AGREEMENT_DEFAULT))
    tokenizer_check, agreement = llm_validate.validate_llm(ctx, test, f"LLM {quant}", floor, "GGUF tokenizer",
                                                           sentencepiece=bool(spm))
    spec = LLMSpec(backend="gguf", file=llm_file, arch=src.llm_arch, n_embd=ctx.llm_config.hidden_size,
                   n_ctx_train=ctx.llm_config.max_position_embeddings,
                   quant={"requested": quant, "bits": gguf_bits(quant), "method": "llama.cpp", **mix,
                          **({"probe": probe} if probe else {})})
    return spec, {"llm": {"prompt": ctx.validation_prompt, **agreement}, "tokenizer": tokenizer_check}


def probe_candidates(ctx) -> tuple[str, ...]:
    """The types to try: only when the user named no --quant, the budget has several, and the LLM is
    small enough that quantizing it several times is cheap."""
    cfg = ctx.cfg
    types = PROBE_CANDIDATES.get(cfg.bits, ()) if not cfg.quant else ()
    if len(types) < 2:
        return ()
    n_params = sum(p.numel() for p in ctx.src.llm.parameters())
    if n_params > PROBE_MAX_PARAMS:
        ctx.notes.append(f"note: {types[0]} without a probe of the other {cfg.bits}-bit types (an LLM of "
                         f"{n_params / 1e9:.1f} B parameters): --quant {types[2]} etc. to try another")
        return ()
    return types


def probe_traces(ctx) -> list[tuple[str, np.ndarray, object]]:
    """(question, image embeddings, the torch reference's trace) for the first calibration questions."""
    from edge_vlm.data import load_questions
    from edge_vlm.export.llm_gptq import DEFAULT_CALIBRATION
    from edge_vlm.export.llm_validate import reference_trace

    folder = Path(ctx.cfg.calibration_data) if ctx.cfg.calibration_data else DEFAULT_CALIBRATION
    questions = load_questions(str(folder), split="", seed=0)[:PROBE_QUESTIONS]
    out = []
    for q in questions:
        emb = ctx.embed_image(q.image)
        out.append((q.text, emb, reference_trace(ctx.ref_llm, ctx.src.prompt, q.text, emb, PROBE_TOKENS)))
    return out


def choose_quant(ctx, base: Path, candidates, traces) -> tuple[str, dict]:
    """Quantize to every candidate, score each by its mean KL to the torch reference over the probe
    traces, keep the best file (named as the manifest will say) and delete the others."""
    from edge_vlm.export.llm_validate import teacher_forced_agreement
    from edge_vlm.runtime.llm_gguf import LlamaCppConfig, LlamaCppSession

    scores = {}
    for q in candidates:
        path = ctx.bw.path(f"llm-{q.lower()}.gguf")
        quantize(base, path, q, ctx.cfg.threads)
        s = LlamaCppSession(path, LlamaCppConfig(n_ctx=512, exact=True, n_threads=ctx.cfg.threads))
        try:
            kls = [teacher_forced_agreement(trace, s, ctx.src.prompt, text, emb)["mean_kl"]
                   for text, emb, trace in traces]
        finally:
            s.close()
        scores[q] = round(float(np.mean(kls)), 6)
    best = min(candidates, key=lambda q: (scores[q], candidates.index(q)))
    for q in candidates:
        if q != best:
            ctx.bw.path(f"llm-{q.lower()}.gguf").unlink(missing_ok=True)
    ranked = ", ".join(f"{q} {scores[q]:.4f}" for q in sorted(scores, key=scores.get))
    ctx.notes.append(f"--bits {ctx.cfg.bits}: {best}, the {ctx.cfg.bits}-bit type closest to the reference "
                     f"(mean KL over {len(traces)} image questions x {PROBE_TOKENS} tokens: {ranked}); "
                     "--quant TYPE forces one")
    return best, {"metric": "mean KL(reference || bundle), nats", "questions": len(traces),
                  "tokens_per_question": PROBE_TOKENS, "scores": scores, "chosen": best}
