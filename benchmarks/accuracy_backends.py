"""Accuracy and size of the built-in nano model under every LLM backend x {4, 8} bits, next to
the fp32 torch reference, on the same easy-VQA test questions as accuracy_slice.py; GPTQ with
image-conditioned and with text-only calibration. Writes benchmarks/results/nano-backends-accuracy.*

    python benchmarks/accuracy_backends.py                 # all rows (about 1.5 h on 2 cores)
    python benchmarks/accuracy_backends.py --only gptq-4   # some rows; the others are kept

Backends that run through torch on CPU (gptq, bnb: ~0.9 s per question here against ~0.15 s for
gguf) are scored on the first --slow-limit questions of the same seeded order, and every delta
is taken against the fp32 reference on exactly the questions that row answered.
Each row is saved as soon as it is measured, so a long run can be split or resumed.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy_slice import _acc  # noqa: E402
from common import RESULTS, machine, write_json  # noqa: E402

NAME = "nano-backends-accuracy"
ROWS = {  # row id -> export options (None: the fp32 torch reference); measured in this order
    "fp32": None,
    "gguf-4": {"backend": "gguf", "bits": 4},
    "gguf-8": {"backend": "gguf", "bits": 8},
    "onnx-4": {"backend": "onnx", "bits": 4},  # hqq
    "onnx-4-rtn": {"backend": "onnx", "bits": 4, "int4_method": "rtn"},
    "onnx-8": {"backend": "onnx", "bits": 8},
    "gptq-4-image": {"backend": "gptq", "bits": 4, "calibration": "image"},
    "gptq-4-text": {"backend": "gptq", "bits": 4, "calibration": "text"},
    "bnb-4": {"backend": "bnb", "bits": 4},
    "bnb-8": {"backend": "bnb", "bits": 8},
    "gptq-8-image": {"backend": "gptq", "bits": 8, "calibration": "image"},
    "gptq-8-text": {"backend": "gptq", "bits": 8, "calibration": "text"},
}


SLOW_BACKENDS = ("gptq", "bnb")


def measure(row: str, opts, limit: int, bundles: str, threads: int, ref_outputs) -> dict:
    from edge_vlm.eval import EvalConfig, evaluate
    from edge_vlm.export.run import ExportConfig, run
    from edge_vlm.manifest import load_manifest

    if opts is None:
        r = evaluate(EvalConfig(target="nano", limit=limit, threads=threads))
        return {"row": row, "backend": "torch fp32", "bits": 32, "quant": "fp32 (torch)", "bits_per_weight": 32.0,
                "bundle_mb": None, "export_seconds": None, "outputs": [x["output"] for x in r["records"]],
                "correct_flags": "".join("1" if x["correct"] else "0" for x in r["records"]), **_acc(r)}
    t0 = time.perf_counter()
    out = run(ExportConfig(out=f"{bundles}/nano-{row}", force=True, threads=threads, **opts))
    export_s = time.perf_counter() - t0
    m = load_manifest(out)
    r = evaluate(EvalConfig(target=str(out), limit=limit, threads=threads))
    same = (sum(x == y["output"] for x, y in zip(ref_outputs, r["records"])) / len(r["records"])
            if ref_outputs and len(ref_outputs) >= len(r["records"]) else None)
    q = m.llm.quant
    return {"row": row, "backend": m.llm.backend, "bits": opts["bits"], "quant": q.requested,
            "method": q.method,
            "calibration": q.calibration, "group_size": q.group_size,
            "bits_per_weight": q.bits_per_weight, "tensor_types": q.tensor_types,
            "bundle_mb": round(sum(f.bytes for f in m.files.values()) / 1e6, 2),
            "llm_mb": round(sum(f.bytes for k, f in m.files.items() if k != m.vision.file) / 1e6, 2),
            "export_seconds": round(export_s, 1),
            "validation": m.validation.llm.model_dump() if m.validation.llm else None,
            "same_answer_text_as_reference": None if same is None else round(same, 4),
            "outputs": [x["output"] for x in r["records"]],
            "correct_flags": "".join("1" if x["correct"] else "0" for x in r["records"]), **_acc(r)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=1000, help="questions for the fp32 reference, gguf and onnx")
    ap.add_argument("--slow-limit", type=int, default=300, help="questions for gptq and bnb (torch on CPU)")
    ap.add_argument("--bundles", default="bundles")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--only", help="comma-separated row ids or prefixes (e.g. gptq,bnb-4); default: all missing")
    ap.add_argument("--redo", action="store_true", help="re-measure the selected rows even if present")
    a = ap.parse_args()

    path = RESULTS / f"{NAME}.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    rows = {r["row"]: r for r in data.get("rows", [])}
    only = a.only.split(",") if a.only else []
    wanted = [k for k in ROWS if not only or any(k == p if p in ROWS else k.startswith(p) for p in only)]
    for row in wanted:
        limit = a.slow_limit if ROWS[row] and ROWS[row]["backend"] in SLOW_BACKENDS else a.limit
        if row in rows and rows[row]["n"] == limit and not (a.redo or a.only):
            continue
        ref = rows.get("fp32", {}).get("outputs")
        print(f"== {row} ({limit} questions)", file=sys.stderr)
        rows[row] = measure(row, ROWS[row], limit, a.bundles, a.threads, ref)
        data = {"benchmark": "nano easy-VQA accuracy by LLM backend",
                "command": f"python benchmarks/accuracy_backends.py --limit {a.limit} --slow-limit {a.slow_limit}",
                "dataset": "easy-vqa test", "questions": a.limit, "question_order_seed": 0, "machine": machine(),
                "rows": [rows[k] for k in ROWS if k in rows]}
        write_json(NAME, data)
    (RESULTS / f"{NAME}.md").write_text(markdown(data))
    print(markdown(data))


def markdown(d: dict) -> str:
    ref = next((r["correct_flags"] for r in d["rows"] if r["row"] == "fp32"), None)
    lines = [f"# {d['benchmark']}", "",
             f"`{d['command']}` on {d['machine']['cpu']} ({d['machine']['cores']} cores), {d['machine']['date']}.",
             f"easy-VQA test questions in one seeded order (seed {d['question_order_seed']}, the order of "
             "nano-easyvqa-accuracy.md); each row answers the first *n* of them; Δ is against the fp32 reference "
             "on exactly those n questions. Greedy decoding; exact match on the first word.", "",
             "| backend | bits | LLM format (real bits/weight) | GPTQ calibration | bundle MB | n | accuracy | fp32 on "
             "the same n | Δ (points) | colour | shape | yes/no | same answer as fp32 | export s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        k = r["by_kind"]
        base = ref[:r["n"]].count("1") / r["n"] if ref and len(ref) >= r["n"] else None
        delta = f"{100 * (r['accuracy'] - base):+.1f}" if base is not None else "—"
        same = r.get("same_answer_text_as_reference")
        lines.append(f"| {r['backend']} | {r['bits']} | {r.get('method') or r['quant']} ({r['bits_per_weight']}) | "
                     f"{r.get('calibration') or '—'} | {r['bundle_mb'] or '—'} | {r['n']} | {r['accuracy']:.1%} | "
                     f"{'—' if base is None else f'{base:.1%}'} | {delta} | "
                     f"{k.get('color', 0):.1%} | {k.get('shape', 0):.1%} | {k.get('yes/no', 0):.1%} | "
                     f"{'—' if same is None else f'{same:.1%}'} | {r.get('export_seconds') or '—'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
