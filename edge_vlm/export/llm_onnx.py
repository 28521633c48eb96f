"""LLM -> ONNX decoder with an `inputs_embeds` input and an explicit KV cache.

Two ways to the graph:
  fused   (decoder_graph.py; llama and TinyGPT-V's Phi-2 variant, decoder_archs.ARCHS) written op by op
          from the loaded model, GroupQueryAttention + MatMulNBits + fused norms, each weight quantized as
          it is emitted (no fp32 graph, no second copy of the model). Below FP32_CHECK_MAX_BYTES of
          weights the same builder first writes an fp32 graph that must reproduce torch's logits.
  traced  any other decoder: torch.onnx.export(dynamo=True) around a DynamicCache wrapper, checked in
          fp32, then quantized by onnxruntime's MatMulNBitsQuantizer.

  --bits 4  -> MatMulNBits int4, block `group_size` (default 32), integer zero points, accuracy_level 4
               (onnxruntime's fast CPU kernel); --int4-method hqq (default) fits the zero point with HQQ and
               adds its float remainder back through a small correction matmul (split_float_zero_points,
               nbits.py), rtn rounds to nearest
  --bits 8  -> MatMulNBits int8 (rtn), accuracy_level 4
  --bits 16 -> fp16 weights, cast to fp32 at load (compute stays fp32)
  --device cuda (fused graph) -> activations and KV cache in fp16, as the CUDA kernels want them

The token-embedding table ships next to the graph as `embed_tokens.npy` (fp16), so the runtime turns
token ids into embeddings without torch; runtime/llm_onnx.py feeds either graph interface.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_vlm.errors import BadInput, ExportError
from edge_vlm.export.llm_validate import FLOOR_4BIT

STAGES = ("LLM -> ONNX (fp32 check graph)", "LLM -> ONNX (quantized as emitted)", "validate fp32 decoder",
          "validate LLM")
# The fused builder's fp32 check graph is written when the fp32 weights are at most this big; above it (a
# full-size 2.7B decoder is 11 GB) the export would need that much disk and memory again, so the check is
# skipped and noted: the builder is the same code the tests check in fp32 against torch on both block types.
FP32_CHECK_MAX_BYTES = 2_000_000_000

# fp32 ONNX vs torch: same math, different kernels. Measured 3e-6 (tiny llama) and ~1e-4
# (SmolLM2-135M) max |logit diff|; anything near 1e-2 means a wrong graph.
FP32_LOGITS_ATOL = 2e-3
# Teacher-forced agreement floors after quantization: (metric, floor) per bits. They catch broken
# exports (~0), not quality. int4 on a random tiny model keeps only ~30% top-1 (near-tied logits
# over 49k tokens), so 4 bits is held to top-5 containment.
MIN_AGREEMENT = {16: ("top1_agreement", 0.9), 8: ("top1_agreement", 0.75), 4: FLOOR_4BIT}
EXTERNAL_DATA_BYTES = 1_500_000_000  # protobuf caps a single .onnx at 2 GB
FP16_MIN_ELEMENTS = 1024  # initializers smaller than this (norm weights, biases) stay fp32


@dataclass(frozen=True)
class OnnxQuantConfig:
    bits: int = 4
    block_size: int = 32  # MatMulNBits block (group) size: 16, 32, 64, 128, ...
    # MatMulNBits compute type: 1 fp32, 2 fp16, 3 bf16, 4 int8 activations. 4 is onnxruntime's one fast CPU
    # path (packed weights, integer kernels): 1.1 ms vs 2.4-2.8 at 0 for a Phi-2-sized int4 matmul; int8 weights
    # without it are dequantized on every call (96.5 ms). CUDA ignores it.
    accuracy_level: int | None = 4
    symmetric: bool = False  # RTN: asymmetric (zero points): 67% vs 53% symmetric at int4 on the built-in model (200 q)
    # 4 bits: "hqq" (half-quadratic quantization, float zero points: 89.5% vs rtn's 67% on 200 questions
    # of the built-in model, whose weights were Q4_1 with float offsets) or "rtn" (round to nearest,
    # integer zero points). 8 bits always rtn.
    int4_method: str = "hqq"

    def check(self):
        if self.bits not in MIN_AGREEMENT:
            raise BadInput(f"the onnx backend takes --bits 4, 8 or 16, not {self.bits}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise BadInput(f"--group-size {self.block_size}: MatMulNBits needs a power of two >= 16")
        if self.int4_method not in ("hqq", "rtn"):
            raise BadInput(f"--int4-method {self.int4_method!r}: use hqq or rtn")
        if self.accuracy_level not in (None, 0, 1, 2, 3, 4):
            raise BadInput(f"--accuracy-level {self.accuracy_level}: use 0-4 (1 fp32, 2 fp16, 3 bf16, 4 int8)")


def cache_shape(config) -> tuple[int, int, int]:
    """(n_layer, n_kv_heads, head_dim) of a transformers decoder config."""
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    return config.num_hidden_layers, n_kv, head_dim


def io_names(n_layer: int) -> tuple[list[str], list[str]]:
    kv = [(i, s) for i in range(n_layer) for s in ("key", "value")]
    return (["inputs_embeds"] + [f"past.{i}.{s}" for i, s in kv],
            ["logits"] + [f"present.{i}.{s}" for i, s in kv])


def decoder_for_export(llm):
    """Wrap `llm` as forward(inputs_embeds, *past) -> (last logits, *present) for tracing."""
    import torch
    from transformers import DynamicCache

    n_layer = llm.config.num_hidden_layers

    class DecoderForExport(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.llm = llm

        def forward(self, inputs_embeds, *past):
            cache = DynamicCache()
            for i in range(n_layer):
                cache.update(past[2 * i], past[2 * i + 1], i)
            start = past[0].shape[2]
            pos = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)[None] + start
            out = self.llm(inputs_embeds=inputs_embeds, position_ids=pos, past_key_values=cache,
                           use_cache=True, logits_to_keep=1)
            present = []
            for layer in out.past_key_values.layers:
                present += [layer.keys, layer.values]
            return (out.logits[:, -1], *present)

    return DecoderForExport().eval()


def export_fp32(llm, path: Path) -> None:
    """Trace the decoder at seq 5 / past 3 (neither 0 nor 1, so both stay dynamic) and write it."""
    import torch

    n_layer, n_kv, head_dim = cache_shape(llm.config)
    ins, outs = io_names(n_layer)
    seq, past = torch.export.Dim("seq", max=1 << 16), torch.export.Dim("past", max=1 << 16)
    example = (torch.randn(1, 5, llm.config.hidden_size),
               *[torch.randn(1, n_kv, 3, head_dim) for _ in range(2 * n_layer)])
    big = sum(p.numel() * 4 for p in llm.parameters()) > EXTERNAL_DATA_BYTES
    try:
        with torch.no_grad():
            torch.onnx.export(decoder_for_export(llm), example, str(path), dynamo=True, input_names=ins,
                              output_names=outs, external_data=big, optimize=True, verbose=False,
                              dynamic_shapes=({1: seq}, tuple({2: past} for _ in range(2 * n_layer))))
    except Exception as e:  # torch.export's errors are many and untyped
        raise ExportError(f"torch.onnx.export could not trace this decoder ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); the onnx backend needs a decoder that "
                          "takes inputs_embeds, position_ids and a transformers Cache") from e


def quantize(src: Path, dst: Path, q: OnnxQuantConfig) -> None:
    import onnx

    model = onnx.load(str(src))
    big = model.ByteSize() > EXTERNAL_DATA_BYTES or any(
        t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    if q.bits == 16:
        model = weights_to_fp16(model)
    else:
        MatMulNBitsQuantizer = _matmul_nbits_quantizer()
        algo = None
        if q.bits == 4 and q.int4_method == "hqq":
            from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig

            algo = HQQWeightOnlyQuantConfig(block_size=q.block_size, bits=4, op_types_to_quantize=("MatMul",))
        qz = MatMulNBitsQuantizer(model, bits=q.bits, block_size=q.block_size, is_symmetric=q.symmetric,
                                  accuracy_level=q.accuracy_level, op_types_to_quantize=("MatMul",),
                                  algo_config=algo)
        qz.process()
        model = qz.model.model
        split_float_zero_points(model)
        if q.accuracy_level is not None:  # HQQ's nodes do not take it from the config
            from onnx import helper

            for n in model.graph.node:
                if n.op_type == "MatMulNBits":
                    for a in [a for a in n.attribute if a.name == "accuracy_level"]:
                        n.attribute.remove(a)
                    n.attribute.append(helper.make_attribute("accuracy_level", q.accuracy_level))
    kw = {"save_as_external_data": True, "location": dst.name + ".data", "all_tensors_to_one_file": True} if big else {}
    onnx.save_model(model, str(dst), **kw)


def split_float_zero_points(model) -> int:
    """Put HQQ's MatMulNBits on onnxruntime's fast CPU path, exactly. Float zero points make the kernel
    dequantize the whole matrix on every call (70x slower); integer ones are packed once. Each float zero
    point z splits into zi = round(z) (packed uint8, the fast path) and d = z - zi, and since onnxruntime
    computes W = (q - z) * s per block:  x @ W^T = x @ ((q - zi) * s)^T - blocksum(x) @ (d * s)^T,
    a small fp32 matmul over K / block_size inputs. Returns how many nodes were split."""
    import onnx
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    nodes, split = [], 0
    for node in g.node:
        nodes.append(node)
        zp = inits.get(node.input[3]) if node.op_type == "MatMulNBits" and len(node.input) > 3 else None
        if zp is None or zp.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            continue
        a = {x.name: x.i for x in node.attribute}
        k, n, blk = a["K"], a["N"], a["block_size"]
        if a["bits"] != 4 or k % blk or node.input[2] not in inits:
            continue
        nb = k // blk
        z = numpy_helper.to_array(zp).astype(np.float32).reshape(n, nb)
        scale_t = numpy_helper.to_array(inits[node.input[2]])
        scale = scale_t.astype(np.float32).reshape(n, nb)
        zi = np.clip(np.rint(z), 0, 15).astype(np.uint8)
        packed = np.zeros((n, (nb + 1) // 2), np.uint8)  # two 4-bit zero points per byte, low nibble first
        packed[:, : (nb + 1) // 2] = zi[:, 0::2]
        packed[:, : nb // 2] |= zi[:, 1::2] << 4
        base = node.output[0]
        names = {x: f"{base}.zp_split.{x}" for x in ("zp", "corr", "shape", "axes", "rows", "sums", "flat", "yshape",
                                                      "fix")}
        g.initializer.remove(zp)
        g.initializer.extend([numpy_helper.from_array(packed.reshape(-1), names["zp"]),
                              # in the activations' type (the scales'): fp32 graphs get fp32, fp16 ones fp16
                              numpy_helper.from_array(((z - zi) * scale).T.astype(scale_t.dtype), names["corr"]),
                              numpy_helper.from_array(np.array([-1, nb, blk], np.int64), names["shape"])])
        if opset >= 13:  # ReduceSum takes its axes as an input from opset 13 on
            g.initializer.append(numpy_helper.from_array(np.array([2], np.int64), names["axes"]))
            reduce = helper.make_node("ReduceSum", [names["rows"], names["axes"]], [names["sums"]], keepdims=0)
        else:
            reduce = helper.make_node("ReduceSum", [names["rows"]], [names["sums"]], axes=[2], keepdims=0)
        node.input[3] = names["zp"]
        node.output[0] = base + ".zp_split.int"
        nodes.extend([
            helper.make_node("Reshape", [node.input[0], names["shape"]], [names["rows"]]),
            reduce,
            helper.make_node("MatMul", [names["sums"], names["corr"]], [names["flat"]]),
            helper.make_node("Shape", [node.output[0]], [names["yshape"]]),
            helper.make_node("Reshape", [names["flat"], names["yshape"]], [names["fix"]]),
            helper.make_node("Sub", [node.output[0], names["fix"]], [base]),
        ])
        split += 1
    del g.node[:]
    g.node.extend(nodes)
    return split


def _matmul_nbits_quantizer():
    """Import onnxruntime's quantizer without its import-time `logging.basicConfig(level=INFO)`,
    which would make every later INFO line of every library (onnx_ir, ...) print."""
    import logging

    from edge_vlm.logs import root_logging_preserved

    with root_logging_preserved():
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # one INFO line per node
    return MatMulNBitsQuantizer


def weights_to_fp16(model):
    """Store large float initializers as fp16, each followed by a Cast back to fp32."""
    import onnx
    from onnx import helper, numpy_helper

    g = model.graph
    keep, casts = [], []
    for t in g.initializer:
        if t.data_type == onnx.TensorProto.FLOAT and int(np.prod(t.dims)) >= FP16_MIN_ELEMENTS:
            half = numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name + ".fp16")
            keep.append(half)
            casts.append(helper.make_node("Cast", [half.name], [t.name], to=onnx.TensorProto.FLOAT,
                                          name=t.name + ".cast"))
        else:
            keep.append(t)
    del g.initializer[:]
    g.initializer.extend(keep)
    nodes = casts + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    return model


def weight_mix(path: Path, extra: dict | None = None) -> dict:
    """What the LLM really holds: weight fraction per storage type and bits per weight, over the
    ONNX graph's initializers plus `extra` tables stored beside it ({label: (elements, bytes)})."""
    import onnx

    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    counted, by_type, nbytes = set(), {}, 0
    for key, (elems, size) in (extra or {}).items():
        by_type[key] = elems
        nbytes += size
    for n in model.graph.node:
        if n.op_type == "MatMulNBits":
            a = {x.name: x.i for x in n.attribute}
            elems = a["K"] * a["N"]
            key = f"int{a['bits']} (block {a['block_size']})"
            by_type[key] = by_type.get(key, 0) + elems
            for name in n.input[1:]:
                if name in inits:
                    counted.add(name)
                    nbytes += _tensor_bytes(inits[name])
    names = {v: k for k, v in onnx.TensorProto.DataType.items()}
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    for name, t in inits.items():
        if name in counted or t.data_type not in floats:  # integer initializers are shapes and indices
            continue
        elems = int(np.prod(t.dims))
        key = names[t.data_type].lower() + (" (HQQ zero-point corrections)" if ".zp_split.corr" in name else "")
        by_type[key] = by_type.get(key, 0) + elems
        nbytes += _tensor_bytes(t)
    return tensor_mix(by_type, nbytes)


