"""How well can the frozen LLM answer when it is told what the image holds? The built-in model trains only
its projection, so its accuracy is bounded by what SmolLM2-135M does with perfect perception. This puts
the truth as words where the image tokens go ("<Img>a red circle</Img> is there not a blue shape?") and
scores greedy answers by question kind on the held-out drawn-shapes questions.

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

    from edge_vlm.data import normalize_answer
    from edge_vlm.drawn_shapes import DrawnConfig, draw, questions
    from edge_vlm.eval import question_kind
    from edge_vlm.families import load_source

    src = load_source("nano")
    tok, llm = src.tokenizer, src.llm
    cfg = DrawnConfig(images=a.images, seed=a.seed)
    rng = np.random.default_rng(cfg.seed)
    stats, records = {}, []
    for _ in range(cfg.images):
        _, shape, colour = draw(rng, cfg)
        for q, ans in questions(rng, shape, colour, cfg.questions_per_image):
            before, after = src.prompt.render(q)
            ids = tok(before + f"a {colour} {shape}" + after, add_special_tokens=False, return_tensors="pt").input_ids
            with torch.no_grad():
                out = llm.generate(ids, max_new_tokens=4, do_sample=False)
            got = normalize_answer(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
            kind = question_kind(ans)
            s = stats.setdefault(kind, [0, 0])
            s[0] += got == ans
            s[1] += 1
            records.append([q, ans, got])
    by_kind = {k: round(c / n, 4) for k, (c, n) in stats.items()}
    total = sum(c for c, _ in stats.values()) / sum(n for _, n in stats.values())
    data = {"benchmark": "frozen LLM told the truth in words", "command": f"python benchmarks/text_ceiling.py "
            f"--images {a.images}", "machine": machine(), "accuracy": round(total, 4), "by_kind": by_kind,
            "records": records}
    write_json("nano-text-ceiling", data)
    print(json.dumps({k: data[k] for k in ("accuracy", "by_kind")}))


if __name__ == "__main__":
    main()
