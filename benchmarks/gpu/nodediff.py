"""Run a fused decoder's prefill on onnxruntime's CPU and CUDA providers with every node's first output exposed;
print the nodes in graph order with their max |CPU - CUDA| relative to the CPU value's scale.

    python3 benchmarks/gpu/nodediff.py BUNDLE/llm.onnx [...]
"""
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

for path in sys.argv[1:]:
    m = onnx.load(path)
    outs = {o.name for o in m.graph.output}
    for n in m.graph.node:
        o = n.output[0]
        if not o or o in outs:
            continue
        t = TensorProto.FLOAT16
        if n.op_type == "Cast":
            t = [a.i for a in n.attribute if a.name == "to"][0]
        elif n.op_type in ("Shape", "Range", "Sub") or "position" in o:
            continue
        m.graph.output.append(helper.make_tensor_value_info(o, t, None))
    onnx.save(m, "/tmp/nd.onnx", save_as_external_data=True, location="nd.onnx.data")
    rng = np.random.default_rng(0)
    feeds = {}
    S = 7
    for i in m.graph.input:
        d = [x.dim_value or x.dim_param for x in i.type.tensor_type.shape.dim]
        if i.name == "inputs_embeds":
            feeds[i.name] = (rng.standard_normal((1, S, d[2])) * 0.5).astype(np.float16)
        elif i.name.startswith("past"):
            feeds[i.name] = np.zeros((1, d[1], 0, d[3]), np.float16)
        elif i.name == "seqlens_k":
            feeds[i.name] = np.array([S - 1], np.int32)
        elif i.name == "total_sequence_length":
            feeds[i.name] = np.array(S, np.int32)
        else:
            print("unknown input", i.name)
    so = ort.SessionOptions(); so.log_severity_level = 3
    res = {}
    for ep in ("CPUExecutionProvider", "CUDAExecutionProvider"):
        s = ort.InferenceSession("/tmp/nd.onnx", so, providers=[ep])
        names = [o.name for o in s.get_outputs()]
        res[ep] = dict(zip(names, s.run(None, feeds)))
    print("==", path)
    ops = {n.output[0]: n.op_type for n in m.graph.node if n.output}
    for name in res["CPUExecutionProvider"]:
        a = res["CPUExecutionProvider"][name].astype(np.float64)
        b = res["CUDAExecutionProvider"][name].astype(np.float64)
        if a.shape != b.shape:
            print(f"{ops.get(name, '?'):32s} {name:40s} shape {a.shape} vs {b.shape}")
            continue
        scale = np.abs(a).max() + 1e-6
        print(f"{ops.get(name, '?'):32s} {name:40s} {a.shape!s:18s} rel {np.abs(a - b).max() / scale:.2e}")
