"""GGUF LLM backend: llama.cpp through llama-cpp-python's low-level binding.

Image embeddings enter through `llama_batch.embd`. Batches are fed in chunks of at most
`n_batch` (a larger batch aborts the whole process inside ggml instead of raising), and the
total is checked against `n_ctx` by the caller before anything is evaluated.
"""
from __future__ import annotations

import collections
import ctypes
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_vlm.errors import BundleError, MissingPackage


@dataclass(frozen=True)
class LlamaCppConfig:
    n_ctx: int = 2048
    n_batch: int = 512
    n_threads: int = 0  # 0 = number of cores
    gpu_layers: int = 0  # -1 = all
    exact: bool = False  # F32 KV cache and no flash attention: bit-for-bit comparisons in tests
    n_seq: int = 1  # sequences decoded together (the server's --parallel); each gets n_ctx positions


# llama.cpp logs every tensor it loads or quantizes (some of it at error level). We keep the
# recent lines and show them only inside our own error messages, or live with EDGE_VLM_LLAMA_VERBOSE=1.
LLAMA_LOG: collections.deque = collections.deque(maxlen=64)
_log_callback = None


def _llama():
    global _log_callback
    try:
        import llama_cpp
    except ImportError as e:
        from edge_vlm.backends import LLAMA_INSTALL

        raise MissingPackage("llama-cpp-python", LLAMA_INSTALL,
                             "GGUF bundles run on llama.cpp") from e
    if _log_callback is None:
        verbose = bool(os.environ.get("EDGE_VLM_LLAMA_VERBOSE"))

        @llama_cpp.llama_log_callback
        def _log(level, text, user_data):
            line = text.decode("utf-8", errors="replace")
            LLAMA_LOG.append(line)
            if verbose:
                sys.stderr.write(line)

        _log_callback = _log  # keep a reference: llama.cpp holds only the C pointer
        llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
        _load_cpu_variants(llama_cpp)
    return llama_cpp


CPU_VARIANT_GLOB = "libggml-cpu-*.so"  # a GGML_CPU_ALL_VARIANTS build: one CPU backend per instruction set


def _loaded_ggml(package) -> str:
    """The libggml that libllama already loaded: the wheel ships copies (libggml.so, libggml.so.0), and
    opening another copy would give a second backend registry that llama.cpp never looks at."""
    import re

    try:
        with open("/proc/self/maps") as maps:
            paths = [ln.split()[-1] for ln in maps if re.search(r"/libggml\.so[.0-9]*$", ln.strip())]
    except OSError:
        paths = []
    return paths[0] if paths else str(package / "lib" / "libggml.so.0")


def _load_cpu_variants(llama_cpp) -> None:
    """A llama.cpp built with GGML_BACKEND_DL=ON and GGML_CPU_ALL_VARIANTS=ON (what `make setup` builds)
    links no CPU backend: it ships one per instruction-set level (haswell, skylakex, icelake, zen4, ...)
    and ggml loads the best one this CPU supports. llama-cpp-python does not ask it to, so we do."""
    from pathlib import Path

    package = Path(llama_cpp.__file__).parent
    # llama-cpp-python's wheel puts the variants in site-packages/bin (its CMake install's RUNTIME folder)
    found = [d for d in (package / "lib", package.parent / "bin") if any(d.glob(CPU_VARIANT_GLOB))]
    if not found:
        return  # a build with its CPU backend linked in: nothing to load
    libdir = found[0]
    ggml = ctypes.CDLL(_loaded_ggml(package))
    ggml.ggml_backend_dev_count.restype = ctypes.c_size_t
    if ggml.ggml_backend_dev_count() == 0:
        ggml.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
        ggml.ggml_backend_load_all_from_path(str(libdir).encode())
    if ggml.ggml_backend_dev_count() == 0:
        raise BundleError(f"llama.cpp found no CPU backend for this processor in {libdir} (llama.cpp: {recent_log()}): "
                          "reinstall llama-cpp-python (make setup)")


def recent_log(n: int = 3) -> str:
    """The last few substantive llama.cpp log lines, for error messages."""
    lines = [ln.strip() for ln in LLAMA_LOG if ln.strip() and ln.strip() != "."]
    return " | ".join(lines[-n:])


