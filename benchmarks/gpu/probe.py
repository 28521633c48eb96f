"""Does onnxruntime-gpu start its CUDA provider in a torch-free process, before and after edge-vlm's preload?"""
import sys

import onnx
from onnx import TensorProto, helper

import onnxruntime as ort

g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])],
                      [helper.make_tensor("w", TensorProto.FLOAT, [2, 2], [1, 0, 0, 1])])
m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
m.ir_version = 9
onnx.save(m, "/tmp/probe.onnx")
print("onnxruntime", ort.__version__, ort.__file__, ort.get_available_providers())
so = ort.SessionOptions(); so.log_severity_level = 3
s = ort.InferenceSession("/tmp/probe.onnx", so, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
print("without preload:", s.get_providers(), "torch imported:", "torch" in sys.modules)
from edge_vlm.runtime.device import load_cuda_libraries  # noqa: E402

load_cuda_libraries(["CUDAExecutionProvider"])
s = ort.InferenceSession("/tmp/probe.onnx", so, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
print("after edge-vlm preload:", s.get_providers())