def tensor_mix(by_type: dict, nbytes: int) -> dict:
    """{storage label: elements} and the bytes they take -> the manifest's fractions and bits per weight."""
    total = sum(by_type.values())
    return {"tensor_types": {k: round(v / total, 4) for k, v in sorted(by_type.items(), key=lambda kv: -kv[1])},
            "bits_per_weight": round(8 * nbytes / total, 3), "n_params": total}


def _tensor_bytes(t) -> int:
    import onnx

    if t.data_location == onnx.TensorProto.EXTERNAL:
        return int({e.key: e.value for e in t.external_data}.get("length", 0))
    from onnx import numpy_helper

    return numpy_helper.to_array(t).nbytes


def tokenizer_spec(tokenizer, ref_llm, folder: Path) -> dict:
    """Write tokenizer.json for the torch-free runtime; ids the runtime needs go into the manifest."""
    import tempfile

    if not getattr(tokenizer, "is_fast", False):
        raise ExportError("the onnx backend needs a fast (tokenizer.json) tokenizer; this one is a slow "
                          f"{type(tokenizer).__name__}")
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save_pretrained(d)
        (folder / "tokenizer.json").write_bytes((Path(d) / "tokenizer.json").read_bytes())
    return {"file": "tokenizer.json", "bos_id": tokenizer.bos_token_id, "eog_ids": sorted(ref_llm.eog - {None}),
            "clean_up_tokenization_spaces": bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))}


