"""`edge-vlm align`: MiniGPT-4 stage 1 at nano scale — train only the projection.

Vision encoder and LLM are frozen; frozen vision features are computed once and cached.
The loss is cross-entropy on the answer tokens (+ the end-of-turn token) only, exactly as
MiniGPT-4 masks everything but the answer with -100. Checkpoints every `save_every` steps;
`--resume` continues from the last one with the same data order.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class AlignConfig:
    source: str = "nano"
    out: str = "runs/align"  # a complete source folder: `edge-vlm export runs/align` uses it
    steps: int = 800
    batch_size: int = 16
    lr: float = 1e-3
    warmup: int = 20
    weight_decay: float = 0.0
    seed: int = 0
    save_every: int = 50
    eval_every: int = 50
    val_images: int = 200  # the last N train images are held out for validation
    val_questions: int = 400  # scored every eval_every steps, spread evenly over the held-out images
    images: int = 0  # use only the first N train images (0 = all 4,000): quick experiments and tests
    threads: int = 0
    cache_dir: str = ".cache/align"
    resume: bool = False


def _features(src, image_paths: list[Path], cache: Path, batch: int = 64) -> np.ndarray:
    """Frozen features [n_images, n_image_tokens, 1280*concat] as float16, cached on disk."""
    import torch
    from tqdm import tqdm

    from edge_vlm.preprocess import preprocess

    if cache.is_file():
        return np.load(cache)
    p = src.preprocess
    out = []
    for s in tqdm(range(0, len(image_paths), batch), desc="vision features", unit="batch"):
        px = np.concatenate([preprocess(f, p.image_size, p.mean, p.std, p.resize)
                             for f in image_paths[s:s + batch]])
        with torch.no_grad():
            out.append(src.vision.features(torch.from_numpy(px)).numpy().astype(np.float16))
    feats = np.concatenate(out)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.name + ".tmp.npy")
    np.save(tmp, feats)
    tmp.replace(cache)  # a run killed mid-save must not leave a truncated cache behind
    return feats


class _Batcher:
    """Token ids per question; builds padded `inputs_embeds` with the image in the middle."""

    def __init__(self, src, questions):
        tok = src.tokenizer
        self.src = src
        self.rows = []
        for image_index, q, a in questions:
            before, after = src.prompt.render(q)
            pre = tok(before, add_special_tokens=False).input_ids
            post = tok(after, add_special_tokens=False).input_ids
            ans = tok(a + src.prompt.stop[0], add_special_tokens=False).input_ids
            self.rows.append((image_index, pre, post, ans))

    def build(self, idx, feats, proj):
        import torch

        embed = self.src.llm.get_input_embeddings()
        rows = [self.rows[i] for i in idx]
        n_img = feats.shape[1]
        lens = [len(p) + n_img + len(q) + len(a) for _, p, q, a in rows]
        T = max(lens)
        img = proj(torch.from_numpy(feats[[r[0] for r in rows]].astype(np.float32)))
        seqs, labels, mask = [], torch.full((len(rows), T), -100), torch.zeros(len(rows), T, dtype=torch.long)
        for b, (_, pre, post, ans) in enumerate(rows):
            with torch.no_grad():
                t_pre = embed(torch.tensor(pre))
                t_post = embed(torch.tensor(post + ans))
            pad = T - lens[b]
            parts = [t_pre, img[b], t_post]
            if pad:
                parts.append(torch.zeros(pad, t_pre.shape[1]))
            seqs.append(torch.cat(parts))
            start = len(pre) + n_img + len(post)
            labels[b, start:start + len(ans)] = torch.tensor(ans)
            mask[b, :lens[b]] = 1
        return torch.stack(seqs), labels, mask


def _loss_and_acc(llm, embeds, labels, mask):
    """Mean cross-entropy over answer tokens, and (correct, total) for each answer's first token
    (the answer word), teacher-forced."""
    import torch

    h = llm.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    # predict label[t] from position t-1; compute the LM head only where a label exists
    tgt = labels[:, 1:]
    sel = tgt != -100
    logits = llm.lm_head(h[:, :-1][sel])
    y = tgt[sel]
    loss = torch.nn.functional.cross_entropy(logits, y)
    first = sel & ~torch.cat([torch.zeros_like(sel[:, :1]), sel[:, :-1]], 1)
    first_in_sel = first[sel]
    correct = int((logits.argmax(-1)[first_in_sel] == y[first_in_sel]).sum())
    return loss, correct, int(first_in_sel.sum()), int(y.numel())


def run(cfg: AlignConfig, log=print) -> dict:
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm

    from edge_vlm.data import dataset_dir
    from edge_vlm.families import nano, resolve_source

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    root = resolve_source(cfg.source)
    src = nano.load(root, json.loads((root / "edge-vlm-source.json").read_text()), with_projection=False)
    data = dataset_dir("easy-vqa", "train")
    rows = json.loads((data / "questions.json").read_text())
    image_ids = sorted({r[2] for r in rows})
    if cfg.images:
        image_ids = image_ids[:cfg.images]
        rows = [r for r in rows if r[2] in set(image_ids)]
    index = {iid: k for k, iid in enumerate(image_ids)}
    desc_key = hashlib.sha256(json.dumps([str(root), src.description, src.preprocess.__dict__, image_ids]).encode()
                              ).hexdigest()[:12]
    feats = _features(src, [data / "images" / f"{i}.png" for i in image_ids],
                      Path(cfg.cache_dir) / f"easyvqa-train-{desc_key}.npy")
    val_ids = set(image_ids[-cfg.val_images:])
    train = [(index[i], q, a) for q, a, i in rows if i not in val_ids]
    val_all = [(index[i], q, a) for q, a, i in rows if i in val_ids]
    val = val_all[::max(1, len(val_all) // cfg.val_questions)][:cfg.val_questions]  # spread over all held-out images
    tb, vb = _Batcher(src, train), _Batcher(src, val)

    proj = src.vision.proj
    proj.reset_parameters()
    proj.requires_grad_(True)
    opt = torch.optim.AdamW(proj.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * 0.5 * (
        1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps)))
    out = Path(cfg.out)
    ckpt_dir = Path(cfg.cache_dir) / "checkpoints"
    ckpt = ckpt_dir / "align-last.pt"
    curve, step = [], 0
    run_key = json.dumps({k: v for k, v in asdict(cfg).items() if k not in ("resume", "threads", "out")},
                         sort_keys=True)
    if cfg.resume and ckpt.is_file():
        state = torch.load(ckpt, weights_only=True)
        if state.get("run_key") != run_key:
            from edge_vlm.errors import BadInput

            raise BadInput(f"the checkpoint in {ckpt_dir} belongs to a run with other settings; resume with the "
                           f"same flags, or start afresh without --resume")
        proj.load_state_dict(state["proj"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        step, curve = int(state["step"]), [tuple(r) for r in state["curve"].tolist()]
        log(f"resumed from {ckpt} at step {step}")
    # epochs of fresh permutations, so every training question is seen before any is repeated
    rng = np.random.default_rng(cfg.seed)
    need = cfg.steps * cfg.batch_size
    order = np.concatenate([rng.permutation(len(train)) for _ in range(-(-need // len(train)))])[:need]

    def validate():
        proj.eval()
        loss_sum, tokens, correct, answers = 0.0, 0, 0, 0
        with torch.no_grad():
            for s in range(0, len(val), 32):
                e, l, m = vb.build(list(range(s, min(s + 32, len(val)))), feats, proj)
                loss, c, n, t = _loss_and_acc(src.llm, e, l, m)
                loss_sum += loss.item() * t
                tokens += t
                correct += c
                answers += n
        proj.train()
        return loss_sum / tokens, correct / answers

    bar = tqdm(total=cfg.steps, initial=step, desc="align", unit="step")
    t0 = time.time()
    while step < cfg.steps:
        idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size].tolist()
        e, l, m = tb.build(idx, feats, proj)
        loss, c, n, _ = _loss_and_acc(src.llm, e, l, m)
        acc = c / n
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        row = (step, loss.item(), acc, float("nan"), float("nan"))
        if step % cfg.eval_every == 0 or step == cfg.steps:
            vl, va = validate()
            row = (step, loss.item(), acc, vl, va)
            log(f"step {step}: train loss {loss.item():.3f}  val loss {vl:.3f}  val answer-token acc {va:.3f}")
        curve.append(row)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.update()
        if step % cfg.save_every == 0 or step == cfg.steps:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            tmp = ckpt.with_suffix(".tmp")
            torch.save({"proj": proj.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "step": torch.tensor(step), "curve": torch.tensor(curve), "run_key": run_key}, tmp)
            tmp.replace(ckpt)
    bar.close()
    out.mkdir(parents=True, exist_ok=True)
    desc = json.loads((root / "edge-vlm-source.json").read_text())
    if out.resolve() != root.resolve():
        desc = _absolute_refs(desc, root)
        desc = {**desc, "name": f"{desc.get('name', 'nano')}-aligned", "projection": "projection.safetensors"}
        (out / "edge-vlm-source.json").write_text(json.dumps(desc, indent=2) + "\n")
    save_file({k: v.detach().contiguous() for k, v in proj.state_dict().items()}, str(out / "projection.safetensors"))
    with open(out / "training_curve.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "train_loss", "train_answer_acc", "val_loss", "val_answer_acc"])
        w.writerows(curve)
    summary = {"config": asdict(cfg), "train_questions": len(train), "val_questions": len(val),
               "final": dict(zip(["step", "train_loss", "train_answer_acc", "val_loss", "val_answer_acc"], curve[-1])),
               "seconds_this_run": round(time.time() - t0, 1)}
    (out / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _plot(curve, out / "training_curve.png")
    return summary


def _absolute_refs(desc: dict, root: Path) -> dict:
    """The source's relative file references, made absolute so the copy works from another folder."""
    def fix(ref):
        return str((root / ref).resolve()) if isinstance(ref, str) and not Path(ref).is_absolute() else ref

    v, llm = dict(desc.get("vision", {})), dict(desc.get("llm", {}))
    if "encoder_weights" in v:
        v["encoder_weights"] = fix(v["encoder_weights"])
    for k in ("gguf", "hf_dir"):
        if k in llm:
            llm[k] = fix(llm[k])
    return {**desc, "vision": v, "llm": llm}


def _plot(curve, path: Path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    a = np.array(curve, dtype=float)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(a[:, 0], a[:, 1], lw=0.8, alpha=0.6, label="train loss (batch)")
    v = ~np.isnan(a[:, 3])
    ax.plot(a[v, 0], a[v, 3], "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy on answer tokens")
    ax2 = ax.twinx()
    ax2.plot(a[v, 0], a[v, 4], "s--", color="C2", label="val answer acc")
    ax2.set_ylim(0, 1)
    ax2.set_ylabel("val answer-token accuracy")
    fig.legend(loc="upper right", fontsize=8)
    ax.set_title("edge-vlm align: nano projection on easy-VQA")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
