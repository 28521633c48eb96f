"""The memory model: peak memory of running a model, component by component.

    runtime        Python + the libraries a backend loads (measured here, see RUNTIME_MB)
    vision         vision.onnx's weights as onnxruntime holds them, + activations for one image
    llm weights    the quantized LLM: exact file bytes for a bundle, parameters x bits/weight for a source
    kv cache       2 x layers x tokens x kv width x bytes; tokens include every image's tokens
    compute        activation/scratch buffers of the LLM runtime for one prefill batch
    load           what loading costs on top for a moment (files read through before they are freed)
    cuda context   GPU devices only: the CUDA context, and onnxruntime's CUDA provider where it runs on the GPU
                   (measured on an H200: benchmarks/results/gpu-h200.md)

Constants carry their source. `edge-vlm bench` compares the total with each bundle's measured
peak RSS on this machine and reports the error (benchmarks/results/*.json, README).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from edge_vlm.plan.shapes import ModelShape

MB = 2**20
GIB = 2**30

# What a loaded runtime holds besides the model's tensors: Python and the libraries (import
# alone: 63 MB gguf/onnx, 271 MB torch + transformers, 388 MB + bitsandbytes, 568 MB + gptqmodel),
# plus sessions, tokenizer, thread pools and allocator caches. Calibrated on the built-in model's
# bundles on this machine (2-core Xeon): measured peak RSS minus the weights, KV and buffers the
# model below predicts, per backend (`make bench`; raw figures in benchmarks/results/nano-backends.json).
# The full-size TinyGPT-V and MiniGPT-4-7B runs check the model out of sample (README).
# onnx recalibrated on the fused graph (2-core AMD EPYC, 2026-11-30, benchmarks/results/nano-onnx-fused.json:
# 162-167 MB for its int4/int8 bundles, 185 for a traced one; it was 275 when every bundle was traced).
RUNTIME_MB = {"gguf": 165, "onnx": 165, "torch": 425, "bnb": 540, "gptq": 820}

# Bits per weight of the decoder blocks' matrices as each backend stores them.
BLOCK_BITS = {
    ("gguf", 4): 4.85,  # Q4_K_M: Q4_K (4.5 bpw) everywhere, Q6_K (6.56) for attn_v/ffn_down in ~half the layers
    ("gguf", 8): 8.5,  # Q8_0: 32 int8 + one fp16 scale per block of 32
    ("gguf", 16): 16.0,  # F16
    # MatMulNBits block 32: 4 bits + fp32 scale + 4-bit zero point (5.125), and hqq's zero-point corrections as
    # extra int4 columns, one per block padded to whole blocks (+4-6 % of the columns at widths 576-2560)
    ("onnx", 4): 5.4,
    ("onnx", 8): 9.25,  # 8 bits + fp32 scale + 8-bit zero point per block of 32
    ("onnx", 16): 16.0,
    ("gptq", 4): 4.16,  # 4 bits + fp16 scale + 4-bit zero per group of 128
    ("gptq", 8): 8.16,
    ("bnb", 4): 4.13,  # nf4: 4 bits + double-quantized absmax (0.127 bpw)
    ("bnb", 8): 8.0,  # LLM.int8: int8 + one fp32 scale per row
    ("torch", 32): 32.0,  # the fp32 reference
    ("torch", 16): 16.0,  # the fp16 reference (as the upstream demos run it)
}
# Bits per weight of the token embeddings / untied output head, resident in memory. onnx keeps
# the embeddings in a memory-mapped .npy (only the rows used are read) and the head in the graph
# at block precision; gptq keeps them fp16; edge-vlm's bnb checkpoints keep them fp32.
EMBED_BITS = {"gguf": None, "onnx": 0.0, "gptq": 16.0, "bnb": 32.0, "torch": None}  # None: as the blocks
HEAD_BITS = {"gguf": None, "onnx": None, "gptq": 16.0, "bnb": 32.0, "torch": None}
ONNX_HEAD_BITS_UNDER_4 = 9.25  # the fused graph keeps the output head at int8 under a 4-bit body
KV_BYTES = {"gguf": 2, "onnx": 4, "gptq": 2, "bnb": 4, "torch": 4}  # f16 in llama.cpp; fp32/bf16 in torch
KV_BYTES_GPU = {"onnx": 2}  # the fused onnx graph for CUDA keeps activations and cache in fp16
# The fused onnx graph writes its cache in place (one buffer per layer and side, grown by doubling on a
# CPU); bundles traced before it hold past and present caches during a step (2 copies, see components).
LLAMA_UBATCH = 512  # edge-vlm's n_batch = n_ubatch
TEXT_TOKENS = 64  # template + question, a typical prompt without the image
# Measured on an H200 (132 SMs, CUDA 13, driver 580, onnxruntime-gpu 1.31.1; benchmarks/results/gpu-h200.md). A
# context holds per-SM buffers, so GPUs with fewer SMs (an RTX 4060 has 24, a Jetson Orin Nano 8) hold less: on
# them these err on the safe side.
CUDA_CONTEXT_MB = 520  # a process's primary CUDA context, with nothing else loaded
# onnxruntime's CUDA provider for the vision and LLM sessions: cuBLAS/cuDNN handles and arena after loading
# (160 MiB) and the workspaces its first generation allocates (166 MiB, against 15.5 predicted as compute buffers)
ORT_CUDA_MB = 310
# Loading holds a file's bytes twice for a moment: onnxruntime reads the protobuf (and external
# data) before building its tensors; transformers/torch.load read a shard before converting it.
# Fractions of the weights, calibrated against measured peaks (bench results, README).
# The fp32 torch reference reads fp16 source files (ViT .pth, LLM shards) through mmap while it
# builds its fp32 modules: 0.35 x the fp32 weights on top at the peak, measured alike on the built-in
# model (190 of 542 MB) and on full-size TinyGPT-V (5.2 of 14.8 GB). An fp16 reference maps its fp16
# shards as they are (MiniGPT-4-7B: no transient). The bundles' runtimes load in place.
LOAD_EXTRA = {"vision": 0.0, "gguf": 0.0, "onnx": 0.0, "gptq": 0.0, "bnb": 0.0, "torch": 0.35}
# bitsandbytes' CPU backend converts its weights on the first forward: measured, nf4 and int8 bundles
# alike end up holding about one byte per block weight plus the fp32 embeddings/head (TinyGPT-V: 3.5
# and 3.2 GB for 2.35/3.57 GB files). On CUDA its kernels use the packed weights as stored.
BNB_CPU_BLOCK_BYTES = 1.0
# llama.cpp's CPU backend repacks some quant types into an interleaved copy for its SIMD kernels
# (ggml-cpu "CPU_REPACK" buffer) while the mapped file stays resident: measured on MiniGPT-4-7B
# Q4_K_M (Q4_K 83 % + Q6_K 17 % of weights), 3.87 of a 3.99 GB file on top. Bits per weight of the
# types it repacks; Q5_0 and Q8_0 (most of the built-in model's bundles) are used in place.
GGUF_REPACKED_BITS = {"Q4_0": 4.5, "Q4_K": 4.5, "Q6_K": 6.5625, "IQ4_NL": 4.5}


def gguf_repack_share(shape: ModelShape, c: RunChoice) -> float:
    """Share of the GGUF's bytes llama.cpp repacks on a CPU (0 on a GPU)."""
    if c.backend != "gguf" or c.on_gpu:
        return 0.0
    types = (shape.bundle.get("quant") or {}).get("tensor_types") if shape.bundle else None
    if not types:  # a source: Q4_K_M of k-quant-able widths is all Q4_K/Q6_K; Q8_0 and F16 are not repacked
        return 1.0 if c.bits == 4 else 0.0
    from edge_vlm.plan.shapes import gguf_bits

    def bits(t):
        return GGUF_REPACKED_BITS.get(t) or {"F32": 32, "F16": 16, "BF16": 16, "Q8_0": 8.5, "Q5_0": 5.5, "Q5_1": 6,
                                               "Q4_1": 5, "Q5_K": 5.5, "Q3_K": 3.4375, "Q2_K": 2.625}.get(
            t, gguf_bits(t) or 8)

    total = sum(f * bits(t) for t, f in types.items())
    return sum(f * bits(t) for t, f in types.items() if t in GGUF_REPACKED_BITS) / total if total else 0.0


