#!/bin/bash
# The GPU checks, as run on a lent H200 (see README.md here). Needs onnxruntime-gpu 1.31.1 and edge-vlm's
# dependencies importable (PYTHONPATH), and writes what it measures under $OUT (default ./gpu-out).
set -u
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
(nvidia-smi; lscpu) > "$OUT/machine.txt" 2>&1
python3 benchmarks/gpu/probe.py > "$OUT/probe.txt" 2>&1; cat "$OUT/probe.txt"
python3 -m pytest -m gpu tests/test_gpu.py -v -p no:cacheprovider -rs > "$OUT/gpu-tests.log" 2>&1
grep -E "PASSED|FAILED|SKIPPED" "$OUT/gpu-tests.log"
python3 benchmarks/gpu/vram.py "$OUT/vram.json" > "$OUT/vram.log" 2>&1
python3 benchmarks/gpu/overhead.py "$OUT/overhead.json" 2>&1 | grep -v Warn | tail -8
python3 benchmarks/int8_kernels.py --threads 1 > "$OUT/int8.txt" 2>&1; tail -10 "$OUT/int8.txt"
