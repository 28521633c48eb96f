"""The fused ONNX decoder, written op by op from the model's weights, each weight quantized as it is emitted.

Why our own emitter rather than a trace or onnxruntime-genai's model builder: it reads one layer at
a time from the loaded model and appends each quantized tensor to the data file at once, so an
export holds no fp32 graph and no second copy of the model (a full Phi-2-sized decoder builds in the
memory of the torch model plus one layer); it covers TinyGPT-V's Phi-2 variant (per-head QK
LayerNorm, RMSNorm on the attention output, interleaved fused qkv) without patching another
project's internals; and it needs nothing beyond `onnx` and numpy.

Ops (onnxruntime contrib ops, CPU and CUDA):
  GroupQueryAttention  attention + KV cache append (+ rotate-half RoPE, partial too, when head_dim and
                       rotary_dim are multiples of 16; otherwise RoPE is a few plain ops before it)
  MatMulNBits          every projection, int4/int8 blocks, integer zero points, accuracy_level 4 on CPU
  SkipSimplifiedLayerNormalization / SkipLayerNormalization   residual add + norm in one op
  QuickGelu(alpha=1) = SiLU, FastGelu = gelu_new (tanh)

Interface (what runtime/llm_onnx.py feeds):
  inputs   inputs_embeds [1, seq, hidden] (dtype), past_key_values.{i}.key / .value [1, kv_heads, cap, head_dim]
           (dtype), seqlens_k int32 [1] (= tokens in the cache after this step - 1), total_sequence_length int32 []
  outputs  logits [1, vocab] f32 (last position), present.{i}.key / .value
The runtime binds each past and present to one buffer of `cap` positions (GroupQueryAttention's shared
buffer): the cache is written in place and never copied between steps.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_vlm.export import nbits
from edge_vlm.export.decoder_archs import ARCHS, DecoderDims

OPSET = 17
IR_VERSION = 10  # onnxruntime 1.31 reads IR <= 13; onnx 1.23 would write 14
INLINE_BYTES = 1024  # initializers smaller than this stay in the .onnx; the rest go to its .data file
ALIGN = 1 << 16  # large tensors start on 64 KiB boundaries, so onnxruntime can map them


@dataclass(frozen=True)
class GraphQuant:
    """How the builder stores the projections. bits 32: plain fp32 MatMul (the graph checked against
    torch); 16: fp16 weights (Cast at load); 4 / 8: MatMulNBits."""

    bits: int = 4
    block: int = 32
    method: str = "hqq"  # 4 bits: hqq or rtn (nbits.py); 8 bits is always rtn
    accuracy_level: int = 4
    lm_head_bits: int | None = None  # None: 8 when bits is 4 (as llama.cpp keeps the output layer wider), else bits
    dtype: str = "float32"  # activations and KV cache: float32 (CPU) or float16 (CUDA)

    @property
    def head_bits(self) -> int:
        if self.lm_head_bits is not None:
            return self.lm_head_bits
        return 8 if self.bits == 4 else self.bits


def rotary_inside(d: DecoderDims) -> bool:
    """onnxruntime's GroupQueryAttention rotates only when head_dim and rotary_dim are multiples of 16."""
    return d.head_dim % 16 == 0 and d.rotary_dim % 16 == 0 and d.rotary_dim <= d.head_dim