@dataclass(frozen=True)
class RunChoice:
    backend: str  # gguf | onnx | gptq | bnb | torch (the fp32 reference)
    bits: int
    vision_precision: str = "fp32"
    n_ctx: int = 2048
    images: int = 1
    tokens: int | None = None  # tokens actually used; None = the whole context (onnx/torch caches grow)
    on_gpu: bool = False
    # False: what must be allocated for a full context (the planner's question). True: what is
    # resident after a run that used `tokens` tokens (what peak RSS measures: llama.cpp's
    # preallocated KV cache and graph buffers count only where they were touched).
    resident: bool = False
    vision_on_cpu: bool = False  # `--vision-device cpu`: the vision model in host RAM, the LLM alone on the GPU

    def label(self) -> str:
        b = f"torch fp{self.bits}" if self.backend == "torch" else f"{self.backend} {self.bits}-bit"
        where = " on the CPU" if self.vision_on_cpu else ""
        return f"{b}, vision {self.vision_precision}{where}, n_ctx {self.n_ctx}, {self.images} image(s)"


@dataclass(frozen=True)
class Component:
    name: str
    bytes: int
    on_device: bool  # in GPU memory when the run is on a GPU (else host RAM)
    note: str = ""


def load_extra(c: RunChoice) -> float:
    return 0.0 if c.backend == "torch" and c.bits == 16 else LOAD_EXTRA[c.backend]