def export_llm(ctx):
    """The onnx backend's export stages; returns the manifest's LLM section and its validation."""
    from edge_vlm.export.decoder_archs import ARCHS

    cfg, src = ctx.cfg, ctx.src
    q = OnnxQuantConfig(bits=cfg.bits, block_size=cfg.group_size or 32,
                        accuracy_level=4 if cfg.accuracy_level is None else cfg.accuracy_level,
                        int4_method=cfg.int4_method or "hqq")
    q.check()
    if src.llm_arch in ARCHS:
        return _export_fused(ctx, q)
    return _export_traced(ctx, q)


def _for_cuda(device: str) -> bool:
    """The graph's precision follows the device the bundle is for; auto means this machine's."""
    if device == "auto":
        from edge_vlm.runtime.device import ort_has_cuda

        return ort_has_cuda()
    return device == "cuda"


def _quant_record(q: OnnxQuantConfig, mix: dict, extra: dict | None = None) -> dict:
    method = {16: "fp16 weights", 4: f"MatMulNBits int4 ({q.int4_method})"}.get(q.bits, f"MatMulNBits int{q.bits} (rtn)")
    return {"requested": f"onnx-{'fp16' if q.bits == 16 else f'int{q.bits}'}", "bits": q.bits, "method": method,
            **({} if q.bits == 16 else {"group_size": q.block_size,
                                         "symmetric": q.symmetric if q.bits == 8 or q.int4_method == "rtn" else None,
                                         "accuracy_level": q.accuracy_level}),
            "embed_tokens": "embed_tokens.npy (fp16)", **(extra or {}), **mix}


