"""Shared bits of the benchmark entry points: machine description and result files."""
from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    """The machine description `edge-vlm bench` records (CPU, cores, RAM, GPUs, versions, date)."""
    from edge_vlm.bench.machine import describe

    return describe()


def write_json(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    p = RESULTS / f"{name}.json"
    p.write_text(json.dumps(data, indent=2) + "\n")
    return p
