"""Why some 4-bit types lose accuracy on the built-in model: weight error of each bundle's LLM
against the fp32 reference weights, per tensor type.

The built-in LLM's only available weights are SmolLM2's Q4_1 GGUF, dequantized to fp32 (that
fp32 model *is* the reference). Re-quantizing such weights is a second rounding on top of the
first: a type whose grid contains Q4_1's grid (Q4_1 itself, Q8_0) re-encodes them almost
exactly; a type with a different grid (Q4_0's symmetric grid, Q5_0, k-quants) adds its full error.

    python benchmarks/requant_error.py --bundles bundles
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_json  # noqa: E402


def weights(path: Path) -> dict:
    import gguf

    r = gguf.GGUFReader(str(path))
    return {t.name: (t.tensor_type.name, t) for t in r.tensors if len(t.shape) == 2}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundles", default="bundles")
    ap.add_argument("--names", default="nano-8bit,nano-4bit,nano-q4_1,nano-q4_0")
    a = ap.parse_args()

    import gguf

    from edge_vlm.export.llm_gguf import _permute_rope
    from edge_vlm.families import load_source

    src = load_source("nano")
    c = src.llm.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)
    ref = {}
    for k, t in src.llm.state_dict().items():
        if t.ndim != 2 or k == "lm_head.weight":
            continue
        w = t.float().numpy()
        if k.endswith("q_proj.weight"):
            w = _permute_rope(w, c.num_attention_heads)
        elif k.endswith("k_proj.weight"):
            w = _permute_rope(w, c.num_key_value_heads)
        ref[names.get_name(k, try_suffixes=(".weight",))] = w
    out = {}
    for name in a.names.split(","):
        f = next((Path(a.bundles) / name).glob("llm-*.gguf"))
        per_type, total_err, total_ref = {}, 0.0, 0.0
        for tname, (qtype, t) in weights(f).items():
            w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(ref[tname].shape)
            e = float(((w - ref[tname]) ** 2).sum())
            r = float((ref[tname] ** 2).sum())
            d = per_type.setdefault(qtype, [0.0, 0.0, 0])
            d[0] += e
            d[1] += r
            d[2] += 1
            total_err += e
            total_ref += r
        out[name] = {"relative_rms_error": float(np.sqrt(total_err / total_ref)),
                     "by_type": {k: {"tensors": v[2], "relative_rms_error": float(np.sqrt(v[0] / v[1]))}
                                 for k, v in per_type.items()}}
        print(f"{name}: relative RMS weight error {out[name]['relative_rms_error']:.4f}  " +
              ", ".join(f"{k}: {v['relative_rms_error']:.4f} ({v['tensors']} tensors)" for k, v in out[name]["by_type"].items()))
    write_json("nano-requant-error", {"command": "python benchmarks/requant_error.py --bundles " + a.bundles,
                                      "machine": machine(), "bundles": out})


if __name__ == "__main__":
    main()