def _bundle_tokenizer(ctx):
    from edge_vlm.runtime.tokenizer import BundleTokenizer

    tok = tokenizer_spec(ctx.src.tokenizer, ctx.ref_llm, ctx.bw.path(""))
    return tok, BundleTokenizer(ctx.bw.path(tok["file"]), tok["bos_id"], tok["eog_ids"],
                                tok["clean_up_tokenization_spaces"])


def _export_fused(ctx, q: OnnxQuantConfig):
    import torch
    from tqdm import tqdm

    from edge_vlm.export import decoder_graph, llm_validate
    from edge_vlm.manifest import LLMSpec
    from edge_vlm.runtime.llm_onnx import OnnxDecoderSession

    cfg, src = ctx.cfg, ctx.src
    dtype = "float16" if _for_cuda(cfg.device) else "float32"
    gq = decoder_graph.GraphQuant(bits=q.bits, block=q.block_size, method=q.int4_method,
                                  accuracy_level=q.accuracy_level or 0, dtype=dtype)
    fp32_bytes = sum(p.numel() for p in src.llm.parameters()) * 4
    notes = []

    def build(path, quant, what):
        with tqdm(total=src.llm.config.num_hidden_layers, desc=what, unit="layer", leave=False,
                  disable=None) as bar:  # None: only on a terminal
            return decoder_graph.build(src.llm, src.llm_arch, path, quant, lambda i, n: bar.update(1))

    ctx.step("LLM -> ONNX (fp32 check graph)")
    check_dir = None
    if fp32_bytes <= FP32_CHECK_MAX_BYTES:
        check_dir = ctx.bw.path("llm-fp32.tmp")
        check_dir.mkdir()
        build(check_dir / "llm.onnx", decoder_graph.GraphQuant(bits=32), "fp32 check graph")
    else:
        notes.append(f"the fp32 check graph was not written ({fp32_bytes / 1e9:.1f} GB of fp32 weights > "
                     f"{FP32_CHECK_MAX_BYTES / 1e9:.0f} GB); the quantized decoder was checked against torch")
    ctx.step("LLM -> ONNX (quantized as emitted)")
    llm_file = "llm.onnx"
    info = build(ctx.bw.path(llm_file), gq, f"int{q.bits} decoder" if q.bits < 16 else "fp16 decoder")
    tok, bundle_tok = _bundle_tokenizer(ctx)
    weight = src.llm.get_input_embeddings().weight.detach()
    table = weight.to(torch.float16).numpy().copy()  # the bundle's (no fp32 copy of a 51k-row table at the peak)
    table32 = weight.float().numpy().copy() if check_dir is not None else None  # the fp32 check graph's
    del weight
    np.save(ctx.bw.path("embed_tokens.npy"), table)
    ctx.release_torch_llm()  # from here on the ONNX files are the model
    ctx.step("validate fp32 decoder")
    exact, tokenizer_check = None, None
    if check_dir is not None:
        session = OnnxDecoderSession(check_dir / "llm.onnx", table32, bundle_tok, n_ctx=512,
                                     threads=cfg.threads)
        tokenizer_check, exact = llm_validate.validate_llm(ctx, session, "fp32 ONNX decoder", None, "tokenizer.json")
        llm_validate.check_logits("fp32 ONNX decoder", exact, FP32_LOGITS_ATOL)
        session.close()
        shutil.rmtree(check_dir)
    del table32
    ctx.step("validate LLM")
    # the export validates on the CPU; an fp16 (CUDA) graph runs there too, with fp16 activations
    session = OnnxDecoderSession(ctx.bw.path(llm_file), table, bundle_tok, n_ctx=512, threads=cfg.threads)
    check, agreement = llm_validate.validate_llm(ctx, session, f"ONNX LLM at {q.bits} bits", MIN_AGREEMENT[q.bits],
                                                 None if tokenizer_check else "tokenizer.json")
    tokenizer_check = tokenizer_check or check
    session.close()
    ctx.notes.extend(notes)
    elems = dict(info["weight_elems"])
    elems["float16 (embed_tokens.npy)"] = table.size
    data = ctx.bw.path(llm_file + ".data")
    nbytes = data.stat().st_size + table.nbytes
    extra = {} if q.bits >= 16 else {"lm_head_bits": gq.head_bits}
    quant = _quant_record(q, tensor_mix(elems, nbytes), extra)
    spec = LLMSpec(backend="onnx", file=llm_file, arch=src.llm_arch, n_embd=ctx.llm_config.hidden_size,
                   n_ctx_train=ctx.llm_config.max_position_embeddings, quant=quant,
                   tokenizer={**tok, "embed_tokens": "embed_tokens.npy"},
                   onnx_graph={"kind": "fused", "dtype": dtype,
                               "rotary": "inside attention" if info["rotary_inside"] else "plain ops"})
    out = {"llm": {"prompt": ctx.validation_prompt, **agreement}, "tokenizer": tokenizer_check}
    if exact is not None:
        out["llm_fp32"] = {"prompt": ctx.validation_prompt, **exact}
    return spec, out


