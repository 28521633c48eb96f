"""A description of the machine a benchmark ran on: figures mean nothing without it."""
from __future__ import annotations

import os
import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

PACKAGES = ("edge-vlm", "torch", "transformers", "onnxruntime", "onnxruntime-gpu", "llama_cpp_python", "gguf",
            "numpy", "bitsandbytes", "gptqmodel", "tokenizers")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def total_ram_bytes() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else None


def available_ram_bytes() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
    return None


def gpu_names() -> list[str]:
    try:
        import pynvml

        pynvml.nvmlInit()
        return [pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i))
                for i in range(pynvml.nvmlDeviceGetCount())]
    except Exception:  # no NVML library, no driver or no GPU: a CPU machine
        return []


def versions(packages=PACKAGES) -> dict:
    """Installed versions of `packages` (those not installed are left out)."""
    out = {}
    for pkg in packages:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def describe() -> dict:
    ram = total_ram_bytes()
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "ram_gib": round(ram / 2**30, 1) if ram else None,
            "gpus": gpu_names(), "python": platform.python_version(), "os": platform.platform(),
            "packages": versions(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
