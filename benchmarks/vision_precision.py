"""The vision model (encoder + connector) at each precision: file size, vision ms, peak RSS and the cosine of
the image embeddings against the torch fp32 stack on held-out images, for one source.

    python benchmarks/vision_precision.py nano --name vision-precision-nano
    python benchmarks/vision_precision.py /work/synth/tinygpt-v --name vision-precision-tinygpt-v --runs 5
    python benchmarks/vision_precision.py nano --static --name ...   # also static (QDQ) int8, which edge-vlm does not offer

Each precision is made by the exporter's own code (edge_vlm/export/vision_precision.py) from one fp32 ONNX
export. Timing: one process per precision, each holding its onnxruntime session; one image per run, the
processes taking turns (interleaved), after two warm-up runs each; medians. Peak RSS is each process's own
(loading included). Results: benchmarks/results/NAME.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, write_json  # noqa: E402

WORKER = r"""
import sys, time, numpy as np, onnxruntime as ort
so = ort.SessionOptions(); so.intra_op_num_threads = int(sys.argv[2]); so.log_severity_level = 3
t0 = time.perf_counter()
s = ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])
load = time.perf_counter() - t0
x = np.load(sys.argv[3])
name = s.get_inputs()[0].name
print(f"ready {load:.3f}", flush=True)
for line in sys.stdin:
    if line.strip() != "run":
        break
    t = time.perf_counter(); s.run(None, {name: x}); print(f"{(time.perf_counter() - t) * 1e3:.3f}", flush=True)
from edge_vlm.bench.worker import peak_rss_mb  # VmHWM: ru_maxrss would carry the parent's peak across exec
print(f"rss {peak_rss_mb():.1f}", flush=True)
"""


def static_int8(src: Path, dst: Path, calibration: list) -> dict:
    """Static activation scales (QDQ), calibrated on the calibration images: measured, not offered."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from edge_vlm.export import vision_precision as vp

    big = not vp._all_inline(vp._load_meta(src))
    typed = dst.with_name(dst.stem + ".typed.onnx")
    quant_pre_process(src, typed, skip_optimization=True, save_as_external_data=big, all_tensors_to_one_file=True,
                      external_data_location=typed.name + ".data")
    name = _input_name(src)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{name: px} for _, px, _ in calibration])

        def get_next(self):
            return next(self.it, None)

    quantize_static(typed, dst, Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    use_external_data_format=big)
    vp._remove(typed)
    return {"method": "int8 weights per output channel, static uint8 activations (QDQ, MinMax over the "
                      f"{len(calibration)} calibration images)"}


def _input_name(path: Path) -> str:
    import onnx

    return onnx.load(str(path), load_external_data=False).graph.input[0].name


def file_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in (path, path.with_name(path.name + ".data")) if p.exists()) / 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", help="built-in name or a source folder (edge-vlm synth output, upstream files)")
    ap.add_argument("--name", required=True)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--static", action="store_true", help="also measure static (QDQ) int8 activations")
    ap.add_argument("--work", default="/tmp/edge-vlm-vision-precision", help="scratch folder for the ONNX files")
    ap.add_argument("--reuse", action="store_true", help="keep the fp32 export already in --work (same source)")
    ap.add_argument("--time-only", action="store_true",
                    help="only the timing phase, over the files and cosines a previous run left in --work")
    a = ap.parse_args()

    if a.time_only:
        return timing(a, json.loads((Path(a.work) / "rows.json").read_text()))
    import torch

    from edge_vlm.export import vision_precision as vp
    from edge_vlm.export.run import _sample_image
    from edge_vlm.export.vision_onnx import VisionOnnxExporter
    from edge_vlm.families import load_source

    torch.set_num_threads(a.threads)
    work = Path(a.work)
    fp32 = work / "vision.fp32.onnx"
    if not (a.reuse and fp32.is_file()):
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    src = load_source(a.source, defer_llm=True)
    t = time.perf_counter()
    if not fp32.is_file():
        VisionOnnxExporter().export(src.vision, src.preprocess.image_size, fp32)
    export_s = time.perf_counter() - t
    print(f"fp32 ONNX exported in {export_s:.0f} s", flush=True)
    cfg = vp.VisionPrecisionConfig("int8", "cpu")
    sets = vp.image_sets(src.vision, src.preprocess, _sample_image(), cfg)
    params = sum(p.numel() for p in src.vision.parameters()) + sum(b.numel() for b in src.vision.buffers())
    src.vision = None
    rows = {}
    makers = {"fp32": None, "fp16 (CPU: cast at load)": lambda s, d: vp.fp16_cast_at_load(s, d),
              "fp16 (CUDA graph, run on the CPU)": lambda s, d: vp.fp16_graph(s, d),
              **{f"int8 dynamic, {w} weights": (lambda w: lambda s, d: vp.int8_dynamic(s, d, weights=w))(w)
                 for w in vp.WEIGHT_FORMATS}}
    if a.static:
        makers["int8 static (QDQ)"] = lambda s, d: static_int8(s, d, sets.calibration)
    for i, (label, make) in enumerate(makers.items()):
        path = fp32 if make is None else work / f"vision.{i}.onnx"
        t = time.perf_counter()
        record = {"method": "fp32"} if make is None else make(fp32, path)
        convert_s = time.perf_counter() - t
        held = vp.cosines(path, sets.held_out, a.threads)
        cal = vp.cosines(path, sets.calibration, a.threads)
        rows[label] = {"path": str(path), "file_mb": round(file_mb(path), 1), "convert_s": round(convert_s, 1),
                       "cosine_held_out": vp.summary(held), "cosine_calibration": vp.summary(cal),
                       "worst_held_out": sorted(held.items(), key=lambda kv: kv[1])[:3], **record}
        print(label, json.dumps({k: v for k, v in rows[label].items() if k != "path"}), flush=True)
    np.save(work / "pixels.npy", sets.held_out[0][1])
    head = {"source": a.source, "vision_params": params, "image_size": sets.held_out[0][1].shape[-1],
            "fp32_export_s": round(export_s, 1), "held_out_images": [n for n, _, _ in sets.held_out],
            "calibration_images": [n for n, _, _ in sets.calibration], "precisions": rows}
    (work / "rows.json").write_text(json.dumps(head))
    # timing in a fresh process: this one has held the torch model and every conversion, and its
    # allocator keeps much of that (a full-size run was killed for memory with six sessions beside it)
    sys.exit(subprocess.call([sys.executable, __file__, a.source, "--name", a.name, "--runs", str(a.runs),
                              "--threads", str(a.threads), "--work", a.work, "--time-only"]))