def _export_traced(ctx, q: OnnxQuantConfig):
    from edge_vlm.export import llm_validate
    from edge_vlm.manifest import LLMSpec
    from edge_vlm.runtime.llm_onnx import OnnxDecoderSession

    cfg, src = ctx.cfg, ctx.src
    ctx.step("LLM -> ONNX (fp32 check graph)")
    tmp_dir = ctx.bw.path("llm-fp32.tmp")
    tmp_dir.mkdir()
    fp32 = tmp_dir / "llm.onnx"
    export_fp32(src.llm, fp32)
    tok, bundle_tok = _bundle_tokenizer(ctx)
    table = src.llm.get_input_embeddings().weight.detach().float().numpy().copy()
    ctx.release_torch_llm()  # from here on the ONNX files are the model
    ctx.step("validate fp32 decoder")
    session = OnnxDecoderSession(fp32, table, bundle_tok, n_ctx=512, threads=cfg.threads)
    tokenizer_check, exact = llm_validate.validate_llm(ctx, session, "fp32 ONNX decoder", None, "tokenizer.json")
    llm_validate.check_logits("fp32 ONNX decoder", exact, FP32_LOGITS_ATOL)
    ctx.step("LLM -> ONNX (quantized as emitted)")
    llm_file = "llm.onnx"
    quantize(fp32, ctx.bw.path(llm_file), q)
    shutil.rmtree(tmp_dir)
    np.save(ctx.bw.path("embed_tokens.npy"), table.astype(np.float16))
    mix = weight_mix(ctx.bw.path(llm_file), {"float16 (embed_tokens.npy)": (table.size, table.size * 2)})
    ctx.step("validate LLM")
    session = OnnxDecoderSession(ctx.bw.path(llm_file), np.load(ctx.bw.path("embed_tokens.npy")), bundle_tok,
                                 n_ctx=512, threads=cfg.threads)
    _, agreement = llm_validate.validate_llm(ctx, session, f"ONNX LLM at {q.bits} bits", MIN_AGREEMENT[q.bits])
    spec = LLMSpec(backend="onnx", file=llm_file, arch=src.llm_arch, n_embd=ctx.llm_config.hidden_size,
                   n_ctx_train=ctx.llm_config.max_position_embeddings, quant=_quant_record(q, mix),
                   tokenizer={**tok, "embed_tokens": "embed_tokens.npy"}, onnx_graph={"kind": "traced"})
    return spec, {"llm_fp32": {"prompt": ctx.validation_prompt, **exact},
                  "llm": {"prompt": ctx.validation_prompt, **agreement}, "tokenizer": tokenizer_check}
