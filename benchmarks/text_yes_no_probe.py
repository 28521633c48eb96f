"""Can SmolLM2-135M learn to answer yes/no from a description in words? Rank-R adapters on its attention
(edge_vlm/llms/lora.py) are trained on "<Img>a red circle</Img> is there not a blue shape?" -> answer, the truth
in words where the image goes (questions from edge_vlm/drawn_shapes.py, yes/no half true), and scored on 400
held-out yes/no questions (first answer token, teacher-forced), plain and negated apart. Issue 15: if the LLM learns
this from words but not from image tokens, the image tokens are what to change (align --words).

    python benchmarks/text_yes_no_probe.py --steps 50
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, write_json  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--eval-every", type=int, default=50)
    a = ap.parse_args(argv)

    import numpy as np
    import torch

    from edge_vlm.drawn_shapes import COLOURS, SHAPES, questions
    from edge_vlm.families import load_source
    from edge_vlm.llms import lora

    torch.manual_seed(0)
    torch.set_num_threads(2)
    src = load_source("nano")
    tok, llm = src.tokenizer, src.llm
    wrapped = lora.attach(llm, a.rank)

    def sample(rng, n, yes_no_only=False):
        out = []
        while len(out) < n:
            shape, colour = SHAPES[rng.integers(3)], list(COLOURS)[rng.integers(8)]
            for q, ans in questions(rng, shape, colour, 3):
                if yes_no_only and ans not in ("yes", "no"):
                    continue
                before, after = src.prompt.render(q)
                out.append((before + f"a {colour} {shape}" + after, ans, q))
        return out[:n]

    def batch(items):
        ids, labels = [], []
        for prompt, ans, _ in items:
            p = tok(prompt, add_special_tokens=False).input_ids
            t = tok(ans, add_special_tokens=False).input_ids
            ids.append(p + t)
            labels.append([-100] * len(p) + t)
        n = max(map(len, ids))
        mask = torch.tensor([[1] * len(x) + [0] * (n - len(x)) for x in ids])
        pad = tok.pad_token_id or 0
        return (torch.tensor([x + [pad] * (n - len(x)) for x in ids]),
                torch.tensor([x + [-100] * (n - len(x)) for x in labels]), mask)

    held_out = sample(np.random.default_rng(99), 400, yes_no_only=True)

    def score():
        llm.eval()
        stats = {}
        with torch.no_grad():
            for s in range(0, len(held_out), 50):
                items = held_out[s:s + 50]
                ids, labels, mask = batch(items)
                logits = llm(input_ids=ids, attention_mask=mask).logits
                for b, (_, _, q) in enumerate(items):
                    pos = int((labels[b] != -100).nonzero()[0])
                    kind = "negated" if (" not " in f" {q} " or " no " in f" {q} ") else "plain"
                    st = stats.setdefault(kind, [0, 0])
                    st[0] += int(logits[b, pos - 1].argmax()) == int(labels[b, pos])
                    st[1] += 1
        llm.train()
        return {k: round(c / n, 3) for k, (c, n) in sorted(stats.items())}

    evals = [{"step": 0, "yes_no": score()}]
    print(evals[-1], flush=True)
    opt = torch.optim.AdamW(lora.trainable(wrapped), lr=a.lr)
    rng = np.random.default_rng(0)
    t0 = time.time()
    for step in range(1, a.steps + 1):
        ids, labels, mask = batch(sample(rng, a.batch))
        logits = llm(input_ids=ids, attention_mask=mask).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                                 ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % a.eval_every == 0 or step == a.steps:
            evals.append({"step": step, "loss": round(loss.item(), 3), "yes_no": score(),
                          "seconds": round(time.time() - t0)})
            print(evals[-1], flush=True)
    cmd = " ".join(["python benchmarks/text_yes_no_probe.py"] + (argv if argv is not None else sys.argv[1:]))
    write_json("nano-text-yes-no-probe", {"benchmark": "adapters learn yes/no from the truth in words",
                                          "command": cmd, "machine": machine(), "evals": evals})


if __name__ == "__main__":
    main()
