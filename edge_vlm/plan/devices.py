"""The devices `edge-vlm plan --device` knows. One row each, with where its figures come from.

`memory_gb` is the device's memory as vendors quote it, which for these parts is GiB (an "8 GB"
card or module holds 8 x 2^30 bytes); everything the planner prints is GiB.
`reserved_gb` is what the model cannot have: on a desktop GPU the CUDA context and a display
(assumed 0.5 GB, not measured here: this machine has no GPU); on a Jetson the OS and its
services share the same unified memory (assumed 1.5 GB on a headless JetPack); on a CPU
machine the OS and page cache headroom (assumed 1 GB). Override with `--reserve GB`.
`bandwidth_gb_s` is the vendor's peak: decode tokens/s cannot exceed bandwidth / bytes per token.
"""
from __future__ import annotations

from dataclasses import dataclass

from edge_vlm.errors import BadInput


@dataclass(frozen=True)
class Device:
    name: str
    title: str
    kind: str  # gpu: discrete VRAM (the model's weights, KV and buffers live there) | unified: Jetson | cpu
    memory_gb: float
    reserved_gb: float
    bandwidth_gb_s: float | None
    source: str

    @property
    def usable_bytes(self) -> int:
        return int((self.memory_gb - self.reserved_gb) * 2**30)


GEFORCE = "https://www.nvidia.com/en-us/geforce/graphics-cards/"
JETSON = "https://developer.nvidia.com/embedded/jetson-modules (Jetson Orin technical specifications)"
DEVICES = {d.name: d for d in (
    Device("rtx-3060-ti", "GeForce RTX 3060 Ti (8 GB GDDR6)", "gpu", 8, 0.5, 448,
           GEFORCE + "30-series/rtx-3060-3060ti/ (specs: 8 GB GDDR6, 256-bit, 14 Gbps)"),
    Device("rtx-3070", "GeForce RTX 3070 (8 GB GDDR6)", "gpu", 8, 0.5, 448,
           GEFORCE + "30-series/rtx-3070-3070ti/ (specs: 8 GB GDDR6, 256-bit, 14 Gbps)"),
    Device("rtx-4060", "GeForce RTX 4060 (8 GB GDDR6)", "gpu", 8, 0.5, 272,
           GEFORCE + "40-series/rtx-4060-4060ti/ (specs: 8 GB GDDR6, 128-bit, 17 Gbps)"),
    Device("rtx-3060-12gb", "GeForce RTX 3060 (12 GB GDDR6)", "gpu", 12, 0.5, 360,
           GEFORCE + "30-series/rtx-3060-3060ti/ (specs: 12 GB GDDR6, 192-bit, 15 Gbps)"),
    Device("rtx-4060-ti-16gb", "GeForce RTX 4060 Ti 16 GB", "gpu", 16, 0.5, 288,
           GEFORCE + "40-series/rtx-4060-4060ti/ (specs: 16 GB GDDR6, 128-bit, 18 Gbps)"),
    Device("jetson-orin-nano-8gb", "Jetson Orin Nano 8 GB (unified LPDDR5)", "unified", 8, 1.5, 68, JETSON),
    Device("jetson-orin-nx-16gb", "Jetson Orin NX 16 GB (unified LPDDR5)", "unified", 16, 1.5, 102.4, JETSON),
    Device("jetson-agx-orin-32gb", "Jetson AGX Orin 32 GB (unified LPDDR5)", "unified", 32, 1.5, 204.8, JETSON),
    Device("jetson-agx-orin-64gb", "Jetson AGX Orin 64 GB (unified LPDDR5)", "unified", 64, 1.5, 204.8, JETSON),
    Device("cpu-8gb", "CPU only, 8 GB RAM", "cpu", 8, 1.0, None, "a laptop; `cpu:N` for N GB"),
    Device("cpu-16gb", "CPU only, 16 GB RAM", "cpu", 16, 1.0, None, "a laptop; `cpu:N` for N GB"),
)}


def get_device(name: str, reserve_gb: float | None = None) -> Device:
    """A table row, or `cpu:N` / `cpu-Ngb` for a CPU machine with N GB of RAM; `--reserve` overrides."""
    from dataclasses import replace

    key = name.lower()
    if key.startswith("cpu:") or (key.startswith("cpu-") and key.endswith("gb") and key not in DEVICES):
        raw = key[4:].removesuffix("gb")
        try:
            gb = float(raw)
        except ValueError:
            gb = float("nan")
        if not (gb > 0 and gb < 1e6):  # also nan and inf
            raise BadInput(f"--device {name}: write cpu:N with N the RAM in GiB (cpu:24)")
        dev = Device(f"cpu-{raw}gb", f"CPU only, {raw} GB RAM", "cpu", gb, 1.0, None, "given on the command line")
    elif key in DEVICES:
        dev = DEVICES[key]
    else:
        raise BadInput(f"unknown device {name!r}; known: {', '.join(DEVICES)}, or cpu:N (N GB of RAM)")
    if reserve_gb is not None:
        if not 0 <= reserve_gb < dev.memory_gb:
            raise BadInput(f"--reserve {reserve_gb}: must be at least 0 and less than the device's {dev.memory_gb:g} GiB")
        dev = replace(dev, reserved_gb=reserve_gb)
    return dev
