"""Does a configuration fit a device, with how much room, and what to choose when it does not."""
from __future__ import annotations

from dataclasses import dataclass, replace

from edge_vlm.plan.devices import Device
from edge_vlm.plan.memory import GIB, MB, Component, RunChoice, components, total
from edge_vlm.plan.shapes import ModelShape

CONTEXTS = (4096, 2048, 1024, 512)


@dataclass
class Fit:
    choice: RunChoice
    components: list[Component]
    needed: int  # bytes counted against the device's usable memory
    usable: int
    host_only: int  # gpu devices: what stays in host RAM (not counted against VRAM)

    @property
    def fits(self) -> bool:
        return self.needed <= self.usable

    @property
    def room(self) -> int:
        return self.usable - self.needed

    def to_dict(self) -> dict:
        return {"choice": self.choice.__dict__, "needed_mb": round(self.needed / MB), "usable_mb": round(self.usable / MB),
                "room_mb": round(self.room / MB), "fits": self.fits, "host_ram_mb": round(self.host_only / MB),
                "components": [{"name": x.name, "mb": round(x.bytes / MB, 1), "on_device": x.on_device,
                                "note": x.note} for x in self.components]}


def fit(shape: ModelShape, device: Device, c: RunChoice) -> Fit:
    c = replace(c, on_gpu=device.kind in ("gpu", "unified"), vision_on_cpu=c.vision_on_cpu and device.kind == "gpu")
    comps = components(shape, c)
    if device.kind == "gpu":  # discrete VRAM: the model's tensors; Python and libraries stay in host RAM
        return Fit(c, comps, total(comps, "device"), device.usable_bytes, total(comps, "host"))
    return Fit(c, comps, total(comps), device.usable_bytes, 0)  # unified (Jetson) and CPU: one pool


def candidates(shape: ModelShape, backends: dict[int, str], n_ctx: int, images: int,
               vision_precisions=("fp32",), vision_cpu=(False, True)) -> list[RunChoice]:
    """In order of preference: the requested context before smaller ones (a user asked for it), then
    more bits, full vision precision, the vision model on the GPU before the CPU (only discrete GPUs
    gain from moving it)."""
    min_ctx = shape.vision.image_tokens * images + 256
    ctxs = [n_ctx] + [x for x in CONTEXTS if x < n_ctx and x >= min_ctx]
    return [RunChoice(backends[b], b, vp, ctx, images, vision_on_cpu=vc) for ctx in ctxs
            for b in sorted(backends, reverse=True) for vp in vision_precisions for vc in vision_cpu]


def suggest(shape: ModelShape, device: Device, requested: Fit, options: list[RunChoice]) -> str:
    if requested.fits:
        return (f"fits: needs {requested.needed / GIB:.2f} GiB of {requested.usable / GIB:.2f} GiB usable on "
                f"{device.title}, {requested.room / GIB:.2f} GiB to spare")
    for c in options:
        f = fit(shape, device, c)
        if f.fits:
            changes = []
            if (c.backend, c.bits) != (requested.choice.backend, requested.choice.bits):
                changes.append(f"--backend {c.backend} --bits {c.bits}")
            if c.n_ctx != requested.choice.n_ctx:
                changes.append(f"--n-ctx {c.n_ctx}")
            if c.vision_on_cpu and not requested.choice.vision_on_cpu:
                changes.append("--vision-device cpu (the vision model in host RAM)")
            if c.vision_precision != requested.choice.vision_precision:
                changes.append(f"an {c.vision_precision} vision model (export --vision-precision {c.vision_precision})")
            return (f"does not fit: needs {requested.needed / GIB:.2f} GiB, {device.title} has "
                    f"{requested.usable / GIB:.2f} GiB usable. Choose {' and '.join(changes)}: "
                    f"{f.needed / GIB:.2f} GiB, {f.room / GIB:.2f} GiB to spare")
    smallest = min((fit(shape, device, c) for c in options), key=lambda f: f.needed, default=requested)
    return (f"does not fit: needs {requested.needed / GIB:.2f} GiB, {device.title} has {requested.usable / GIB:.2f} GiB "
            f"usable, and even {smallest.choice.label()} needs {smallest.needed / GIB:.2f} GiB: choose a device "
            f"with more memory")
