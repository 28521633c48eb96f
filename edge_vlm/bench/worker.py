"""One benchmark target in a fresh process, driven by JSON lines (stdin in, a private pipe out).

    python -m edge_vlm.bench.worker '<TargetSpec as JSON>'

A fresh process per target is what makes its peak RSS mean something: the figure is this
process's RSS high-water mark (VmHWM), loading included. The orchestrator (run.py) sends one request per line:

    {"op": "latency", "image": PATH, "prompt": TEXT, "max_new_tokens": N}
    {"op": "fidelity", "image": PATH, "prompt": TEXT, "n_tokens": N, "teacher": [ids] | null, "out": PREFIX}
    {"op": "answer", "image": PATH, "prompt": TEXT, "max_tokens": N}
    {"op": "exit"}

and reads one JSON object back per request ({"error": ...} when it failed). Everything the
libraries print goes to stderr: the protocol has its own file descriptor.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback
from pathlib import Path

import numpy as np



def peak_rss_mb() -> float:
    """This process's RSS high-water mark. /proc's VmHWM belongs to this program's memory map;
    getrusage's ru_maxrss survives exec and would report the (larger) parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB elsewhere


def current_rss_mb() -> float:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


class Target:
    """A bundle or the torch reference behind one interface: pixels, embed, llm, prompt."""

    def __init__(self, spec: dict):
        self.spec = spec
        t0 = time.perf_counter()
        if spec["kind"] == "bundle":
            from edge_vlm.runtime.pipeline import Pipeline, RuntimeConfig

            self.pipe = Pipeline.load(spec["path"], RuntimeConfig(device=spec["device"], n_ctx=spec["n_ctx"],
                                                                  threads=spec["threads"],
                                                                  vision_device=spec["vision_device"]))
            self.llm, self.prompt = self.pipe.llm, self.pipe.manifest.prompt
            self.pixels = self.pipe.vision.pixels
            self._embed = lambda px: self.pipe.vision.embed_pixels(px)[0]
            self.llm_weight_bytes = self._bundle_llm_bytes()
        else:
            import torch

            from edge_vlm.reference import ReferencePipeline

            if spec["threads"]:
                torch.set_num_threads(spec["threads"])
            self.pipe = ReferencePipeline.load(spec["path"], n_ctx=spec["n_ctx"] or 2048, llm_dtype=spec["llm_dtype"])
            self.llm, self.prompt, self.pixels = self.pipe.llm, self.pipe.prompt, self.pipe.pixels
            self._embed = self.pipe.embed_pixels
            self.llm_weight_bytes = self._torch_llm_bytes()
        self.load_s = time.perf_counter() - t0

    def embed(self, px) -> np.ndarray:
        return self._embed(px)

    def _bundle_llm_bytes(self) -> int:
        """Bytes of LLM weights read per token: the bundle's LLM files minus an untied input-embedding
        table (one row is read per token; onnx keeps it in a separate .npy, not counted at all)."""
        from edge_vlm.manifest import llm_weight_files

        m = self.pipe.manifest
        total = sum(llm_weight_files(m).values())
        try:
            from edge_vlm.plan.memory import input_embedding_bytes
            from edge_vlm.plan.shapes import from_bundle

            shape = from_bundle(Path(self.spec["path"]))
            total -= input_embedding_bytes(shape, m.llm.backend, shape.bundle["bits"] or 16)
        except Exception:  # noqa: BLE001 - an older bundle without shapes: the upper bound (files) stays
            pass
        return total

    def _torch_llm_bytes(self) -> int:
        model = self.pipe.src.llm
        total = sum(p.numel() * p.element_size() for p in model.parameters())
        inp, out = model.get_input_embeddings(), model.get_output_embeddings()
        if out is not None and inp.weight is not out.weight:  # untied: one input row is read per token
            total -= inp.weight.numel() * inp.weight.element_size()
        return total

    def describe(self) -> dict:
        return {"load_s": round(self.load_s, 2), "rss_after_load_mb": round(current_rss_mb(), 1),
                "peak_rss_after_load_mb": round(peak_rss_mb(), 1), "llm_weight_bytes": int(self.llm_weight_bytes),
                "n_ctx": int(self.llm.n_ctx), "n_embd": int(self.llm.n_embd)}

    def close(self):
        self.pipe.close()


