"""`edge-vlm plan`: resolve the model and device, run the memory model, format a table."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from edge_vlm.plan.advise import Fit, candidates, fit, suggest
from edge_vlm.plan.devices import DEVICES, get_device
from edge_vlm.errors import BadInput
from edge_vlm.plan.memory import BLOCK_BITS, GIB, MB, RunChoice
from edge_vlm.plan.shapes import ModelShape, from_bundle, from_family_shape, from_source

COLUMNS = ("vision weights", "vision activations", "llm weights", "kv cache", "compute buffers", "load transient",
           "cpu repack", "runtime", "cuda context", "onnxruntime cuda")
SHORT = {"vision weights": "vision", "vision activations": "vis act", "llm weights": "LLM", "kv cache": "KV",
         "compute buffers": "compute", "load transient": "load", "cpu repack": "repack", "runtime": "runtime", "cuda context": "CUDA",
         "onnxruntime cuda": "ORT CUDA"}
HF_ARCH = {"llama": "llama", "phi2": "tinygpt_v_phi"}  # planner arch -> the model_type backends declare


def resolve_model(model: str) -> ModelShape:
    from edge_vlm.families.synth import SHAPES

    if (Path(model) / "manifest.json").is_file():
        return from_bundle(Path(model))
    if model in SHAPES:
        return from_family_shape(model)
    return from_source(model)


def auto_backend(arch: str, bits: int) -> str | None:
    """What `export --backend auto` would pick for this architecture and bits (installed or not)."""
    from edge_vlm.backends import BACKENDS

    for b in BACKENDS.values():
        if bits in b.bits and (b.archs is None or HF_ARCH.get(arch, arch) in b.archs):
            return b.name
    return None


def device_table() -> tuple[list, str]:
    rows = [d.__dict__ | {"usable_gib": round(d.usable_bytes / GIB, 2)} for d in DEVICES.values()]
    lines = [f"{'device':<22} {'kind':<8} {'memory':>7} {'usable':>7} {'GB/s':>6}  source"]
    for d in DEVICES.values():
        lines.append(f"{d.name:<22} {d.kind:<8} {d.memory_gb:>4g} GiB {d.usable_bytes / GIB:>4.1f} GiB "
                     f"{d.bandwidth_gb_s or '':>6}  {d.source}")
    lines.append("cpu:N                  cpu      N GiB RAM (1 GiB kept for the OS)")
    return rows, "\n".join(lines)


def vision_precisions_for(device, vision_device: str) -> tuple[str, ...]:
    """The vision precisions edge-vlm exports for where the vision model runs: int8 is a CPU format (onnxruntime's
    CUDA provider has no integer kernels for it), fp16 saves memory only where it computes in fp16 (a GPU)."""
    on_cpu = device.kind == "cpu" or (device.kind == "gpu" and vision_device == "cpu")
    return ("fp32", "int8") if on_cpu else ("fp32", "fp16")


def plan_rows(shape: ModelShape, device, a) -> tuple[list[Fit], list[RunChoice]]:
    if shape.bundle:
        b = shape.bundle
        bits = b["bits"] or 16
        req = [RunChoice(b["backend"], bits, a.vision_precision or b["vision_precision"], a.context, a.images,
                         vision_on_cpu=a.vision_device == "cpu")]
        options = candidates(shape, {bits: b["backend"]}, a.context, a.images)
        lower = {x: auto_backend(shape.llm.arch, x) for x in (8, 4) if x < bits}
        options += candidates(replace(shape, bundle={}), {k: v for k, v in lower.items() if v}, a.context, a.images)
        return [fit(shape, device, c) for c in req], options
    bits_list = [a.bits] if a.bits else [16, 8, 4]
    if a.backend:
        from edge_vlm.backends import BACKENDS

        if a.backend not in BACKENDS:
            raise BadInput(f"--backend {a.backend!r}: use one of {', '.join(BACKENDS)}")
        b = BACKENDS[a.backend]
        if b.archs is not None and HF_ARCH.get(shape.llm.arch, shape.llm.arch) not in b.archs:
            raise BadInput(f"--backend {a.backend} cannot take {shape.name}'s {shape.llm.arch} LLM ({b.arch_note})")
        bits_list = [x for x in bits_list if x in b.bits]
        if not bits_list:
            raise BadInput(f"--backend {a.backend} has {'/'.join(map(str, b.bits))} bits, not {a.bits}")
    backends = {x: a.backend or auto_backend(shape.llm.arch, x) for x in bits_list}
    backends = {x: v for x, v in backends.items() if v and (v, x) in BLOCK_BITS}
    if not backends:
        raise BadInput(f"no backend takes {shape.name}'s {shape.llm.arch} LLM at {a.bits} bits")
    precisions = (a.vision_precision,) if a.vision_precision else vision_precisions_for(device, a.vision_device)
    req = [RunChoice(be, x, vp, a.context, a.images, vision_on_cpu=a.vision_device == "cpu")
           for x, be in backends.items() for vp in precisions]
    all_bits = {x: a.backend or auto_backend(shape.llm.arch, x) for x in (16, 8, 4)}
    options = candidates(shape, {k: v for k, v in all_bits.items() if v}, a.context, a.images,
                         vision_precisions_for(device, a.vision_device))
    return [fit(shape, device, c) for c in req], options


def plan_command(a) -> tuple[dict, str]:
    if a.devices:
        rows, text = device_table()
        return {"devices": rows}, text
    if a.context < 1 or a.images < 0:
        raise BadInput("--context must be at least 1 and --images at least 0")
    device = get_device(a.device, a.reserve)
    shape = resolve_model(a.model)
    fits, options = plan_rows(shape, device, a)
    kind = {"gpu": "VRAM", "unified": "unified memory", "cpu": "RAM"}[device.kind]
    head = (f"{shape.name} on {device.title}: {device.usable_bytes / GIB:.2f} GiB of {kind} usable "
            f"({device.memory_gb:g} GiB - {device.reserved_gb:g} GiB reserved); n_ctx {a.context}, {a.images} image(s) "
            f"x {shape.vision.image_tokens} image tokens; LLM {shape.llm.arch} {shape.llm.params / 1e9:.2f} B params"
            + (f", vision {shape.vision.params / 1e6:.0f} M params" if shape.vision.params else ""))
    cols = [c for c in COLUMNS if any(x.name == c for f in fits for x in f.components)]
    lines = [head, "", f"{'configuration':<28}" + "".join(f"{SHORT[c]:>9}" for c in cols) +
             f"{'needs':>10}{'fits':>6}{'room':>10}", " " * 28 + "".join(f"{'MiB':>9}" for _ in cols) +
             f"{'GiB':>10}{'':>6}{'GiB':>10}"]
    for f in fits:
        by = {x.name: x.bytes for x in f.components}
        c = f.choice
        name = ("torch fp32" if c.backend == "torch" else f"{c.backend} {c.bits}-bit") + f", vision {c.vision_precision}" \
            + (" (CPU)" if c.vision_on_cpu else "")
        lines.append(f"{name:<28}" + "".join(f"{by.get(col, 0) / MB:>9.0f}" for col in cols) +
                     f"{f.needed / GIB:>10.2f}{'yes' if f.fits else 'NO':>6}{f.room / GIB:>10.2f}")
    if device.kind == "gpu":
        lines.append(f"(GPU: 'needs' counts what lives in VRAM; Python, the libraries and whatever runs on the CPU "
                     f"take {fits[0].host_only / GIB:.2f} GiB of host RAM besides)")
    best = next((f for f in fits if f.fits), None)
    if best is None or best is fits[0]:
        advice = suggest(shape, device, fits[0], options)
    else:
        c = best.choice
        r = fits[0].choice
        advice = (f"{r.backend} {r.bits}-bit with an {r.vision_precision} vision model does not fit (needs "
                  f"{fits[0].needed / GIB:.2f} GiB); the most faithful that fits is {c.backend} {c.bits}-bit with an "
                  f"{c.vision_precision} vision model (export --vision-precision {c.vision_precision}): "
                  f"{suggest(shape, device, best, options)}")
    lines += ["", advice]
    out = {"model": shape.name, "device": device.__dict__ | {"usable_gib": round(device.usable_bytes / GIB, 2)},
           "context": a.context, "images": a.images, "llm": shape.llm.to_dict() | {"params": shape.llm.params},
           "vision_params": shape.vision.params, "image_tokens": shape.vision.image_tokens,
           "configurations": [f.to_dict() for f in fits], "advice": advice}
    return out, "\n".join(lines)
