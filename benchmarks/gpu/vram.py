"""GPU memory of an onnx CUDA bundle (vision + LLM on the GPU) against the planner's device-side prediction.
Run on the GPU machine: python3 benchmarks/gpu/vram.py OUT_JSON"""
import json, os, subprocess, sys, threading, time
from pathlib import Path

sys.path.insert(0, "tests")
import pynvml

pynvml.nvmlInit()
h = pynvml.nvmlDeviceGetHandleByIndex(0)


def used():
    return pynvml.nvmlDeviceGetMemoryInfo(h).used


def mine():
    try:
        return sum(p.usedGpuMemory or 0 for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h) if p.pid == os.getpid())
    except Exception as e:
        return repr(e)


base = used()
from tiny_models import smollm2_tokenizer, write_tiny_source  # noqa: E402
from edge_vlm.export.run import ExportConfig, run  # noqa: E402

work = Path("/tmp/vram")
tok = smollm2_tokenizer()
rows = []
for llm, bits in (("llama", 16), ("tinygpt_v_phi", 4)):
    src = work / f"src-{llm}"
    if not src.exists():
        write_tiny_source(src, tok, hidden=1024, llm=llm)
    try:
        b = run(ExportConfig(source=str(src), out=str(work / f"{llm}{bits}"), backend="onnx", bits=bits,
                             device="cuda"), progress=False)
    except Exception as e:
        rows.append({"llm": llm, "bits": bits, "export_error": str(e)[:400]}); print(rows[-1], flush=True)
        continue
    plan = subprocess.run([sys.executable, "-m", "edge_vlm.cli", "plan", str(b), "--device", "rtx-4060", "--context",
                           "512", "--json"], capture_output=True, text=True)
    code = f"""
import json, os, sys, threading, time
sys.path.insert(0, 'tests')
import numpy as np, pynvml
pynvml.nvmlInit(); h = pynvml.nvmlDeviceGetHandleByIndex(0)
used = lambda: pynvml.nvmlDeviceGetMemoryInfo(h).used
base = used(); peak = [base]; stop = []
def watch():
    while not stop:
        peak[0] = max(peak[0], used()); time.sleep(0.002)
threading.Thread(target=watch, daemon=True).start()
from PIL import Image
x = np.full((64, 64, 3), 255, np.uint8); x[20:44, 20:44] = (200, 30, 30); Image.fromarray(x).save('/tmp/vram/img.png')
from edge_vlm.runtime.pipeline import Pipeline, RuntimeConfig
from edge_vlm.runtime.sampling import SamplingConfig
with Pipeline.load('{b}', RuntimeConfig(device='cuda', n_ctx=512)) as p:
    loaded = used()
    text = ''.join(p.generate('/tmp/vram/img.png', 'what color is the shape?', SamplingConfig(max_tokens=32)))
    after = used()
    try:
        procs = [(q.pid, q.usedGpuMemory) for q in pynvml.nvmlDeviceGetComputeRunningProcesses(h)]
    except Exception as e:
        procs = repr(e)
    providers = (p.vision.providers, getattr(p.llm, 'device', None))
stop.append(1); time.sleep(0.01)
print(json.dumps(dict(base_mb=base/2**20, loaded_mb=(loaded-base)/2**20, after_gen_mb=(after-base)/2**20,
                      peak_mb=(peak[0]-base)/2**20, procs=procs, providers=str(providers), text=text)))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    rows.append({"llm": llm, "bits": bits, "bundle_mb": sum(f.stat().st_size for f in b.rglob('*') if f.is_file()) / 2**20,
                 "measured": r.stdout.strip().splitlines()[-1] if r.stdout.strip() else None,
                 "stderr": r.stderr[-3000:], "plan": plan.stdout[-6000:], "plan_err": plan.stderr[-1000:]})
    print(json.dumps(rows[-1])[:3000], flush=True)
Path(sys.argv[1]).write_text(json.dumps(rows, indent=1))
