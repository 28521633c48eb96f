"""Accuracy of the built-in nano model: fp32 torch reference vs 16-, 8- and 4-bit bundles on the
same easy-VQA test questions, with bundle sizes, and on shapes drawn by the held-out procedure
(edge_vlm/drawn_shapes.py, seed 20261130). Writes benchmarks/results/nano-easyvqa-accuracy.* and
benchmarks/results/nano-drawn-shapes-accuracy.*

    python benchmarks/accuracy_slice.py --limit 1000 --drawn 200
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, machine, write_json  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=1000)
    ap.add_argument("--bundles", default="bundles", help="where the 16/8/4-bit bundles are (re)built")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--drawn", type=int, default=200,
                    help="images of the held-out drawn-shapes set (3 questions each; 0 = skip it)")
    ap.add_argument("--bits", default="16,8,4", help="the --bits bundles measured (comma-separated)")
    ap.add_argument("--extra-quants", default="Q4_1,Q4_0",
                    help="llama.cpp types measured besides --bits 16/8/4 (comma-separated; '' for none)")
    a = ap.parse_args()

    from edge_vlm.eval import EvalConfig, evaluate
    from edge_vlm.export.run import ExportConfig, run
    from edge_vlm.manifest import load_manifest

    import tempfile

    from edge_vlm.drawn_shapes import DrawnConfig, write

    drawn_cfg = DrawnConfig(images=a.drawn)
    drawn = str(write(Path(tempfile.mkdtemp(prefix="drawn-")), drawn_cfg)) if a.drawn else None
    rows, drawn_rows = [], []

    def on_drawn(target):
        return evaluate(EvalConfig(target=target, dataset=drawn, split="", limit=None, threads=a.threads))

    ref = evaluate(EvalConfig(target="nano", limit=a.limit, threads=a.threads))
    rows.append({"model": "fp32 torch reference", "quant": "fp32 (torch)", "bits_per_weight": 32.0,
                 "bundle_mb": None, **_acc(ref)})
    if drawn:
        ref_d = on_drawn("nano")
        drawn_rows.append({**rows[0], **_acc(ref_d)})
    variants = [(f"bundle --bits {b}", {"bits": int(b)}, f"nano-{b}bit") for b in a.bits.split(",") if b]
    variants += [(f"bundle --quant {q}", {"quant": q}, f"nano-{q.lower()}") for q in a.extra_quants.split(",") if q]
    for label, kw, name in variants:
        out = run(ExportConfig(out=f"{a.bundles}/{name}", force=True, threads=a.threads, **kw))
        m = load_manifest(out)
        r = evaluate(EvalConfig(target=str(out), limit=a.limit, threads=a.threads))
        agree = sum(x["output"] == y["output"] for x, y in zip(ref["records"], r["records"])) / len(r["records"])
        rows.append({"model": label, "quant": m.llm.quant.requested,
                     "bits_per_weight": m.llm.quant.bits_per_weight, "tensor_types": m.llm.quant.tensor_types,
                     "bundle_mb": round(sum(f.bytes for f in m.files.values()) / 1e6, 2),
                     "files_mb": {k: round(v.bytes / 1e6, 2) for k, v in m.files.items()},
                     "same_answer_text_as_reference": round(agree, 4), **_acc(r)})
        if drawn:
            r_d = on_drawn(str(out))
            agree = sum(x["output"] == y["output"] for x, y in zip(ref_d["records"], r_d["records"])) / len(r_d["records"])
            drawn_rows.append({**rows[-1], **_acc(r_d), "same_answer_text_as_reference": round(agree, 4)})
    data = {"benchmark": "nano easy-VQA accuracy", "command": f"python benchmarks/accuracy_slice.py --limit {a.limit}"
            + f" --drawn {a.drawn}" + (f" --bits {a.bits}" if a.bits != "16,8,4" else "")
            + (f" --extra-quants '{a.extra_quants}'" if a.extra_quants != "Q4_1,Q4_0" else ""),
            "dataset": "easy-vqa test", "questions": a.limit, "question_order_seed": 0, "machine": machine(),
            "rows": rows}
    write_json("nano-easyvqa-accuracy", data)
    (RESULTS / "nano-easyvqa-accuracy.md").write_text(markdown(data))
    print(markdown(data))
    if drawn:
        n = len(ref_d["records"])
        data_d = {**data, "benchmark": "nano drawn-shapes accuracy (held-out renderer)",
                  "dataset": f"python -m edge_vlm.drawn_shapes OUT --images {a.drawn} --seed {drawn_cfg.seed}",
                  "questions": n, "rows": drawn_rows}
        write_json("nano-drawn-shapes-accuracy", data_d)
        (RESULTS / "nano-drawn-shapes-accuracy.md").write_text(markdown(data_d))
        print(markdown(data_d))


def _negated(question: str) -> bool:
    return bool({"not", "no"} & set(question.lower().replace("?", " ").split()))


def _acc(r):
    misses = [[x["question"], x["answer"], x["output"]] for x in r["records"] if not x["correct"]]
    return {"accuracy": round(r["accuracy"], 4), "correct": r["correct"], "n": r["n"],
            "by_kind": {k: round(v["accuracy"], 4) for k, v in r["by_kind"].items()}, "eval_seconds": r["seconds"],
            "negated_questions": sum(_negated(x["question"]) for x in r["records"]),
            "misses_on_negated_questions": sum(_negated(q) for q, _, _ in misses), "misses": misses}


def markdown(d: dict) -> str:
    ref = d["rows"][0]["accuracy"]
    lines = [f"# {d['benchmark']}", "",
             f"`{d['command']}` on {d['machine']['cpu']} ({d['machine']['cores']} cores), {d['machine']['date']}.",
             f"Same {d['questions']} questions of {d['dataset']} for every row (seeded order {d['question_order_seed']}); "
             "greedy decoding; exact match on the first word of the answer.", "",
             "| model | LLM quant (real bits/weight) | bundle MB | accuracy | Δ vs fp32 (points) | colour | shape | yes/no | same answer as fp32 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        k = r["by_kind"]
        lines.append(f"| {r['model']} | {r['quant']} ({r['bits_per_weight']}) | {r['bundle_mb'] or '—'} | "
                     f"{r['accuracy']:.1%} | {100 * (r['accuracy'] - ref):+.1f} | {k.get('color', 0):.1%} | "
                     f"{k.get('shape', 0):.1%} | {k.get('yes/no', 0):.1%} | "
                     f"{r.get('same_answer_text_as_reference', 1.0):.1%} |")
    r0 = d["rows"][0]
    lines += ["", f"The fp32 reference misses {r0['n'] - r0['correct']} questions; "
                  f"{r0['misses_on_negated_questions']} of them are negated (\"is there not …\", \"is no … present?\"), "
                  f"which are {r0['negated_questions']} of the {r0['n']} questions. Every miss is listed in the JSON."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
