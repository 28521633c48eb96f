"""Can the built-in model learn to answer yes/no from the image? Continues a trained projection (by default the
recorded MLP run, benchmarks/results/align-mlp-mixed/) for a few hundred steps, optionally with low-rank adapters
on SmolLM2's layers (edge_vlm/llms/lora.py) and with easy-VQA's yes/no answers balanced per wording
(align.balance_yes_no), and scores the teacher-forced answer word by question kind on the seed-7 drawn-shapes
validation set and held-out easy-VQA train images, before, midway and at the end; then yes/no by wording.

    python benchmarks/yes_no_lora.py --steps 300 --rank 8 --out runs/yes-no-lora8
    python benchmarks/yes_no_lora.py --steps 300 --rank 8 --balance --out runs/yes-no-lora8-balanced
    python benchmarks/yes_no_lora.py --steps 300 --rank 16 --lora-lr 1e-3 --balance \
        --targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj --out runs/yes-no-lora16-mlp

Uses align's feature cache (--cache-dir, as `edge-vlm align` made it). Results: results/NAME.json.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, write_json  # noqa: E402

HERE = Path(__file__).resolve().parent


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rank", type=int, default=8, help="adapter rank (0: the projection alone)")
    ap.add_argument("--lora-lr", type=float, default=5e-4)
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    ap.add_argument("--balance", action="store_true", help="balance easy-VQA's yes/no answers per wording")
    ap.add_argument("--init", default=str(HERE / "results/align-mlp-mixed/projection.safetensors"))
    ap.add_argument("--cache-dir", default=".cache/align")
    ap.add_argument("--out", required=True)
    ap.add_argument("--name", default=None, help="results name (default: yes-no-<out folder name>)")
    a = ap.parse_args(argv)

    import numpy as np
    import torch
    from safetensors.torch import load_file, save_file

    from edge_vlm import align
    from edge_vlm.align import FEATURE_DIM, AlignConfig, _Batcher, _order, _stack, _training_sets, yes_no_wording
    from edge_vlm.eval import question_kind
    from edge_vlm.families import nano, resolve_source
    from edge_vlm.llms import lora

    torch.manual_seed(0)
    torch.set_num_threads(2)
    cfg = AlignConfig(cache_dir=a.cache_dir, concat=4, projector="mlp2x_gelu", steps=a.steps,
                      balance_yes_no=a.balance)
    root = resolve_source("nano")
    src = nano.load(root, json.loads((root / "edge-vlm-source.json").read_text()), with_projection=False)
    feats, sets = _training_sets(cfg, src, root)
    batchers = {k: _Batcher(src, v) for k, v in sets.items()}
    proj = nano.build_projector("mlp2x_gelu", FEATURE_DIM * 4, src.llm.config.hidden_size)
    proj.load_state_dict(load_file(a.init))
    llm = src.llm
    wrapped = lora.attach(llm, a.rank, tuple(a.targets.split(","))) if a.rank else {}
    groups = [{"params": list(proj.parameters()), "lr": 3e-4}]
    if wrapped:
        groups.append({"params": lora.trainable(wrapped), "lr": a.lora_lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (
        1 + math.cos(math.pi * min(s, a.steps) / a.steps)))
    rng = np.random.default_rng(0)
    n_gen = n_easy = 8
    order_easy = _order(rng, len(batchers["easy"].rows), a.steps * n_easy)
    order_gen = _order(rng, len(batchers["generated"].rows), a.steps * n_gen)

    def score(name, by_wording=False):
        vb, stats = batchers[name], {}
        llm.eval()
        proj.eval()
        with torch.no_grad():
            for s in range(0, len(vb.rows), 32):
                idx = list(range(s, min(s + 32, len(vb.rows))))
                e, labels, m = vb.build(idx, feats, proj, 4)
                h = llm.model(inputs_embeds=e, attention_mask=m).last_hidden_state
                for b, i in enumerate(idx):
                    pos = int((labels[b] != -100).nonzero()[0])
                    got = int(llm.lm_head(h[b, pos - 1]).argmax())
                    q, ans = sets[name][i][1], sets[name][i][2]
                    if by_wording:
                        if ans not in ("yes", "no"):
                            continue
                        neg, colour = yes_no_wording(q)
                        key = f"{'negated' if neg else 'plain'} {'colour' if colour else 'shape'} -> {ans}"
                    else:
                        key = question_kind(ans)
                    st = stats.setdefault(key, [0, 0])
                    st[0] += got == int(labels[b, pos])
                    st[1] += 1
        proj.train()
        return {k: (round(c / n, 3) if not by_wording else f"{c}/{n}") for k, (c, n) in sorted(stats.items())}

    evals = [{"step": 0, "drawn": score("drawn_val"), "easy_val": score("val")}]
    print(evals[-1], flush=True)
    t0 = time.time()
    for step in range(1, a.steps + 1):
        parts = [batchers["easy"].build(order_easy[(step - 1) * n_easy:step * n_easy].tolist(), feats, proj, 4),
                 batchers["generated"].build(order_gen[(step - 1) * n_gen:step * n_gen].tolist(), feats, proj, 4)]
        e, labels, m = _stack(parts)
        loss, _, _, _ = align._loss_and_acc(llm, e, labels, m)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % (a.steps // 2) == 0:
            evals.append({"step": step, "drawn": score("drawn_val"), "easy_val": score("val")})
            print(evals[-1], flush=True)
    seconds = round(time.time() - t0)
    wording = {"drawn": score("drawn_val", True), "easy_val": score("val", True)}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in proj.state_dict().items()}, str(out / "projection.safetensors"))
    if wrapped:
        save_file(lora.state(wrapped), str(out / "lora.safetensors"))
    cmd = " ".join(["python benchmarks/yes_no_lora.py"] + (argv if argv is not None else sys.argv[1:]))
    write_json(a.name or f"yes-no-{out.name}", {
        "benchmark": "yes/no learnability", "command": cmd, "machine": machine(), "seconds": seconds,
        "questions": {k: len(v) for k, v in sets.items()}, "evals": evals, "yes_no_by_wording": wording})
    print(json.dumps(wording), flush=True)


if __name__ == "__main__":
    main()
