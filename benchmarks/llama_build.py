"""Speed of two llama-cpp-python builds on the same GGUF, interleaved in one run (one thread).

    PYTHONPATH=/path/to/other/site-packages python benchmarks/llama_build.py --label other ...

runs in a subprocess per build, so each imports its own llama_cpp: `--build LABEL=SITE_PACKAGES` (an
empty SITE_PACKAGES: this venv's own). Prefill of --prompt-tokens tokens and --decode-tokens greedy
steps, medians of --runs, with the CPU backend each build loaded (variant builds choose at run time).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r'''
import json, sys, time, numpy as np
from edge_vlm.runtime.llm_gguf import LlamaCppSession, LlamaCppConfig
gguf, n_prompt, n_decode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = LlamaCppSession(gguf, LlamaCppConfig(n_ctx=1024, n_threads=1))
backend = sorted({ln.split()[-1].rsplit("/", 1)[-1] for ln in open("/proc/self/maps") if "libggml-cpu" in ln})
ids = (s.tokenize("The quick brown fox jumps over the lazy dog. " * 64, False))[:n_prompt]
s.reset(); s.eval_tokens(ids[:16]); s.eval_tokens([int(np.argmax(s.logits()))])  # warm-up
s.reset(); t = time.perf_counter(); s.eval_tokens(ids); pp = n_prompt / (time.perf_counter() - t)
t = time.perf_counter()
for _ in range(n_decode):
    s.eval_tokens([int(np.argmax(s.logits()))])
tg = n_decode / (time.perf_counter() - t)
import llama_cpp
print(json.dumps({"prefill_tok_s": pp, "decode_tok_s": tg, "backend": backend,
                  "system_info": llama_cpp.llama_print_system_info().decode().strip()}))
'''


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gguf")
    ap.add_argument("--build", action="append", required=True, help="LABEL=SITE_PACKAGES (empty: this venv)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    a = ap.parse_args()
    builds = [b.split("=", 1) for b in a.build]
    runs = {label: [] for label, _ in builds}
    for _ in range(a.runs):
        for label, site in builds:  # interleaved: drift on a shared machine hits every build alike
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (site, os.environ.get("PYTHONPATH", "")) if p))
            out = subprocess.run([sys.executable, "-c", CHILD, a.gguf, str(a.prompt_tokens), str(a.decode_tokens)],
                                 env=env, capture_output=True, text=True, check=True)
            runs[label].append(json.loads(out.stdout.strip().splitlines()[-1]))
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    result = {"cpu": cpu, "cores": os.cpu_count(), "gguf": a.gguf, "runs": a.runs, "builds": {}}
    print(f"{cpu}, 1 thread, {a.prompt_tokens}-token prefill, {a.decode_tokens} decode steps, median of {a.runs}")
    for label, rs in runs.items():
        pp = statistics.median(r["prefill_tok_s"] for r in rs)
        tg = statistics.median(r["decode_tok_s"] for r in rs)
        result["builds"][label] = {"prefill_tok_s": pp, "decode_tok_s": tg, "backend": rs[0]["backend"],
                                   "system_info": rs[0]["system_info"]}
        print(f"  {label:12s} prefill {pp:7.1f} tok/s   decode {tg:6.1f} tok/s   {', '.join(rs[0]['backend']) or '?'}")
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