def op_latency(t: Target, req: dict) -> dict:
    from edge_vlm.runtime.generate import GenerationStats, generate
    from edge_vlm.runtime.sampling import SamplingConfig

    n = req["max_new_tokens"]
    t0 = time.perf_counter()
    px = t.pixels(req["image"])
    t1 = time.perf_counter()
    emb = t.embed(px)
    t2 = time.perf_counter()
    stats = GenerationStats()
    for _ in generate(t.llm, t.prompt, req["prompt"], emb, SamplingConfig(max_tokens=n), stats, ignore_eos=True):
        pass
    t3 = time.perf_counter()
    prefill_s = stats.prefill_end - t2
    decode_s = stats.end - stats.first_token
    g = stats.generated_tokens
    return {"preprocess_ms": (t1 - t0) * 1e3, "vision_ms": (t2 - t1) * 1e3, "prefill_ms": prefill_s * 1e3,
            "ttft_ms": (stats.first_token - t0) * 1e3, "e2e_ms": (t3 - t0) * 1e3,
            "prefill_tok_s": stats.prompt_tokens / prefill_s if prefill_s > 0 else None,
            "decode_tok_s": (g - 1) / decode_s if g > 1 and decode_s > 0 else None,
            "prompt_tokens": stats.prompt_tokens, "image_tokens": stats.image_tokens, "generated_tokens": g}


def op_fidelity(t: Target, req: dict) -> dict:
    """Image embeddings, free greedy tokens, and logits teacher-forced on `teacher` (the reference's
    tokens; for the reference itself, its own greedy tokens), saved as .npy under `out`."""
    from edge_vlm.runtime.generate import GenerationStats, generate, prefill
    from edge_vlm.runtime.sampling import SamplingConfig

    n = req["n_tokens"]
    emb = t.embed(t.pixels(req["image"]))
    stats = GenerationStats()
    for _ in generate(t.llm, t.prompt, req["prompt"], emb, SamplingConfig(max_tokens=n), stats, ignore_eos=True):
        pass
    tokens = [int(x) for x in stats.tokens]
    teacher = req["teacher"] if req["teacher"] is not None else tokens
    prefill(t.llm, t.prompt, req["prompt"], emb, len(teacher), GenerationStats())
    rows = []
    for i, tok in enumerate(teacher):
        rows.append(np.asarray(t.llm.logits(), np.float32))
        if i + 1 < len(teacher):
            t.llm.eval_tokens([int(tok)])
    np.save(req["out"] + "-vision.npy", np.asarray(emb, np.float32))
    np.save(req["out"] + "-logits.npy", np.stack(rows))
    return {"tokens": tokens, "vision": req["out"] + "-vision.npy", "logits": req["out"] + "-logits.npy"}


def op_answer(t: Target, req: dict) -> dict:
    from edge_vlm.runtime.generate import generate
    from edge_vlm.runtime.sampling import SamplingConfig

    emb = t.embed(t.pixels(req["image"]))
    return {"text": "".join(generate(t.llm, t.prompt, req["prompt"], emb, SamplingConfig(max_tokens=req["max_tokens"])))}


OPS = {"latency": op_latency, "fidelity": op_fidelity, "answer": op_answer}


def _error(e: BaseException) -> dict:
    from edge_vlm.errors import EdgeVLMError

    return {"error": str(e) or type(e).__name__, "type": type(e).__name__,
            "exit_code": e.exit_code if isinstance(e, EdgeVLMError) else 5,
            "trace": "" if isinstance(e, EdgeVLMError) else traceback.format_exc(limit=6)}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = os.fdopen(os.dup(1), "w", buffering=1)  # the protocol's own pipe ...
    os.dup2(2, 1)  # ... and anything a library prints goes to stderr
    send = lambda obj: out.write(json.dumps(obj) + "\n")  # noqa: E731
    spec = json.loads(argv[0])
    from edge_vlm.bench.vram import VramMonitor
    from edge_vlm.logs import quiet_third_party_logs

    quiet_third_party_logs()
    vram = VramMonitor().start() if spec["device"] != "cpu" else None
    try:
        target = Target(spec)
    except BaseException as e:  # noqa: BLE001 - reported to the orchestrator, which raises it
        send(_error(e))
        return 1
    send({"ready": True, **target.describe()})
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "exit":
            target.close()
            vr = vram.stop() if vram else {"nvml_peak_mb": None, "torch_max_allocated_mb": None}
            send({"peak_rss_mb": round(peak_rss_mb(), 1), **vr})
            return 0
        try:
            send(OPS[req["op"]](target, req))
        except Exception as e:  # noqa: BLE001
            send(_error(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