class GraphWriter:
    """Nodes and initializers of one ONNX graph; large initializers are appended to `<name>.data` as
    they are made and only their offsets are kept."""

    def __init__(self, path: Path, dtype: str):
        from onnx import TensorProto

        self.path, self.data_name = Path(path), Path(path).name + ".data"
        self.data = open(self.path.parent / self.data_name, "wb")
        self.nodes, self.inits, self.count = [], [], 0
        self.ftype = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}[dtype]
        self.np_float = np.float32 if dtype == "float32" else np.float16
        self.bytes_written = 0
        self._const = {}

    def name(self, stem: str) -> str:
        self.count += 1
        return f"{stem}.{self.count}"

    def init(self, name: str, array: np.ndarray) -> str:
        from onnx import TensorProto, helper, numpy_helper

        array = np.require(array, requirements="C")  # (ascontiguousarray would make a scalar 1-d)
        if array.nbytes < INLINE_BYTES:
            self.inits.append(numpy_helper.from_array(array, name))
            return name
        pos = self.data.tell()
        if array.nbytes >= (1 << 20) and pos % ALIGN:
            self.data.write(b"\0" * (ALIGN - pos % ALIGN))
            pos = self.data.tell()
        self.data.write(array.tobytes())
        t = TensorProto()
        t.name, t.data_type = name, helper.np_dtype_to_tensor_dtype(array.dtype)
        t.dims.extend(array.shape)
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.data_name), ("offset", str(pos)), ("length", str(array.nbytes))):
            e = t.external_data.add()
            e.key, e.value = k, v
        self.inits.append(t)
        self.bytes_written += array.nbytes
        return name

    def weight(self, name: str, array: np.ndarray) -> str:
        """A float tensor in the graph's activation type."""
        return self.init(name, array.astype(self.np_float))

    def const(self, values, dtype=np.int64) -> str:
        key = (tuple(np.ravel(values).tolist()), np.dtype(dtype).str, np.shape(values))
        if key not in self._const:
            self._const[key] = self.init(self.name("const"), np.array(values, dtype))
        return self._const[key]

    def op(self, op_type: str, inputs, n_out: int = 1, domain: str = "", stem: str | None = None, **attrs):
        from onnx import helper

        base = self.name(stem or op_type)
        outs = [f"{base}.out{j}" if n_out > 1 else base for j in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=base, domain=domain, **attrs))
        return outs if n_out > 1 else outs[0]

    def save(self, inputs, outputs) -> None:
        from onnx import helper

        graph = helper.make_graph(self.nodes, "edge_vlm_decoder", inputs, outputs, self.inits)
        model = helper.make_model(graph, ir_version=IR_VERSION, producer_name="edge-vlm",
                                  opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)])
        self.data.flush()
        os.fsync(self.data.fileno())
        self.data.close()
        self.path.write_bytes(model.SerializeToString())

    def close(self):
        if not self.data.closed:
            self.data.close()


