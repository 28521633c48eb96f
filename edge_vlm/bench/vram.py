"""Peak GPU memory of a process: NVML's device-wide "used" sampled in a thread (onnxruntime and
llama.cpp allocate outside torch), and torch's own allocator peak where torch runs.

NVML counts every process on the device, so the figure is the rise over the value when the
monitor started; on a shared GPU it is an upper bound. On a machine without NVML (CPU-only,
or Jetson, whose unified memory shows up in RSS instead) both figures are None.
"""
from __future__ import annotations

import sys
import threading


class VramMonitor:
    def __init__(self, device_index: int = 0, interval_s: float = 0.02):
        self.interval = interval_s
        self.peak = self.base = None
        self._stop = threading.Event()
        self._thread = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
        except Exception:  # no nvidia-ml-py, no driver, no GPU
            self._nvml = None

    @property
    def available(self) -> bool:
        return self._nvml is not None

    def _used(self) -> int:
        return int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)

    def start(self) -> "VramMonitor":
        if self.available:
            self.base = self.peak = self._used()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self._used())

    def stop(self) -> dict:
        self._stop.set()
        if self._thread:
            self._thread.join()
            self.peak = max(self.peak, self._used())
        out = {"nvml_peak_mb": round((self.peak - self.base) / 2**20, 1) if self.available else None,
               "torch_max_allocated_mb": None}
        torch = sys.modules.get("torch")  # only where a torch backend ran: never import it for this
        if torch is not None and torch.cuda.is_available():
            out["torch_max_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        return out
