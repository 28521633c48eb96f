"""A live `edge-vlm serve` on 127.0.0.1 for tests: a real process, a real port, real HTTP."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(bundle: Path, *args: str, ready_s: float = 120.0):
    """Start `edge-vlm serve BUNDLE ARGS` on a free port; yield its base URL ("http://127.0.0.1:PORT")."""
    port = free_port()
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"edge-vlm-serve-{port}.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "edge_vlm.cli", "serve", str(bundle), "--host", "127.0.0.1",
                             "--port", str(port), *args], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_s
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"edge-vlm serve exited with {proc.returncode}:\n{log.read()}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if json.load(r).get("status") == "ready":
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                log.seek(0)
                raise RuntimeError(f"edge-vlm serve not ready after {ready_s} s:\n{log.read()}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
