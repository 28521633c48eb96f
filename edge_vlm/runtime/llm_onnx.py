"""The onnx backend's `LLMSession`: an ONNX decoder run by onnxruntime with an explicit KV cache.

Two graph interfaces (export/llm_onnx.py):
  fused   (export/decoder_graph.py) GroupQueryAttention with a shared buffer: one KV buffer per layer
          and side, bound as both past input and present output, written in place; it grows by
          doubling up to n_ctx (CPU) or is allocated at n_ctx (CUDA, in the graph's fp16).
  traced  (bundles exported before the fused graph) past in, present out, a new cache every step.
The cache lives in OrtValues bound with IOBinding, so on the CUDA EP it stays on the GPU
between steps (only the new embeddings go up and the last logits come down); the same code
runs on the CPU EP. Token ids become embeddings through the bundle's `embed_tokens.npy`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_vlm.errors import BundleError, ContextOverflow


class OnnxDecoderSession:
    def __init__(self, path: Path, embed_table: np.ndarray, tokenizer, n_ctx: int = 2048, threads: int = 0,
                 providers=("CPUExecutionProvider",), require_gpu: bool = False):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.log_severity_level = 3
        from edge_vlm.runtime.device import ort_providers

        try:
            self.sess = ort.InferenceSession(str(path), so, providers=ort_providers(providers))
        except Exception as e:  # onnxruntime raises its own untyped errors for damaged files
            raise BundleError(f"onnxruntime cannot load the LLM {path} ({str(e).splitlines()[0]}): "
                              "the file is damaged or was made by another exporter; export the bundle again") from e
        ins = {i.name: i for i in self.sess.get_inputs()}
        self.fused = "seqlens_k" in ins
        prefix = "past_key_values." if self.fused else "past."
        self.past_names = [n for n in ins if n.startswith(prefix)]
        self.present_names = ["present." + n[len(prefix):] for n in self.past_names]
        try:
            shape = ins[self.past_names[0]].shape  # [1, n_kv, 'past', head_dim]
            self.kv_shape = (1, int(shape[1]), 0, int(shape[3]))
            self.n_embd = int(ins["inputs_embeds"].shape[2])
            self.dtype = np.float16 if ins["inputs_embeds"].type == "tensor(float16)" else np.float32
            vocab = self.sess.get_outputs()[0].shape[-1]  # the fused graph's logits are [1, vocab]
            self.n_vocab = vocab if isinstance(vocab, int) else None
            if self.fused and self.n_vocab is None:
                raise ValueError("logits without a vocabulary size")
        except (KeyError, IndexError, ValueError, TypeError):
            raise BundleError(f"{path} lacks the inputs of an edge-vlm ONNX decoder (inputs_embeds [1, n, width], "
                              "past*.key/value [1, kv_heads, past, head_dim]): export the bundle again") from None
        if embed_table.ndim != 2 or embed_table.shape[1] != self.n_embd:
            raise BundleError(f"embed_tokens has shape {embed_table.shape}, the decoder takes width {self.n_embd}")
        self.embed = embed_table
        self.tok = tokenizer
        self.n_ctx = n_ctx
        self.device = "cuda" if self.sess.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        if require_gpu and self.device != "cuda":
            from edge_vlm.errors import DeviceUnavailable

            raise DeviceUnavailable("onnxruntime could not start its CUDA provider for the LLM (driver, CUDA or "
                                    "cuDNN libraries?) and would silently run it on the CPU; run with --device cpu "
                                    "or fix the CUDA setup")
        self.reset()

    def tokenize(self, text: str, add_bos: bool) -> list[int]:
        return self.tok.tokenize(text, add_bos)

    def detokenize(self, ids) -> str:
        return self.tok.detokenize(ids)

    def is_eog(self, token: int) -> bool:
        return self.tok.is_eog(token)

    @property
    def clean_up_spaces(self) -> bool:  # generate() streams such text with a small hold-back
        return self.tok.clean_up_spaces

    def reset(self):
        self.capacity = 0 if not self.fused else (self.n_ctx if self.device == "cuda" else min(self.n_ctx, 256))
        self.past = self._cache(self.capacity)
        self.n_past = 0
        self._logits = None
        self._binding = None

    def _cache(self, positions: int, keep: int = 0):
        """Cache buffers of `positions` slots; the first `keep` positions are copied from the current ones."""
        import onnxruntime as ort

        shape = self.kv_shape[:2] + (positions,) + self.kv_shape[3:]
        fresh = []
        for j in range(len(self.past_names)):
            buf = np.zeros(shape, self.dtype)
            if keep:
                buf[:, :, :keep] = self.past[j].numpy()[:, :, :keep]
            fresh.append(ort.OrtValue.ortvalue_from_numpy(buf, self.device, 0))
        return fresh

    def _fused_binding(self):
        """One IOBinding for the whole conversation: the cache buffers (past = present, written in place) and a
        logits buffer in host memory are bound once, and again only when the cache grows; each step then binds
        just its three small inputs (decode at one token is short enough for per-step rebinding to show)."""
        import onnxruntime as ort

        b = self.sess.io_binding()
        for past, present, value in zip(self.past_names, self.present_names, self.past):
            b.bind_ortvalue_input(past, value)
            b.bind_ortvalue_output(present, value)
        self._logits_buf = np.empty((1, self.n_vocab), np.float32)
        b.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(self._logits_buf))
        return b

    def _run(self, embeds: np.ndarray):
        n = embeds.shape[0]
        total = self.n_past + n
        if total > self.n_ctx:
            raise ContextOverflow(total, self.n_ctx)
        x = np.ascontiguousarray(embeds[None], dtype=self.dtype)
        if self.fused:
            if total > self.capacity:  # CPU: grow by doubling (a copy only log2(n_ctx) times)
                self.capacity = min(self.n_ctx, max(total, 2 * self.capacity))
                self.past = self._cache(self.capacity, self.n_past)
                self._binding = None
            if self._binding is None:
                self._binding = self._fused_binding()
            b = self._binding
            # the arrays must outlive the run: onnxruntime reads them in place
            self._step_inputs = (x, np.array([total - 1], np.int32), np.array(total, np.int32))
            b.bind_cpu_input("inputs_embeds", self._step_inputs[0])
            b.bind_cpu_input("seqlens_k", self._step_inputs[1])
            b.bind_cpu_input("total_sequence_length", self._step_inputs[2])
            self.sess.run_with_iobinding(b)
            self._logits = self._logits_buf[0].copy()
        else:
            b = self.sess.io_binding()
            b.bind_cpu_input("inputs_embeds", x)
            b.bind_output("logits", "cpu")
            for name, value in zip(self.past_names, self.past):
                b.bind_ortvalue_input(name, value)
            for name in self.present_names:
                b.bind_output(name, self.device)
            self.sess.run_with_iobinding(b)
            out = b.get_outputs()
            self._logits = out[0].numpy()[0].astype(np.float32, copy=False)
            self.past = list(out[1:])
        self.n_past = total

    def eval_tokens(self, ids):
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= len(self.embed)):
            raise BundleError(f"token id out of range for the embedding table ({len(self.embed)} rows)")
        self._run(self.embed[ids])

    def eval_embeds(self, embeds):
        self._run(np.asarray(embeds))

    def logits(self) -> np.ndarray:
        return self._logits

    def close(self):
        self.sess = self._binding = None
        self.past = []


def open_session(bundle: Path, manifest, cfg, plan):
    """Pipeline hook: build the session from a bundle's files."""
    from edge_vlm.runtime.tokenizer import BundleTokenizer

    t = manifest.llm.tokenizer
    if t is None or t.embed_tokens is None:
        raise BundleError("the manifest's llm.tokenizer lacks 'file' or 'embed_tokens': an onnx bundle needs both; "
                          "export it again")
    try:
        table = np.load(bundle / t.embed_tokens, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise BundleError(f"{t.embed_tokens} is not a readable .npy table ({e}): export the bundle again") from e
    if table.ndim != 2 or table.shape[1] != manifest.llm.n_embd or table.dtype.kind != "f":
        raise BundleError(f"{t.embed_tokens} holds a {table.dtype} table of shape {table.shape}, not "
                          f"[vocab, {manifest.llm.n_embd}] floats: export the bundle again")
    tok = BundleTokenizer(bundle / t.file, t.bos_id, t.eog_ids, t.clean_up_tokenization_spaces)
    vocab = tok.tok.get_vocab_size(with_added_tokens=True)
    if vocab > table.shape[0] or (t.bos_id is not None and t.bos_id >= table.shape[0]):
        raise BundleError(f"{t.file} has {vocab} tokens (BOS id {t.bos_id}) but {t.embed_tokens} only "
                          f"{table.shape[0]} rows: the files come from different exports; export the bundle again")
    n_ctx = min(cfg.n_ctx, manifest.llm.n_ctx_train or cfg.n_ctx)
    g = manifest.llm.onnx_graph
    providers = plan.llm_providers
    if g and g.kind == "fused" and g.dtype == "float32" and "CUDAExecutionProvider" in providers:
        # onnxruntime's CUDA attention takes fp16 only: an fp32 graph would run it on the CPU with copies each step
        note = ("this bundle's LLM graph is fp32 (exported for a CPU), so its LLM runs on the CPU; "
                "export with --device cuda for an fp16 graph that runs on the GPU")
        if cfg.device == "cuda":
            from edge_vlm.errors import DeviceUnavailable

            raise DeviceUnavailable(note)
        plan.notes.append("device auto: " + note)
        providers = ["CPUExecutionProvider"]
    return OnnxDecoderSession(bundle / manifest.llm.file, table, tok, n_ctx, cfg.threads, providers,
                              require_gpu=cfg.device == "cuda")
