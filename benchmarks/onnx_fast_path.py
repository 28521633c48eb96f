"""MatMulNBits on a CPU: HQQ's float zero points against the same weights split into integer zero
points + a correction matmul (edge_vlm.export.llm_onnx.split_float_zero_points), on a chain of two
Phi-2-sized matmuls (K -> N -> K), one token. Exactness at accuracy_level 0, the int8-activation error
at accuracy_level 4, and ms per matmul (median of --runs, interleaved rounds).

    python benchmarks/onnx_fast_path.py --k 2560 --n 10240 --threads 2
Writes benchmarks/results/onnx-fast-path.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _with_accuracy(model, level: int):
    from onnx import helper

    m = copy.deepcopy(model)
    for n in m.graph.node:
        if n.op_type == "MatMulNBits":
            for a in [a for a in n.attribute if a.name == "accuracy_level"]:
                n.attribute.remove(a)
            n.attribute.append(helper.make_attribute("accuracy_level", level))
    return m


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=2560)
    ap.add_argument("--n", type=int, default=10240)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/onnx-fast-path.json")
    a = ap.parse_args()

    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig

    from edge_vlm.bench.machine import describe
    from edge_vlm.export.llm_onnx import _matmul_nbits_quantizer, split_float_zero_points

    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((a.k, a.n)) * 0.02).astype(np.float32)
    w2 = (rng.standard_normal((a.n, a.k)) * 0.02).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["X", "W1"], ["H"]), helper.make_node("MatMul", ["H", "W2"], ["Y"])],
                          "chain", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, "s", a.k])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, "s", a.k])],
                          [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    qz = _matmul_nbits_quantizer()(model, bits=4, block_size=32, is_symmetric=False, op_types_to_quantize=("MatMul",),
                                   algo_config=HQQWeightOnlyQuantConfig(block_size=32, bits=4,
                                                                        op_types_to_quantize=("MatMul",)))
    qz.process()
    hqq = qz.model.model
    split = copy.deepcopy(hqq)
    n_split = split_float_zero_points(split)

    def session(m):
        so = ort.SessionOptions()
        so.intra_op_num_threads = a.threads
        return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])

    variants = {"hqq float zero points, acc 4": session(_with_accuracy(hqq, 4)),
                "split, acc 0": session(_with_accuracy(split, 0)),
                "split, acc 4 (edge-vlm's default)": session(_with_accuracy(split, 4))}
    x = rng.standard_normal((1, 1, a.k)).astype(np.float32)
    ref = variants["hqq float zero points, acc 4"].run(None, {"X": x})[0]
    exact = {k: float(np.abs(s.run(None, {"X": x})[0] - ref).max()) for k, s in variants.items()}
    times = {k: [] for k in variants}
    for _ in range(a.rounds):  # interleaved: every variant once per round
        for k, s in variants.items():
            for _ in range(3):
                s.run(None, {"X": x})
            ts = []
            for _ in range(a.runs):
                t0 = time.perf_counter()
                s.run(None, {"X": x})
                ts.append((time.perf_counter() - t0) * 1e3 / 2)
            times[k].append(float(np.median(ts)))
    res = {"command": " ".join(sys.argv), "machine": describe(), "k": a.k, "n": a.n, "threads": a.threads,
           "nodes_split": n_split, "max_abs_diff_vs_hqq": exact, "max_abs_output": float(np.abs(ref).max()),
           "ms_per_matmul_median_per_round": times,
           "ms_per_matmul": {k: float(np.median(v)) for k, v in times.items()}}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    for k in variants:
        print(f"{k:<36} {res['ms_per_matmul'][k]:7.2f} ms   max |diff| vs float zero points {exact[k]:.2g}")


if __name__ == "__main__":
    main()