def input_embedding_bytes(shape: ModelShape, backend: str, bits: int) -> int:
    """Bytes of an untied input-embedding table as the backend stores it (one row is read per token,
    so it does not count in bytes read per token); 0 when it is tied to the output head."""
    llm = shape.llm
    if llm.tied:
        return 0
    emb = EMBED_BITS.get(backend)
    emb = emb if emb is not None else BLOCK_BITS.get((backend, bits), 16.0)
    return int(llm.embed_params * emb / 8)


def llm_weight_bytes(shape: ModelShape, c: RunChoice) -> int:
    if c.backend == "bnb" and not c.on_gpu:
        llm = shape.llm
        head = llm.head_params
        return int(llm.block_matrix_params * BNB_CPU_BLOCK_BYTES + (llm.embed_params + head) * 4 + llm.other_params * 4)
    if shape.bundle and shape.bundle.get("backend") == c.backend and shape.bundle.get("bits") in (c.bits, None):
        return int(shape.bundle["llm_weight_bytes"])
    llm = shape.llm
    block = BLOCK_BITS[(c.backend, c.bits)]
    emb = EMBED_BITS[c.backend] if EMBED_BITS[c.backend] is not None else block
    head = HEAD_BITS[c.backend] if HEAD_BITS[c.backend] is not None else block
    if c.backend == "onnx" and c.bits == 4:
        head = ONNX_HEAD_BITS_UNDER_4
    head_params = llm.head_params or (llm.embed_params if c.backend == "onnx" else 0)  # onnx: tied head in graph
    bits = llm.block_matrix_params * block + llm.embed_params * emb + head_params * head + llm.other_params * 32
    return int(bits / 8)


# Bytes per vision parameter as the runtime holds them (export/vision_precision.py). fp16: a CUDA graph keeps
# fp16 weights on the GPU, a CPU bundle's fp16 weights are cast to fp32 once at load (half the file, not
# half the memory). int8: the linear layers int8 with per-channel scales, the patch embedding, norms and
# position embeddings fp32 (EVA ViT-g + Q-Former: almost every parameter is in a linear layer).
VISION_BYTES = {"fp32": 4.0, "fp16": 2.0, "int8": 1.02}


def vision_weight_bytes(shape: ModelShape, c: RunChoice) -> int:
    v, b = shape.vision, shape.bundle or {}
    fp16_on_cpu = c.vision_precision == "fp16" and not (c.on_gpu and not c.vision_on_cpu)
    if v.file_bytes and (not shape.bundle or b.get("vision_precision") == c.vision_precision):
        widen = c.vision_precision == "fp16" and (b.get("vision_built_for") != "cuda" or fp16_on_cpu)
        return int(v.file_bytes * (2 if widen else 1))  # fp16 on a CPU: cast to fp32 at load
    return int(v.params * (4.0 if fp16_on_cpu else VISION_BYTES[c.vision_precision]))