class DecoderBuilder:
    def __init__(self, g: GraphWriter, d: DecoderDims, q: GraphQuant):
        self.g, self.d, self.q = g, d, q
        self._blocksums, self._ones = {}, {}
        self.weight_elems = {}  # label -> elements, for the manifest's tensor mix

    # ---- projections -----------------------------------------------------------------------------
    def linear(self, x: str, w: np.ndarray, b: np.ndarray | None, stem: str, bits: int | None = None) -> str:
        g, q = self.g, self.q
        bits = bits or q.bits
        n, k = w.shape
        if bits >= 16:
            key = "float32" if bits == 32 else "float16"
            self.weight_elems[key] = self.weight_elems.get(key, 0) + w.size
            if bits == 32 or g.np_float == np.float16:
                wt = g.weight(f"{stem}.weight_t", w.T)
            else:  # fp16 storage, fp32 compute: onnxruntime folds the Cast at load
                wt = g.op("Cast", [g.init(f"{stem}.weight_t.fp16", w.T.astype(np.float16))], to=g.ftype)
            y = g.op("MatMul", [x, wt], stem=stem)
        else:
            method = q.method if (bits == 4 and k % q.block == 0) else "rtn"
            qm = nbits.quantize(w, bits, q.block, method)
            key = f"int{bits} (block {q.block})"
            self.weight_elems[key] = self.weight_elems.get(key, 0) + w.size
            if qm.correction is not None:  # hqq: its zero-point remainder rides along as extra K columns
                label = f"int{bits} (HQQ zero-point corrections)"
                self.weight_elems[label] = self.weight_elems.get(label, 0) + n * nbits.correction_columns(qm)
                qm = nbits.fold_correction(qm)
                x = self.with_blocksums(x, k)
            ins = [x, g.init(f"{stem}.qweight", qm.packed), g.weight(f"{stem}.scales", qm.scales),
                   g.init(f"{stem}.zero_points", qm.zeros)]
            attrs = {"K": qm.k, "N": n, "bits": bits, "block_size": q.block}
            if q.accuracy_level:
                attrs["accuracy_level"] = q.accuracy_level
            y = g.op("MatMulNBits", ins, domain="com.microsoft", stem=stem, **attrs)
        if b is not None:
            y = g.op("Add", [y, g.weight(f"{stem}.bias", b)])
        return y

    def with_blocksums(self, x: str, k: int) -> str:
        """[x, blocksum(x), 0...]: x followed by its sum over each quantization block, padded with zeros to whole
        blocks (one MatMul with a 0/1 matrix, then Concat); shared by the projections that read the same x."""
        key = (x, self.q.block)
        if key not in self._blocksums:
            g, blk = self.g, self.q.block
            if k not in self._ones:
                ones = np.zeros((k, -(-(k // blk) // blk) * blk), np.float32)
                ones[np.arange(k), np.arange(k) // blk] = 1.0
                self._ones[k] = g.weight(f"blocksum.{k}", ones)
            sums = g.op("MatMul", [x, self._ones[k]])
            self._blocksums[key] = g.op("Concat", [x, sums], axis=-1)
        return self._blocksums[key]

    # ---- attention -------------------------------------------------------------------------------
    def rope_tables(self):
        d = self.d
        pos = np.arange(d.max_positions, dtype=np.float32)[:, None] * np.array(d.inv_freq, np.float32)[None]
        cos, sin = np.cos(pos) * d.rope_scale, np.sin(pos) * d.rope_scale
        return self.g.weight("rope.cos", cos), self.g.weight("rope.sin", sin)

    def rotate(self, x: str, heads: int, pos_cos: str, pos_sin: str) -> str:
        """Rotate-half RoPE on the first rotary_dim channels of each head, in plain ops."""
        g, d = self.g, self.d
        rd, hd = d.rotary_dim, d.head_dim
        x4 = g.op("Reshape", [x, g.const([0, 0, heads, hd])])
        part = lambda t, a, b: g.op("Slice", [t, g.const([a]), g.const([b]), g.const([3])])  # noqa: E731
        xr = part(x4, 0, rd)
        rot = g.op("Concat", [g.op("Neg", [part(xr, rd // 2, rd)]), part(xr, 0, rd // 2)], axis=3)
        y = g.op("Add", [g.op("Mul", [xr, pos_cos]), g.op("Mul", [rot, pos_sin])])
        if rd < hd:
            y = g.op("Concat", [y, part(x4, rd, hd)], axis=3)
        return g.op("Reshape", [y, g.const([0, 0, heads * hd])])

    def attention(self, i: int, q: str, k: str | None, v: str | None, io) -> str:
        """GroupQueryAttention over the cache; q alone means packed [Q; K; V]."""
        g, d = self.g, self.d
        ins = [q, k or "", v or "", f"past_key_values.{i}.key", f"past_key_values.{i}.value", "seqlens_k",
               "total_sequence_length"]
        attrs = {"num_heads": d.heads, "kv_num_heads": d.kv_heads}
        if io.inside:
            ins += [io.cos, io.sin]
            attrs.update(do_rotary=1, rotary_interleaved=0)
        out, pk, pv = g.op("GroupQueryAttention", ins, n_out=3, domain="com.microsoft", stem=f"layers.{i}.attn", **attrs)
        # name the cache outputs as the interface says
        node = g.nodes[-1]
        node.output[1], node.output[2] = f"present.{i}.key", f"present.{i}.value"
        return out

    def qkv_split(self, qkv: str) -> tuple[str, str, str]:
        d = self.d
        sizes = self.g.const([d.heads * d.head_dim, d.kv_heads * d.head_dim, d.kv_heads * d.head_dim])
        return tuple(self.g.op("Split", [qkv, sizes], n_out=3, axis=-1))

    # ---- blocks ----------------------------------------------------------------------------------
    def llama_block(self, i: int, w: dict, x: str, delta: str | None, io) -> tuple[str, str]:
        """Pre-norm block. x: residual stream before this layer's norm, delta: the previous layer's output
        still to be added to it. Returns (new residual stream, this layer's output to add)."""
        g, d = self.g, self.d
        eps = d.norm_eps
        if delta is None:
            h = g.op("SimplifiedLayerNormalization", [x, g.weight(f"layers.{i}.in_norm", w["in_norm"])], axis=-1,
                     epsilon=eps, stash_type=1)
        else:
            h, _, _, x = g.op("SkipSimplifiedLayerNormalization", [delta, x, g.weight(f"layers.{i}.in_norm", w["in_norm"])],
                              n_out=4, domain="com.microsoft", epsilon=eps)
        qkv = self.linear(h, w["qkv"], w["qkv_bias"], f"layers.{i}.qkv")
        if io.inside:
            attn = self.attention(i, qkv, None, None, io)
        else:
            qq, kk, vv = self.qkv_split(qkv)
            attn = self.attention(i, self.rotate(qq, d.heads, io.pcos, io.psin),
                                  self.rotate(kk, d.kv_heads, io.pcos, io.psin), vv, io)
        o = self.linear(attn, w["o"], w["o_bias"], f"layers.{i}.o")
        h2, _, _, x = g.op("SkipSimplifiedLayerNormalization", [o, x, g.weight(f"layers.{i}.post_norm", w["post_norm"])],
                           n_out=4, domain="com.microsoft", epsilon=eps)
        gu = self.linear(h2, w["gate_up"], w["gate_up_bias"], f"layers.{i}.gate_up")
        gate, up = g.op("Split", [gu, g.const([w["gate_up"].shape[0] // 2] * 2)], n_out=2, axis=-1)
        act = g.op("Mul", [g.op("QuickGelu", [gate], domain="com.microsoft", alpha=1.0), up])  # SiLU(gate) * up
        return x, self.linear(act, w["down"], w["down_bias"], f"layers.{i}.down")

    def phi_qknorm_block(self, i: int, w: dict, x: str, delta: str | None, io) -> tuple[str, str]:
        """Phi's parallel block: x + RMSNorm(attn(ln(x))) + mlp(ln(x)), with per-head QK LayerNorm."""
        g, d = self.g, self.d
        gamma, beta = g.weight(f"layers.{i}.in_norm", w["in_norm"]), g.weight(f"layers.{i}.in_norm_bias", w["in_norm_bias"])
        if delta is None:
            h = g.op("LayerNormalization", [x, gamma, beta], axis=-1, epsilon=d.norm_eps)
        else:
            h, _, _, x = g.op("SkipLayerNormalization", [delta, x, gamma, beta], n_out=4, domain="com.microsoft",
                              epsilon=d.norm_eps)
        qq, kk, vv = self.qkv_split(self.linear(h, w["qkv"], w["qkv_bias"], f"layers.{i}.qkv"))
        normed = []
        for t, heads, key in ((qq, d.heads, "q_norm"), (kk, d.kv_heads, "k_norm")):
            t4 = g.op("Reshape", [t, g.const([0, 0, heads, d.head_dim])])
            t4 = g.op("LayerNormalization", [t4, g.weight(f"layers.{i}.{key}", w[key]),
                                             g.weight(f"layers.{i}.{key}_bias", w[key + "_bias"])],
                      axis=-1, epsilon=d.norm_eps)
            t = g.op("Reshape", [t4, g.const([0, 0, heads * d.head_dim])])
            normed.append(t if io.inside else self.rotate(t, heads, io.pcos, io.psin))
        attn = self.attention(i, normed[0], normed[1], vv, io)
        o = self.linear(attn, w["o"], w["o_bias"], f"layers.{i}.o")
        o = g.op("SimplifiedLayerNormalization", [o, g.weight(f"layers.{i}.post_norm", w["post_norm"])], axis=-1,
                 epsilon=d.post_norm_eps, stash_type=1)
        f = self.linear(h, w["fc1"], None, f"layers.{i}.fc1")
        f = g.op("FastGelu", [f] + ([g.weight(f"layers.{i}.fc1.bias", w["fc1_bias"])] if w["fc1_bias"] is not None else []),
                 domain="com.microsoft")
        m = self.linear(f, w["fc2"], w["fc2_bias"], f"layers.{i}.fc2")
        return x, g.op("Add", [o, m])

    def head(self, w: dict, x: str, delta: str) -> str:
        g, d = self.g, self.d
        ins = [delta, x, g.weight("final_norm", w["norm"])]
        if self.d.block == "llama":
            h = g.op("SkipSimplifiedLayerNormalization", ins, n_out=4, domain="com.microsoft", epsilon=d.norm_eps)[0]
        else:
            ins.append(g.weight("final_norm.bias", w["norm_bias"]))
            h = g.op("SkipLayerNormalization", ins, n_out=4, domain="com.microsoft", epsilon=d.norm_eps)[0]
        last = g.op("Gather", [h, g.init("last_position", np.array(-1, np.int64))], axis=1)  # [1, hidden]
        logits = self.linear(last, w["lm_head"], w["lm_head_bias"], "lm_head", bits=self.q.head_bits
                             if self.q.bits < 16 else None)
        if g.np_float != np.float32:
            logits = g.op("Cast", [logits], to=1)
        node = g.nodes[-1]
        node.output[0] = "logits"
        return "logits"


BLOCKS = {"llama": DecoderBuilder.llama_block, "phi_qknorm": DecoderBuilder.phi_qknorm_block}


@dataclass
class _RopeIO:
    inside: bool
    cos: str = ""
    sin: str = ""
    pcos: str = ""  # per-position tables [1, seq, 1, rotary_dim] for the plain-op RoPE
    psin: str = ""


def build(model, arch: str, path: Path, q: GraphQuant, progress=None) -> dict:
    """Write the fused decoder of `model` (a transformers causal LM of `arch`) to `path` (+ path.data).
    Returns {"dims", "weight_elems", "rotary_inside"}. `progress(i, n)` is called after each layer."""
    from onnx import TensorProto, helper

    reader = ARCHS[arch]
    d = reader.dims(model)
    g = GraphWriter(path, q.dtype)
    try:
        b = DecoderBuilder(g, d, q)
        io = _RopeIO(rotary_inside(d))
        io.cos, io.sin = b.rope_tables()
        if not io.inside:
            total = g.op("Cast", ["total_sequence_length"], to=TensorProto.INT64)
            seq = g.op("Gather", [g.op("Shape", ["inputs_embeds"]), g.const(1)], axis=0)
            pos = g.op("Range", [g.op("Sub", [total, seq]), total, g.const(1)])
            for name in ("cos", "sin"):
                t = g.op("Gather", [getattr(io, name), pos], axis=0)  # [seq, rd/2]
                t = g.op("Concat", [t, t], axis=-1)
                setattr(io, "p" + name, g.op("Reshape", [t, g.const([1, -1, 1, d.rotary_dim])]))
        block = BLOCKS[d.block]
        x, delta = "inputs_embeds", None
        for i in range(d.layers):
            x, delta = block(b, i, reader.layer(model, i), x, delta, io)
            if progress:
                progress(i + 1, d.layers)
        b.head(reader.head(model), x, delta)
        f = g.ftype
        inputs = [helper.make_tensor_value_info("inputs_embeds", f, [1, "seq", d.hidden])]
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, d.vocab])]
        for i in range(d.layers):
            for s in ("key", "value"):
                inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{s}", f,
                                                            [1, d.kv_heads, "past", d.head_dim]))
                outputs.append(helper.make_tensor_value_info(f"present.{i}.{s}", f, [1, d.kv_heads, "total", d.head_dim]))
        inputs += [helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
                   helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, [])]
        g.save(inputs, outputs)
    finally:
        g.close()
    return {"dims": d, "weight_elems": b.weight_elems, "rotary_inside": io.inside, "data_bytes": g.bytes_written}