TIMED = ("fp32", "fp16 (CPU: cast at load)", "fp16 (CUDA graph, run on the CPU)", "int8 dynamic, u8 weights",
         "int8 static (QDQ)")  # the others' cosines are reported; s7/s8 run the same kernels as u8


def timing(a, head: dict) -> None:
    work = Path(a.work)
    rows = head["precisions"]
    pixels = work / "pixels.npy"
    procs = {}
    for label, r in rows.items():  # one process per precision, each loaded before any timing
        if label not in TIMED:
            continue
        p = subprocess.Popen([sys.executable, "-c", WORKER, r["path"], str(a.threads), str(pixels)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        r["load_s"] = float(p.stdout.readline().split()[1])
        procs[label] = p
    times = {k: [] for k in procs}
    for rnd in range(a.runs + 2):
        for label, p in procs.items():
            p.stdin.write("run\n")
            p.stdin.flush()
            ms = float(p.stdout.readline())
            if rnd >= 2:
                times[label].append(ms)
    for label, p in procs.items():
        p.stdin.write("stop\n")
        p.stdin.flush()
        rows[label]["peak_rss_mb"] = float(p.stdout.readline().split()[1])
        p.wait()
        rows[label]["vision_ms"] = round(statistics.median(times[label]), 1)
        rows[label]["vision_ms_runs"] = [round(x, 1) for x in times[label]]
    base = rows["fp32"]["vision_ms"]
    for r in rows.values():
        if "vision_ms" in r:
            r["speedup_vs_fp32"] = round(base / r["vision_ms"], 2)
    out = {**head, "threads": a.threads, "runs": a.runs, "machine": machine(),
           "command": "python " + " ".join(sys.argv).replace(" --time-only", "")}
    params = head["vision_params"]
    write_json(a.name, out)
    cpu = out["machine"].get("cpu", "?")
    lines = [f"# Vision precision: {head['source']} ({params / 1e6:.0f} M parameters, {out['image_size']} px)", "",
             f"{cpu}, {a.threads} threads, {a.runs} interleaved runs after 2 warm-ups, one process per precision; "
             f"`{out['command']}`", "",
             "| precision | file MB | vision ms (median) | vs fp32 | peak RSS MB | cosine held-out mean / min | "
             "cosine calibration mean / min | method |", "|---|---|---|---|---|---|---|---|"]
    for label, r in rows.items():
        h, c = r["cosine_held_out"], r["cosine_calibration"]
        ms = (f"{r['vision_ms']} | {r['speedup_vs_fp32']}x | {r['peak_rss_mb']:.0f}" if "vision_ms" in r
              else "not timed | | ")
        lines.append(f"| {label} | {r['file_mb']} | {ms} | "
                     f"{h['mean']:.5f} / {h['min']:.5f} | {c['mean']:.5f} / {c['min']:.5f} | {r['method']} |")
    (RESULTS / f"{a.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
