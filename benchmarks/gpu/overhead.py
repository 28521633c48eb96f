"""python3 benchmarks/gpu/overhead.py OUT.json (on a CUDA machine)

What a CUDA process holds before any model: the bare context, onnxruntime's CUDA provider with a trivial model
(default arena, and arena grown by what is asked), and a tiny bundle run with each arena setting."""
import json, subprocess, sys
from pathlib import Path

MEAS = """
import os, pynvml
def mine():
    pynvml.nvmlInit(); h = pynvml.nvmlDeviceGetHandleByIndex(0)
    return sum(p.usedGpuMemory for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h) if p.pid == os.getpid()) / 2**20
"""
CASES = {
    "bare context": """
import ctypes
cu = ctypes.CDLL('libcuda.so.1'); cu.cuInit(0); ctx = ctypes.c_void_p(); cu.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), 0)
cu.cuCtxSetCurrent(ctx); p = ctypes.c_void_p(); cu.cuMemAlloc_v2(ctypes.byref(p), 1 << 20)
""",
    "ort trivial default": """
import numpy as np, onnxruntime as ort
s = ort.InferenceSession('/tmp/probe.onnx', providers=['CUDAExecutionProvider']); s.run(None, {'x': np.ones((2, 2), np.float32)})
""",
    "ort trivial same-as-requested": """
import numpy as np, onnxruntime as ort
s = ort.InferenceSession('/tmp/probe.onnx', providers=[('CUDAExecutionProvider', {'arena_extend_strategy': 'kSameAsRequested'})])
s.run(None, {'x': np.ones((2, 2), np.float32)})
""",
}
BUNDLE = """
import numpy as np, onnxruntime as ort
from PIL import Image
STRAT = %r
if STRAT:
    _IS = ort.InferenceSession
    class IS(_IS):
        def __init__(self, path, so=None, providers=None, **kw):
            names = [p[0] if isinstance(p, tuple) else p for p in providers]
            providers = [(n, {'arena_extend_strategy': STRAT}) if n == 'CUDAExecutionProvider' else n for n in names]
            super().__init__(path, so, providers=providers, **kw)
    ort.InferenceSession = IS
x = np.full((64, 64, 3), 255, np.uint8); x[20:44, 20:44] = (200, 30, 30); Image.fromarray(x).save('/tmp/o.png')
from edge_vlm.runtime.pipeline import Pipeline, RuntimeConfig
from edge_vlm.runtime.sampling import SamplingConfig
with Pipeline.load('/tmp/vram/b', RuntimeConfig(device='cuda', n_ctx=512)) as p:
    loaded = mine()
    ''.join(p.generate('/tmp/o.png', 'what color is the shape?', SamplingConfig(max_tokens=32)))
    print('LOADED', loaded)
"""
sys.path.insert(0, "tests")
subprocess.run([sys.executable, "benchmarks/gpu/probe.py"], capture_output=True)  # writes /tmp/probe.onnx
from tiny_models import smollm2_tokenizer, write_tiny_source  # noqa: E402
from edge_vlm.export.run import ExportConfig, run  # noqa: E402

src = write_tiny_source(Path("/tmp/vram/src"), smollm2_tokenizer(), hidden=1024, llm="tinygpt_v_phi")
run(ExportConfig(source=str(src), out="/tmp/vram/b", backend="onnx", bits=4, device="cuda"), progress=False)
for s in ("kNextPowerOfTwo", "kSameAsRequested"):  # onnxruntime's default, and edge-vlm's since this check
    CASES[f"phi int4 bundle, arena {s}"] = BUNDLE % s
out = {}
for name, code in CASES.items():
    r = subprocess.run([sys.executable, "-c", MEAS + code + "\nprint('MINE', mine())"], capture_output=True, text=True)
    vals = {l.split()[0]: float(l.split()[1]) for l in r.stdout.splitlines() if l.startswith(("MINE", "LOADED"))}
    out[name] = vals or r.stderr[-800:]
    print(name, out[name], flush=True)
Path(sys.argv[1]).write_text(json.dumps(out, indent=1))
