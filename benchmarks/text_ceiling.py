"""How well can the frozen LLM answer when it is told what the image holds? The built-in model's accuracy
is bounded by what SmolLM2-135M does with perfect perception. This puts the truth as words where the image
tokens go ("<Img>a red circle</Img> is there not a blue shape?") and, at the answer position, compares the
LLM's scores for the possible answers only (yes/no; the 8 colours; the 3 shapes), so that the free-text
format the untrained prompt gives ("The shape is...") does not count against it. By question kind, on the
held-out drawn-shapes questions, with yes/no split by negation.

    python benchmarks/text_ceiling.py --images 200
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, machine, write_json  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--seed", type=int, default=20261130)
    a = ap.parse_args()

    import numpy as np
    import torch

    from edge_vlm.drawn_shapes import COLOURS, SHAPES, DrawnConfig, draw, questions
    from edge_vlm.eval import question_kind
    from edge_vlm.families import load_source

    src = load_source("nano")
    tok, llm = src.tokenizer, src.llm
    options = {"yes/no": ["yes", "no"], "color": list(COLOURS), "shape": list(SHAPES)}
    first = {a: tok(a, add_special_tokens=False).input_ids[0] for v in options.values() for a in v}
    cfg = DrawnConfig(images=a.images, seed=a.seed)
    rng = np.random.default_rng(cfg.seed)
    stats, records = {}, []
    for _ in range(cfg.images):
        _, shape, colour = draw(rng, cfg)
        for q, ans in questions(rng, shape, colour, cfg.questions_per_image):
            before, after = src.prompt.render(q)
            ids = tok(before + f"a {colour} {shape}" + after, add_special_tokens=False, return_tensors="pt").input_ids
            with torch.no_grad():
                logits = llm(ids).logits[0, -1]
            kind = question_kind(ans)
            cands = options[kind]
            got = max(cands, key=lambda c: float(logits[first[c]]))
            if kind == "yes/no":
                kind += " (negated)" if (" not " in f" {q} " or " no " in f" {q} ") else " (plain)"
            s = stats.setdefault(kind, [0, 0])
            s[0] += got == ans
            s[1] += 1
            records.append([q, ans, got])
    by_kind = {k: round(c / n, 4) for k, (c, n) in stats.items()}
    total = sum(c for c, _ in stats.values()) / sum(n for _, n in stats.values())
    data = {"benchmark": "frozen LLM told the truth in words, answers scored among the candidates", "command": f"python benchmarks/text_ceiling.py "
            f"--images {a.images}", "machine": machine(), "accuracy": round(total, 4), "by_kind": by_kind,
            "records": records}
    write_json("nano-text-ceiling", data)
    print(json.dumps({k: data[k] for k in ("accuracy", "by_kind")}))


if __name__ == "__main__":
    main()
