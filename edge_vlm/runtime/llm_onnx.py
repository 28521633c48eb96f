"""The onnx backend's `LLMSession`: an ONNX decoder run by onnxruntime with an explicit KV cache.

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
        try:
            self.sess = ort.InferenceSession(str(path), so, providers=list(providers))
        except Exception as e:  # onnxruntime raises its own untyped errors for damaged files
            raise BundleError(f"onnxruntime cannot load the LLM {path} ({str(e).splitlines()[0]}): "
                              "the file is damaged or was made by another exporter; export the bundle again") from e
        ins = {i.name: i for i in self.sess.get_inputs()}
        self.past_names = [n for n in ins if n.startswith("past.")]
        self.present_names = ["present." + n[len("past."):] for n in self.past_names]
        try:
            shape = ins[self.past_names[0]].shape  # [1, n_kv, 'past', head_dim]
            self.kv_shape = (1, int(shape[1]), 0, int(shape[3]))
            self.n_embd = int(ins["inputs_embeds"].shape[2])
        except (KeyError, IndexError, ValueError, TypeError):
            raise BundleError(f"{path} lacks the inputs of an edge-vlm ONNX decoder (inputs_embeds [1, n, width], "
                              "past.* [1, kv_heads, past, head_dim]): export the bundle again") from None
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
        import onnxruntime as ort

        empty = np.zeros(self.kv_shape, np.float32)
        self.past = [ort.OrtValue.ortvalue_from_numpy(empty, self.device, 0) for _ in self.past_names]
        self.n_past = 0
        self._logits = None

    def _run(self, embeds: np.ndarray):
        n = embeds.shape[0]
        if self.n_past + n > self.n_ctx:
            raise ContextOverflow(self.n_past + n, self.n_ctx)
        b = self.sess.io_binding()
        b.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeds[None], dtype=np.float32))
        for name, value in zip(self.past_names, self.past):
            b.bind_ortvalue_input(name, value)
        b.bind_output("logits", "cpu")
        for name in self.present_names:
            b.bind_output(name, self.device)
        self.sess.run_with_iobinding(b)
        out = b.get_outputs()
        self._logits = out[0].numpy()[0]
        self.past = list(out[1:])
        self.n_past += n

    def eval_tokens(self, ids):
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= len(self.embed)):
            raise BundleError(f"token id out of range for the embedding table ({len(self.embed)} rows)")
        self._run(self.embed[ids].astype(np.float32))

    def eval_embeds(self, embeds):
        self._run(np.asarray(embeds, np.float32))

    def logits(self) -> np.ndarray:
        return self._logits

    def close(self):
        self.sess = None
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
    return OnnxDecoderSession(bundle / manifest.llm.file, table, tok, n_ctx, cfg.threads, plan.llm_providers,
                              require_gpu=cfg.device == "cuda")