def components(shape: ModelShape, c: RunChoice) -> list[Component]:
    llm, v = shape.llm, shape.vision
    be = c.backend
    image_tokens = v.image_tokens * c.images
    used = min(c.n_ctx, c.tokens if c.tokens is not None else c.n_ctx)
    kv_tokens = c.n_ctx if be == "gguf" and not c.resident else used  # llama.cpp allocates the context up front
    kv_bytes = 2 if be == "torch" and c.bits == 16 else KV_BYTES_GPU.get(be, KV_BYTES[be]) if c.on_gpu else KV_BYTES[be]
    if be == "onnx" and shape.bundle and shape.bundle.get("onnx_dtype"):  # a bundle's graph says what it holds
        kv_bytes = 2 if shape.bundle["onnx_dtype"] == "float16" else 4
    traced = be == "onnx" and shape.bundle is not None and shape.bundle.get("backend") == "onnx" \
        and not shape.bundle.get("onnx_dtype")
    kv = 2 * llm.layers * kv_tokens * llm.kv_dim * kv_bytes * (2 if traced else 1)
    prefill = min(used, image_tokens + TEXT_TOKENS)
    act_bytes = 2 if be == "gptq" or (be == "torch" and c.bits == 16) else 4
    if be == "gguf" and not c.resident:  # llama.cpp reserves its graph for a full ubatch
        ub = min(LLAMA_UBATCH, c.n_ctx)
        compute = 4 * ub * (llm.vocab + 2 * llm.ff + 4 * llm.hidden) + 4 * ub * llm.heads * min(c.n_ctx, ub)
    else:  # logits for every prefill position + one block's activations + attention scores
        compute = act_bytes * prefill * (llm.vocab + 2 * llm.ff + 4 * llm.hidden) + 4 * llm.heads * prefill ** 2
    vis_act = 4 * (2 * v.seq * (v.mlp + 3 * v.width) + v.heads * v.seq ** 2)
    vw, lw = vision_weight_bytes(shape, c), llm_weight_bytes(shape, c)
    out = [Component("runtime", RUNTIME_MB[be] * MB, False, "Python, libraries, sessions (calibrated here)"),
           Component("vision weights", vw, not c.vision_on_cpu, f"{c.vision_precision} ONNX"
                     + (", on the CPU" if c.vision_on_cpu else "")),
           Component("vision activations", vis_act, not c.vision_on_cpu, f"one image, {v.seq} encoder tokens"),
           Component("llm weights", lw, True, "as bitsandbytes holds them on CPU (~1 byte per block weight)"
                     if be == "bnb" and not c.on_gpu else "bundle files" if shape.bundle else
                     f"{BLOCK_BITS[(be, c.bits)]} bits/weight in the blocks"),
           Component("kv cache", kv, True, f"{kv_tokens} tokens ({image_tokens} image) x {llm.layers} layers x "
                                           f"{llm.kv_dim} x {kv_bytes} B x 2"),
           Component("compute buffers", compute, True, "one prefill batch"),
           Component("load transient", int(load_extra(c) * (lw + vw)), False,
                     "source files mapped while loading" if load_extra(c) else "")]
    repack = gguf_repack_share(shape, c)
    if repack:
        out.append(Component("cpu repack", int(repack * lw), False, "llama.cpp's interleaved copy of Q4_K/Q6_K/Q4_0 "
                                                                    "weights (CPU only)"))
    if c.on_gpu:
        out.append(Component("cuda context", CUDA_CONTEXT_MB * MB, True, "measured on an H200; less on smaller GPUs"))
        if be == "onnx" or not c.vision_on_cpu:
            out.append(Component("onnxruntime cuda", ORT_CUDA_MB * MB, True,
                                 "CUDA provider handles, arena and first-run workspaces (measured on an H200)"))
    return out


def total(comps: list[Component], where: str = "all") -> int:
    """where: all | device | host."""
    return sum(x.bytes for x in comps if where == "all" or (where == "device") == x.on_device)


def peak_rss_prediction(shape: ModelShape, c: RunChoice) -> dict:
    comps = components(shape, c)
    return {"predicted_mb": round(total(comps) / MB, 1), "choice": asdict(c),
            "components_mb": {x.name: round(x.bytes / MB, 1) for x in comps}}
