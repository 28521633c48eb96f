"""onnxruntime's 8-bit kernels on the built-in model's projection widths: speed of a chain of one-token
projections per weight format, and the output error of DynamicQuantizeMatMul per weight range (CPUs without
VNNI multiply uint8 by int8 with saturating int16 pair sums).

    python benchmarks/int8_kernels.py --threads 1

Chain: 20 x (576 -> 1536 -> 576), one token, interleaved runs; medians. Results: results/int8-kernels.json.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_json  # noqa: E402


def session(nodes, inits, k, threads):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, k])],
                          [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, ir_version=10, opset_imports=[helper.make_opsetid("", 17),
                                                           helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.log_severity_level = threads, 3
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def layer(kind, i, x, w, bits=8, block=32):
    """One projection y = x @ w.T in the given format: (nodes, initializers, dequantized weight)."""
    from onnx import helper, numpy_helper

    from edge_vlm.export import nbits

    n, k = w.shape
    y = f"y{i}"
    if kind == "nbits":
        qm = nbits.quantize(w, bits, block, "rtn")
        inits = [numpy_helper.from_array(qm.packed, f"B{i}"), numpy_helper.from_array(qm.scales, f"S{i}"),
                 numpy_helper.from_array(qm.zeros, f"Z{i}")]
        node = helper.make_node("MatMulNBits", [x, f"B{i}", f"S{i}", f"Z{i}"], [y], domain="com.microsoft", K=k, N=n,
                                bits=bits, block_size=block, accuracy_level=4)
        return [node], inits, qm.dequantize()
    if kind in ("s8", "s7"):
        lim = 127 if kind == "s8" else 63
        s = (np.abs(w).max(1) / lim).astype(np.float32)
        q = np.clip(np.rint(w / s[:, None]), -lim, lim).astype(np.int8)
        inits = [numpy_helper.from_array(np.ascontiguousarray(q.T), f"B{i}"), numpy_helper.from_array(s, f"S{i}")]
        return ([helper.make_node("DynamicQuantizeMatMul", [x, f"B{i}", f"S{i}"], [y], domain="com.microsoft")],
                inits, q.astype(np.float32) * s[:, None])
    if kind == "u8":
        lo, hi = w.min(1), w.max(1)
        s = ((hi - lo) / 255).astype(np.float32)
        z = np.clip(np.rint(-lo / s), 0, 255).astype(np.uint8)
        q = np.clip(np.rint(w / s[:, None]) + z[:, None], 0, 255).astype(np.uint8)
        inits = [numpy_helper.from_array(np.ascontiguousarray(q.T), f"B{i}"), numpy_helper.from_array(s, f"S{i}"),
                 numpy_helper.from_array(z, f"Z{i}")]
        return ([helper.make_node("DynamicQuantizeMatMul", [x, f"B{i}", f"S{i}", f"Z{i}"], [y], domain="com.microsoft")],
                inits, (q.astype(np.float32) - z[:, None]) * s[:, None])
    inits = [numpy_helper.from_array(np.ascontiguousarray(w.T), f"B{i}")]
    return [helper.make_node("MatMul", [x, f"B{i}"], [y])], inits, w


VARIANTS = {"MatMulNBits int4 block 32": ("nbits", 4, 32), "MatMulNBits int8 block 32": ("nbits", 8, 32),
            "MatMulNBits int8 block 64": ("nbits", 8, 64), "MatMulNBits int8 block 128": ("nbits", 8, 128),
            "MatMulNBits int8 block 256": ("nbits", 8, 256), "DynamicQuantizeMatMul int8 weights": ("s8",),
            "DynamicQuantizeMatMul 7-bit weights": ("s7",), "DynamicQuantizeMatMul uint8 weights": ("u8",),
            "fp32 MatMul": ("fp32",)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=10)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    dims = [(576, 1536), (1536, 576)] * 20
    ws = [(rng.standard_normal((n, k)) * 0.02).astype(np.float32) for k, n in dims]
    chains, errors = {}, {}
    for label, v in VARIANTS.items():
        nodes, inits, x = [], [], "x"
        for i, w in enumerate(ws):
            nd, it, _ = layer(v[0], i, x, w, *v[1:])
            nodes += nd
            inits += it
            x = nd[-1].output[0]
        chains[label] = session(nodes, inits, 576, a.threads)
        nd, it, deq = layer(v[0], 0, "x", ws[0], *v[1:])  # one projection: error against its own weights
        xs = rng.standard_normal((1, 1, 576)).astype(np.float32)
        got = session(nd, it, 576, a.threads).run(None, {"x": xs})[0]
        errors[label] = float(np.abs(got - xs @ deq.T).max() / np.abs(xs @ deq.T).max())
    x = rng.standard_normal((1, 1, 576)).astype(np.float32)
    times = {k: [] for k in chains}
    for _ in range(a.rounds):
        for k, s in chains.items():
            for _ in range(20):
                t = time.perf_counter()
                s.run(None, {"x": x})
                times[k].append((time.perf_counter() - t) * 1e3)
    rows = {k: {"ms_per_40_projections": round(float(np.median(times[k])), 3),
                "max_rel_error_vs_own_weights": round(errors[k], 4)} for k in chains}
    out = {"threads": a.threads, "machine": machine(), "rows": rows, "command": "python " + " ".join(sys.argv)}
    write_json("int8-kernels", out)
    for k, r in rows.items():
        print(f"{k:40s} {r['ms_per_40_projections']:7.3f} ms   error {r['max_rel_error_vs_own_weights']:.4f}")


if __name__ == "__main__":
    main()