class LlamaCppSession:
    """One model + one context + one sequence. Close it (or use `with`) to free native memory."""

    def __init__(self, path: Path, cfg: LlamaCppConfig = LlamaCppConfig()):
        L = self.L = _llama()
        L.llama_backend_init()
        self.cfg = cfg
        self.model = self.ctx = None
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = cfg.gpu_layers if cfg.gpu_layers >= 0 else 10_000
        LLAMA_LOG.clear()
        self.model = L.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:
            raise BundleError(f"llama.cpp cannot load {path}: the GGUF file is truncated or corrupt "
                              f"(llama.cpp: {recent_log()}); run `edge-vlm inspect` on the bundle, then export it again")
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_embd = int(L.llama_model_n_embd(self.model))
        self.n_vocab = int(L.llama_vocab_n_tokens(self.vocab))
        n_ctx_train = int(L.llama_model_n_ctx_train(self.model))
        cp = L.llama_context_default_params()
        per_seq = max(1, min(cfg.n_ctx, n_ctx_train) if n_ctx_train > 0 else cfg.n_ctx)
        cp.n_ctx = per_seq * cfg.n_seq
        cp.n_seq_max = cfg.n_seq
        cp.kv_unified = False  # one cache stream per sequence: a sequence can never take another's room
        cp.n_batch = cp.n_ubatch = max(cfg.n_batch, cfg.n_seq)
        from edge_vlm.limits import threads as cap_threads

        threads = cap_threads(cfg.n_threads)[0]
        cp.n_threads = cp.n_threads_batch = threads
        cp.no_perf = True
        if cfg.exact:
            cp.type_k = cp.type_v = L.GGML_TYPE_F32
            cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            self.close()
            raise BundleError(f"llama.cpp could not create a context of {cp.n_ctx} tokens for {path} "
                              "(out of memory?): lower --n-ctx")
        # llama.cpp may round the context up and clamps the batch to it: feed chunks no larger than
        # what the context accepts (a larger batch is a GGML_ASSERT that aborts the process)
        self.n_ctx = min(int(L.llama_n_ctx(self.ctx)) // cfg.n_seq, per_seq)  # positions per sequence
        self.n_batch = max(1, min(cfg.n_batch, int(L.llama_n_batch(self.ctx)), int(L.llama_n_ubatch(self.ctx))))
        self.n_past = 0
        self._piece_buf = ctypes.create_string_buffer(256)

    # --- LLMSession -------------------------------------------------------------------------
    def tokenize(self, text: str, add_bos: bool) -> list[int]:
        """Special tokens in `text` are parsed; BOS is prepended when the template asks for it
        (not when the GGUF's add_bos flag says so: the manifest's template is the one contract)."""
        raw = text.encode("utf-8")
        cap = len(raw) + 8
        buf = (self.L.llama_token * cap)()
        n = self.L.llama_tokenize(self.vocab, raw, len(raw), buf, cap, False, True)
        if n < 0:
            cap = -n
            buf = (self.L.llama_token * cap)()
            n = self.L.llama_tokenize(self.vocab, raw, len(raw), buf, cap, False, True)
        ids = list(buf[:n])
        return [int(self.L.llama_vocab_bos(self.vocab))] + ids if add_bos else ids

    def reset(self) -> None:
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)
        self.n_past = 0

    def _decode(self, n: int, fill, seq: int = 0, pos: int | None = None) -> None:
        """Evaluate n tokens (fill = ("tok", ids) or ("emb", [n, n_embd])) of sequence `seq` from
        position `pos` (default: this session's n_past, which then advances)."""
        L = self.L
        start = self.n_past if pos is None else pos
        embd = 0 if fill[0] == "tok" else self.n_embd
        batch = L.llama_batch_init(n, embd, 1)
        try:
            batch.n_tokens = n
            if embd:
                arr = np.ascontiguousarray(fill[1], dtype=np.float32)
                ctypes.memmove(batch.embd, arr.ctypes.data, arr.nbytes)
            else:
                for i, t in enumerate(fill[1]):
                    batch.token[i] = t
            for i in range(n):
                batch.pos[i] = start + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = 0
            batch.logits[n - 1] = 1
            rc = L.llama_decode(self.ctx, batch)
            if rc != 0:
                raise BundleError(f"llama_decode failed with code {rc} at position {start}")
            if pos is None:
                self.n_past += n
        finally:
            L.llama_batch_free(batch)

    def _check_room(self, n: int) -> None:
        if self.n_past + n > self.n_ctx:
            from edge_vlm.errors import ContextOverflow

            raise ContextOverflow(self.n_past + n, self.n_ctx)

    def eval_tokens(self, ids: list[int]) -> None:
        self._check_room(len(ids))
        for s in range(0, len(ids), self.n_batch):
            chunk = ids[s:s + self.n_batch]
            self._decode(len(chunk), ("tok", chunk))

    def eval_embeds(self, embeds: np.ndarray) -> None:
        if embeds.shape[1] != self.n_embd:
            from edge_vlm.errors import EmbeddingSizeMismatch

            raise EmbeddingSizeMismatch(f"embedding width {embeds.shape[1]} != LLM n_embd {self.n_embd}")
        self._check_room(len(embeds))
        for s in range(0, len(embeds), self.n_batch):
            chunk = embeds[s:s + self.n_batch]
            self._decode(len(chunk), ("emb", chunk))

    # --- several sequences in one context (the server's continuous batching) -----------------
    def seq_tokens(self, entries: list[tuple[int, int, int, bool]]) -> list[np.ndarray]:
        """Tokens of several sequences, (seq, pos, token, want_logits) each, in as few llama_decode calls
        as n_batch allows (a sequence's entries in position order). Returns the wanted logits, in order."""
        L, out = self.L, []
        for s in range(0, len(entries), self.n_batch):
            chunk = entries[s:s + self.n_batch]
            batch = L.llama_batch_init(len(chunk), 0, 1)
            try:
                batch.n_tokens = len(chunk)
                for i, (seq, pos, tok, want) in enumerate(chunk):
                    batch.token[i] = tok
                    batch.pos[i] = pos
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = seq
                    batch.logits[i] = int(want)
                rc = L.llama_decode(self.ctx, batch)
                if rc != 0:
                    raise BundleError(f"llama_decode failed with code {rc} for a batch of {len(chunk)} tokens")
                for i, (*_, want) in enumerate(chunk):
                    if want:
                        out.append(np.ctypeslib.as_array(L.llama_get_logits_ith(self.ctx, i),
                                                         shape=(self.n_vocab,)).copy())
            finally:
                L.llama_batch_free(batch)
        return out

    def seq_embeds(self, entries: list[tuple[int, int, np.ndarray]]) -> None:
        """Image embeddings of several sequences, (seq, first pos, [n, n_embd]) each, batched together."""
        rows = [(seq, pos + k, r) for seq, pos, e in entries for k, r in enumerate(np.asarray(e, np.float32))]
        L = self.L
        for s in range(0, len(rows), self.n_batch):
            chunk = rows[s:s + self.n_batch]
            batch = L.llama_batch_init(len(chunk), self.n_embd, 1)
            try:
                batch.n_tokens = len(chunk)
                arr = np.ascontiguousarray(np.stack([r for *_, r in chunk]), dtype=np.float32)
                ctypes.memmove(batch.embd, arr.ctypes.data, arr.nbytes)
                for i, (seq, pos, _) in enumerate(chunk):
                    batch.pos[i] = pos
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = seq
                    batch.logits[i] = 0
                rc = L.llama_decode(self.ctx, batch)
                if rc != 0:
                    raise BundleError(f"llama_decode failed with code {rc} for {len(chunk)} image embeddings")
            finally:
                L.llama_batch_free(batch)

    def seq_clear(self, seq: int) -> None:
        """Forget sequence `seq` (its cache stream is free for the next request)."""
        self.L.llama_memory_seq_rm(self.L.llama_get_memory(self.ctx), seq, -1, -1)

    def logits(self) -> np.ndarray:
        ptr = self.L.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def is_eog(self, token: int) -> bool:
        return bool(self.L.llama_vocab_is_eog(self.vocab, token))

    def token_bytes(self, token: int) -> bytes:
        n = self.L.llama_token_to_piece(self.vocab, token, self._piece_buf, len(self._piece_buf), 0, True)
        if n < 0:
            self._piece_buf = ctypes.create_string_buffer(-n)
            n = self.L.llama_token_to_piece(self.vocab, token, self._piece_buf, len(self._piece_buf), 0, True)
        return self._piece_buf.raw[:n]

    def detokenize(self, ids: list[int]) -> str:
        """llama.cpp's own detokenizer: special tokens rendered, and SentencePiece's dummy-prefix space
        removed from the first token (as transformers decodes)."""
        arr = (ctypes.c_int32 * len(ids))(*ids)
        size = max(64, 8 * len(ids))
        for _ in range(2):
            buf = ctypes.create_string_buffer(size)
            n = self.L.llama_detokenize(self.vocab, arr, len(ids), buf, size, False, True)
            if n >= 0:
                return buf.raw[:n].decode("utf-8", errors="replace")
            size = -n
        raise RuntimeError("llama_detokenize failed")

    # --- resources ----------------------------------------------------------------------------
    def close(self) -> None:
        if self.ctx:
            self.L.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            self.L.llama_model_free(self.model)
            self.model = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def open_session(bundle: Path, manifest, cfg, plan) -> LlamaCppSession:
    """Pipeline hook: build the session from a bundle's files."""
    return LlamaCppSession(bundle / manifest.llm.file, LlamaCppConfig(n_ctx=cfg.n_ctx, n_threads=cfg.threads,
                                                                      gpu_layers=plan.llm_gpu_layers, exact=cfg.exact,
                                                                      n_seq=getattr(cfg, "parallel", 1)))
