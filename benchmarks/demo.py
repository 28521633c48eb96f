"""`make demo`: the built-in model answers questions about real easy-VQA test images and about shapes drawn by
another procedure (edge_vlm/drawn_shapes.py) from a 4-bit bundle (streamed), then bundle and fp32 torch reference
are scored on the same easy-VQA questions."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--limit", type=int, default=200)
    a = ap.parse_args()
    from edge_vlm.logs import quiet_third_party_logs

    quiet_third_party_logs()  # as the CLI does: our output only (EDGE_VLM_VERBOSE=1 keeps the rest)

    from edge_vlm.data import load_questions, normalize_answer
    from edge_vlm.eval import EvalConfig, evaluate
    from edge_vlm.runtime.pipeline import Pipeline, RuntimeConfig

    # a few questions of each kind, in the test split's fixed order: shown right or wrong, as they come
    pool = load_questions("easy-vqa", "test", limit=60)
    kinds = {"shape": lambda q: q.answer in ("circle", "rectangle", "triangle"),
             "colour": lambda q: q.text.startswith("what") and q.answer not in ("circle", "rectangle", "triangle"),
             "yes/no": lambda q: q.answer in ("yes", "no")}
    qs = [q for test in kinds.values() for q in [q for q in pool if test(q)][:2]]
    import tempfile

    from edge_vlm.drawn_shapes import DrawnConfig, write

    # and two images easy-VQA's renderer did not draw (a seed no training or validation used), 3 questions each
    drawn = write(Path(tempfile.mkdtemp(prefix="edge-vlm-demo-")), DrawnConfig(images=2, seed=31337))
    qs += load_questions(str(drawn), "", None)
    with Pipeline.load(a.bundle, RuntimeConfig(device="auto")) as p:
        for note in p.device.notes:
            print(note)
        for q in qs:
            print(f"\nimage {q.image}\nQ: {q.text}\nA: ", end="", flush=True)
            r = p.answer(q.image, q.text, on_piece=lambda s: print(s, end="", flush=True))
            mark = "right" if normalize_answer(r.text) == q.answer else "WRONG"
            print(f"   [{mark}: expected {q.answer!r}; first token after {r.timings_ms['ttft_ms']:.0f} ms]")
    print(f"\nscoring on the first {a.limit} questions of easy-VQA test (fixed seeded order)...")
    rows = []
    for target in ("nano", a.bundle):
        r = evaluate(EvalConfig(target=target, limit=a.limit))
        rows.append((r["target"] if r["kind"] == "bundle" else "fp32 torch reference", r))
    print("\n| model | exact-match accuracy | questions |\n|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['accuracy']:.1%} | {r['n']} |")


if __name__ == "__main__":
    main()
