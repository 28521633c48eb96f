"""The planner's answer for the full-size families at 4/8/16 bits on every device in the table:
benchmarks/results/plan-table.{json,md} (the README's "Will it fit?" table).

    python benchmarks/plan_table.py [--context 2048] [--images 1]

Each cell is `edge-vlm plan MODEL --device DEVICE --bits N --vision-precision P` (backend: what `export
--backend auto` picks for the architecture: gguf for the LLaMA families, onnx for TinyGPT-V's Phi-2; P: what
`export` writes by default for that device: fp16 for a GPU or a Jetson (`--device cuda`), fp32 for a CPU).
No weights are needed: the shapes are the families' full-size shapes.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, write_json  # noqa: E402

MODELS = ("minigpt4-7b", "minigpt4-13b", "tinygpt-v")
BITS = (4, 8, 16)


def default_precision(device) -> str:
    from edge_vlm.export.vision_precision import DEFAULT, VisionPrecisionConfig

    target = "cpu" if device.kind == "cpu" else "cuda"
    return VisionPrecisionConfig(None, target).candidates()[0] if DEFAULT[target] == "auto" else DEFAULT[target]


def main(argv=None):
    from edge_vlm.plan.advise import fit
    from edge_vlm.plan.cli import auto_backend
    from edge_vlm.plan.devices import DEVICES
    from edge_vlm.plan.memory import RunChoice
    from edge_vlm.plan.shapes import from_family_shape

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--images", type=int, default=1)
    a = ap.parse_args(argv)
    rows, cells = [], {}
    devs = list(DEVICES.values())
    for name in MODELS:
        shape = from_family_shape(name)
        for bits in BITS:
            be = auto_backend(shape.llm.arch, bits)
            for d in devs:
                vp = default_precision(d)
                f = fit(shape, d, RunChoice(be, bits, vp, a.context, a.images))
                split = fit(shape, d, RunChoice(be, bits, vp, a.context, a.images, vision_on_cpu=True)) \
                    if d.kind == "gpu" else None
                cells[(name, bits, d.name)] = (f, split)
                rows.append({"model": name, "bits": bits, "backend": be, "device": d.name, "vision_precision": vp,
                             "needed_gib": round(f.needed / 2**30, 2), "usable_gib": round(f.usable / 2**30, 2),
                             "fits": f.fits, "room_gib": round(f.room / 2**30, 2),
                             "vision_on_cpu": None if split is None else {
                                 "needed_gib": round(split.needed / 2**30, 2), "fits": split.fits,
                                 "host_ram_gib": round(split.host_only / 2**30, 2)}})
    write_json("plan-table", {"context": a.context, "images": a.images, "machine": machine(), "rows": rows})

    def cell(f, split):
        if f.fits:
            return f"{f.needed / 2**30:.1f} ✅"
        if split is not None and split.fits:
            return f"{f.needed / 2**30:.1f} ❌ → {split.needed / 2**30:.1f} ☑️"
        return f"{f.needed / 2**30:.1f} ❌"

    lines = [f"Predicted peak memory in GiB (n_ctx {a.context}, {a.images} image, the vision model as `export` writes it "
             "by default for the device: fp16 on a GPU or Jetson, fp32 on a CPU): "
             "✅ fits; ❌ does not; → X ☑️ fits with `--vision-device cpu` (the vision model in host RAM, VRAM "
             "for the LLM alone). Usable = memory − reserve (`edge-vlm plan --devices`).", "",
             "| model | LLM | " + " | ".join(d.name for d in devs) + " |", "|" + "---|" * (2 + len(devs))]
    for name in MODELS:
        for bits in BITS:
            f0 = cells[(name, bits, devs[0].name)][0]
            lines.append(f"| {name} | {f0.choice.backend} {bits}-bit | " +
                         " | ".join(cell(*cells[(name, bits, d.name)]) for d in devs) + " |")
    out = Path(__file__).resolve().parent / "results" / "plan-table.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
