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

FEATURE_DIM = 1280  # nano.FEATURE_DIM, the EfficientNet-Lite head width (kept here: no torch import at load)


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
    # what varies what easy-VQA holds fixed (edge_vlm/train_shapes.py): generated images, augmented copies
    # of the easy-VQA training images, and the share of every batch drawn from the generated ones
    generated: int = 5000
    augmented: int = 1
    mix: float = 0.5
    concat: int = 0  # image tokens: concatenate this many pooled tokens per LLM token (0 = the source's)
    projector: str = ""  # nano.PROJECTORS: "linear" or "mlp2x_gelu" ("" = the source's)
    # low-rank adapters on the LLM's attention (llms/lora.py), trained with the projection; 0 = projection only.
    # They are merged into the LLM when the source loads, so every backend exports one ordinary LLM.
    lora_rank: int = 0
    lora_lr: float = 5e-4
    # easy-VQA's yes/no answers follow the question's wording (a plain "is there a blue shape?" is "no" 88 % of
    # the time, a negated one "yes"): a model can score 82 % on them without looking. Drop the majority answer
    # of each wording (negated or not, about a shape or a colour) down to the minority's count.
    balance_yes_no: bool = False
    # word tokens (nano.WordSlots): one image token per group of words, the head picking among them. A question
    # whose answer is one of a group's words also trains the head directly (cross-entropy, weight WORD_LOSS),
    # after `word_head_steps` steps of fitting the head alone on the frozen features.
    words: tuple = ()
    word_head_steps: int = 1500
    # start the projector from a trained projection.safetensors (its `words.*` keys are not used)
    init: str = ""
    # a second validation set drawn by the held-out procedure (edge_vlm/drawn_shapes.py), with a seed of its
    # own, never the one README reports
    drawn_val_images: int = 100
    drawn_val_seed: int = 7
    threads: int = 0
    cache_dir: str = ".cache/align"
    resume: bool = False


WORD_LOSS = 0.5  # weight of the word head's cross-entropy beside the answer loss
WORD_HEAD_BATCH = 128


def _features(src, images, cache: Path, desc: str, batch: int = 32) -> np.ndarray:
    """Frozen pooled tokens [n_images, grid*grid, 1280] as float16 (raster order, before any concat),
    cached on disk. `images` is a list of paths or PIL images, or a zero-argument callable giving one
    (so a cached set is never generated)."""
    import torch
    from tqdm import tqdm

    from edge_vlm.preprocess import preprocess

    if cache.is_file():
        return np.load(cache)
    images = images() if callable(images) else images
    p = src.preprocess
    enc = src.vision.to(memory_format=torch.channels_last)  # ~1.5x faster on CPU, same features to 2e-5
    out = []
    for s in tqdm(range(0, len(images), batch), desc=f"vision features: {desc}", unit="batch"):
        px = np.concatenate([preprocess(f, p.image_size, p.mean, p.std, p.resize) for f in images[s:s + batch]])
        with torch.inference_mode():
            f = enc.features(torch.from_numpy(px).contiguous(memory_format=torch.channels_last))
        out.append(f.reshape(f.shape[0], -1, FEATURE_DIM).numpy().astype(np.float16))
    feats = np.concatenate(out)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.name + ".tmp.npy")
    np.save(tmp, feats)
    tmp.replace(cache)  # a run killed mid-save must not leave a truncated cache behind
    return feats


def _training_sets(cfg: AlignConfig, src, root: Path):
    """All frozen features in one array, and the questions as (feature row, question, answer) per role:
    'easy' (easy-VQA train + its augmented copies), 'generated', 'val' (held-out easy-VQA train images),
    'drawn_val' (the held-out procedure, another seed)."""
    from PIL import Image

    from edge_vlm import drawn_shapes, train_shapes
    from edge_vlm.data import dataset_dir

    data = dataset_dir("easy-vqa", "train")
    rows = json.loads((data / "questions.json").read_text())
    image_ids = sorted({r[2] for r in rows})
    if cfg.images:
        image_ids = image_ids[:cfg.images]
        rows = [r for r in rows if r[2] in set(image_ids)]
    val_ids = set(image_ids[-cfg.val_images:])
    train_ids = [i for i in image_ids if i not in val_ids]
    base = json.dumps([str(root), src.description, src.preprocess.__dict__])

    def key(*spec):
        return hashlib.sha256(json.dumps([base, *spec]).encode()).hexdigest()[:12]

    def paths(ids):
        return [data / "images" / f"{i}.png" for i in ids]

    def augmented(copy):
        rng = np.random.default_rng([cfg.seed, 0xA06, copy])
        return [train_shapes.augment(rng, Image.open(f).convert("RGB")) for f in paths(train_ids)]

    gen_cfg = train_shapes.TrainShapesConfig(images=cfg.generated, seed=cfg.seed)
    generated = list(train_shapes.examples(gen_cfg)) if cfg.generated else []
    drawn_cfg = drawn_shapes.DrawnConfig(images=cfg.drawn_val_images, seed=cfg.drawn_val_seed)
    drawn = _drawn(drawn_cfg) if cfg.drawn_val_images else []
    cache = Path(cfg.cache_dir)
    parts = [_features(src, paths(image_ids), cache / f"easyvqa-train-{key(image_ids)}.npy", "easy-VQA train")]
    parts += [_features(src, lambda c=c: augmented(c), cache / f"easyvqa-aug{c}-{key(train_ids, cfg.seed, c)}.npy",
                        f"easy-VQA augmented copy {c + 1}") for c in range(cfg.augmented)]
    if generated:
        parts.append(_features(src, [im for im, _ in generated],
                               cache / f"shapes-{key(str(gen_cfg))}.npy", "generated shapes"))
    if drawn:
        parts.append(_features(src, [im for im, _ in drawn], cache / f"drawn-{key(str(drawn_cfg))}.npy",
                               "drawn validation"))
    index = {iid: k for k, iid in enumerate(image_ids)}
    sets = {"easy": [(index[i], q, a) for q, a, i in rows if i not in val_ids], "generated": [], "drawn_val": []}
    vals = [(index[i], q, a) for q, a, i in rows if i in val_ids]
    sets["val"] = vals[::max(1, len(vals) // cfg.val_questions)][:cfg.val_questions]  # spread over all held-out
    offset, train_row = len(image_ids), {iid: k for k, iid in enumerate(train_ids)}
    for _ in range(cfg.augmented):
        sets["easy"] += [(offset + train_row[i], q, a) for q, a, i in rows if i not in val_ids]
        offset += len(train_ids)
    if cfg.balance_yes_no:
        sets["easy"] = balance_yes_no(sets["easy"], np.random.default_rng([cfg.seed, 0xB41]))
    for k, (_, qa) in enumerate(generated):
        sets["generated"] += [(offset + k, q, a) for q, a in qa]
    offset += len(generated)
    for k, (_, qa) in enumerate(drawn):
        sets["drawn_val"] += [(offset + k, q, a) for q, a in qa]
    return np.concatenate(parts), sets


def yes_no_wording(question: str) -> tuple[bool, bool]:
    """(negated, about a colour) of a yes/no question in easy-VQA's forms."""
    q = f" {question} "
    return " not " in q or " no " in q, " shape" in q


def balance_yes_no(rows: list, rng) -> list:
    """Rows (feature row, question, answer) with each yes/no wording's answers made even; others unchanged."""
    groups = {}
    for i, (_, q, a) in enumerate(rows):
        if a in ("yes", "no"):
            groups.setdefault((yes_no_wording(q), a), []).append(i)
    drop = set()
    for wording in {w for w, _ in groups}:
        yes, no = groups.get((wording, "yes"), []), groups.get((wording, "no"), [])
        major, minor = (yes, no) if len(yes) > len(no) else (no, yes)
        drop.update(rng.choice(major, len(major) - len(minor), replace=False).tolist())
    return [r for i, r in enumerate(rows) if i not in drop]


def _drawn(cfg) -> list:
    from edge_vlm import drawn_shapes

    rng = np.random.default_rng(cfg.seed)
    out = []
    for _ in range(cfg.images):
        img, shape, colour = drawn_shapes.draw(rng, cfg)
        out.append((img, drawn_shapes.questions(rng, shape, colour, cfg.questions_per_image)))
    return out


def _order(rng, n_rows: int, need: int) -> np.ndarray:
    """Epochs of fresh permutations, so every row is seen before any is repeated."""
    if not n_rows or not need:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([rng.permutation(n_rows) for _ in range(-(-need // n_rows))])[:need]


class _Batcher:
    """Token ids per question; builds padded `inputs_embeds` with the image in the middle."""

    def __init__(self, src, questions):
        tok = src.tokenizer
        self.src = src
        self.rows = []
        self.answers = [a for _, _, a in questions]
        for image_index, q, a in questions:
            before, after = src.prompt.render(q)
            pre = tok(before, add_special_tokens=False).input_ids
            post = tok(after, add_special_tokens=False).input_ids
            ans = tok(a + src.prompt.stop[0], add_special_tokens=False).input_ids
            self.rows.append((image_index, pre, post, ans))

    def build(self, idx, feats, proj, concat: int):
        import torch

        embed = self.src.llm.get_input_embeddings()
        rows = [self.rows[i] for i in idx]
        img = proj(_rows_of(feats, [r[0] for r in rows], concat))  # the connector: projected tokens (+ word tokens)
        n_img = img.shape[1]
        lens = [len(p) + n_img + len(q) + len(a) for _, p, q, a in rows]
        T = max(lens)
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


def _rows_of(feats, rows: list, concat: int):
    """The cached features of these rows as the connector's input [n, tokens, FEATURE_DIM * concat]."""
    import torch

    return torch.from_numpy(feats[rows].astype(np.float32)).reshape(len(rows), -1, FEATURE_DIM * concat)


def _word_targets(groups: tuple, answers: list):
    """Per group, the index of each answer among the group's words (-100 where it is not one of them)."""
    import torch

    return [torch.tensor([g.index(a) if a in g else -100 for a in answers]) for g in groups]


def _word_loss(words, x, targets):
    """The word head's cross-entropy, summed over groups, on the rows whose answer is one of the group's words."""
    import torch

    total = x.new_zeros(())
    for scores, t in zip(words.logits(x).split(words.sizes, -1), targets):
        if (t != -100).any():
            total = total + torch.nn.functional.cross_entropy(scores, t, ignore_index=-100)
    return total


def _fit_word_head(words, feats, concat, batchers, groups, steps, seed, log):
    """The word head alone on the frozen features, before the LLM sees its tokens (so they start as words)."""
    import torch

    rows = [(r[0], a) for b in batchers for r, a in zip(b.rows, b.answers) if any(a in g for g in groups)]
    if not rows or not steps:
        return
    opt = torch.optim.AdamW(words.head.parameters(), lr=1e-3, weight_decay=1e-4)
    rng = np.random.default_rng([seed, 0x3D])
    for _ in range(steps):
        pick = [rows[i] for i in rng.integers(len(rows), size=WORD_HEAD_BATCH)]
        loss = _word_loss(words, _rows_of(feats, [r for r, _ in pick], concat), _word_targets(groups, [a for _, a in pick]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    log(f"word head fitted alone: {steps} steps of {WORD_HEAD_BATCH}, last loss {loss.item():.3f}")


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
    concat = cfg.concat or src.vision.cfg.concat
    grid = src.vision.cfg.grid
    if (grid * grid) % concat:
        from edge_vlm.errors import BadInput

        raise BadInput(f"--concat {concat} does not divide the {grid}x{grid} pooled tokens; use one of "
                       f"{[c for c in range(1, grid * grid + 1) if (grid * grid) % c == 0]}")
    feats, sets = _training_sets(cfg, src, root)
    batchers = {k: _Batcher(src, v) for k, v in sets.items()}
    tb_easy, tb_gen = batchers["easy"], batchers["generated"]

    projector = cfg.projector or src.vision.cfg.projector
    proj = nano.build_projector(projector, FEATURE_DIM * concat, src.llm.config.hidden_size)
    if cfg.init:
        _init_projector(proj, Path(cfg.init))
    src.vision.proj = proj
    proj.requires_grad_(True)
    word_groups = tuple(tuple(g) for g in cfg.words)
    words = None
    if word_groups:
        words = nano.word_slots_class()(word_groups, src.llm.config.hidden_size)
        words.embeddings.copy_(nano.word_embeddings(src.llm, src.tokenizer, word_groups))
        words.head.requires_grad_(True)
    src.vision.words = words
    connect = src.vision.connect
    groups = [{"params": list(proj.parameters()) + (list(words.head.parameters()) if words else []), "lr": cfg.lr}]
    adapters = {}
    if cfg.lora_rank:
        from edge_vlm.llms import lora

        adapters = lora.attach(src.llm, cfg.lora_rank)
        groups.append({"params": lora.trainable(adapters), "lr": cfg.lora_lr})
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
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
        if words is not None:
            words.load_state_dict(state["words"])
        for name, w in adapters.items():
            w.lora_A.data.copy_(state["lora"][f"{name}.lora_A"])
            w.lora_B.data.copy_(state["lora"][f"{name}.lora_B"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        step, curve = int(state["step"]), [tuple(r) for r in state["curve"].tolist()]
        log(f"resumed from {ckpt} at step {step}")
    # each batch: `mix` of it from the generated images, the rest from easy-VQA (+ augmented copies)
    n_gen = round(cfg.batch_size * cfg.mix) if tb_gen.rows else 0
    n_easy = cfg.batch_size - n_gen
    rng = np.random.default_rng(cfg.seed)
    order_easy = _order(rng, len(tb_easy.rows), cfg.steps * n_easy)
    order_gen = _order(rng, len(tb_gen.rows), cfg.steps * n_gen)
    if words is not None and step == 0:
        _fit_word_head(words, feats, concat, (tb_easy, tb_gen), word_groups, cfg.word_head_steps, cfg.seed, log)

    def validate(name):
        vb = batchers[name]
        if not vb.rows:
            return float("nan"), float("nan")
        src.vision.eval()
        loss_sum, tokens, correct, answers = 0.0, 0, 0, 0
        with torch.no_grad():
            for s in range(0, len(vb.rows), 32):
                e, l, m = vb.build(list(range(s, min(s + 32, len(vb.rows)))), feats, connect, concat)
                loss, c, n, t = _loss_and_acc(src.llm, e, l, m)
                loss_sum += loss.item() * t
                tokens += t
                correct += c
                answers += n
        src.vision.train()
        return loss_sum / tokens, correct / answers

    bar = tqdm(total=cfg.steps, initial=step, desc="align", unit="step")
    t0 = time.time()
    while step < cfg.steps:
        picked = [(b, o[step * k:(step + 1) * k].tolist())
                  for b, o, k in ((tb_easy, order_easy, n_easy), (tb_gen, order_gen, n_gen)) if k]
        e, l, m = _stack([b.build(idx, feats, connect, concat) for b, idx in picked])
        loss, c, n, _ = _loss_and_acc(src.llm, e, l, m)
        if words is not None:
            rows = [b.rows[i][0] for b, idx in picked for i in idx]
            loss = loss + WORD_LOSS * _word_loss(words, _rows_of(feats, rows, concat), _word_targets(
                word_groups, [b.answers[i] for b, idx in picked for i in idx]))
        acc = c / n
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        row = (step, loss.item(), acc) + (float("nan"),) * 4
        if step % cfg.eval_every == 0 or step == cfg.steps:
            (vl, va), (dl, da) = validate("val"), validate("drawn_val")
            row = (step, loss.item(), acc, vl, va, dl, da)
            log(f"step {step}: train loss {loss.item():.3f}  easy-VQA val loss {vl:.3f} acc {va:.3f}  "
                f"drawn val loss {dl:.3f} acc {da:.3f}")
        curve.append(row)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.update()
        if step % cfg.save_every == 0 or step == cfg.steps:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            tmp = ckpt.with_suffix(".tmp")
            torch.save({"proj": proj.state_dict(), "words": words.state_dict() if words is not None else {},
                        "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "lora": {f"{n}.{k}": getattr(w, k).detach().clone() for n, w in adapters.items()
                                 for k in ("lora_A", "lora_B")},
                        "step": torch.tensor(step), "curve": torch.tensor(curve), "run_key": run_key}, tmp)
            tmp.replace(ckpt)
    bar.close()
    out.mkdir(parents=True, exist_ok=True)
    desc = json.loads((root / "edge-vlm-source.json").read_text())
    if out.resolve() != root.resolve():
        desc = _absolute_refs(desc, root)
        desc = {**desc, "name": f"{desc.get('name', 'nano')}-aligned", "projection": "projection.safetensors"}
    if adapters:
        from edge_vlm.llms import lora

        merged = lora.state(adapters)
        if desc["llm"].get("adapter"):  # the source's own adapter is in the weights trained on: keep it too
            from edge_vlm.families.resources import resolve_file

            merged = lora.combine(lora.read(resolve_file(root, desc["llm"]["adapter"], "llm.adapter")), merged)
        desc = {**desc, "llm": {**desc["llm"], "adapter": "lora.safetensors"}}
        save_file(merged, str(out / "lora.safetensors"))
        lora.detach(src.llm, adapters)
    if out.resolve() != root.resolve() or (concat, projector, word_groups) != (
            src.vision.cfg.concat, src.vision.cfg.projector, src.vision.cfg.words) or adapters:
        desc = _with_connector(desc, concat, grid, projector, word_groups,
                               sum(p.numel() for p in src.vision.parameters()))
        (out / "edge-vlm-source.json").write_text(json.dumps(desc, indent=2) + "\n")
    weights = dict(proj.state_dict())
    if words is not None:
        weights.update({f"words.{k}": v for k, v in words.state_dict().items()})
    save_file({k: v.detach().contiguous() for k, v in weights.items()}, str(out / "projection.safetensors"))
    with open(out / "training_curve.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CURVE_COLUMNS)
        w.writerows(curve)
    summary = {"config": asdict(cfg), "image_tokens": grid * grid // concat + len(word_groups), "projector": projector,
               "words": [list(g) for g in word_groups],
               "lora": {"rank": cfg.lora_rank, "params": sum(p.numel() for w in adapters.values()
                                                             for p in (w.lora_A, w.lora_B))} if adapters else None,
               "questions": {k: len(b.rows) for k, b in batchers.items()},
               "final": dict(zip(CURVE_COLUMNS, curve[-1])),
               "seconds_this_run": round(time.time() - t0, 1)}
    (out / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _plot(curve, out / "training_curve.png")
    return summary


CURVE_COLUMNS = ["step", "train_loss", "train_answer_acc", "val_loss", "val_answer_acc", "drawn_val_loss",
                 "drawn_val_answer_acc"]


def _stack(parts):
    """Batches built separately (easy-VQA, generated), right-padded to one length and stacked."""
    import torch

    T = max(e.shape[1] for e, _, _ in parts)

    def pad(x, value):
        return torch.nn.functional.pad(x, (0, 0, 0, T - x.shape[1]) if x.dim() == 3 else (0, T - x.shape[1]),
                                       value=value)

    return (torch.cat([pad(e, 0.0) for e, _, _ in parts]), torch.cat([pad(l, -100) for _, l, _ in parts]),
            torch.cat([pad(m, 0) for _, _, m in parts]))


def _with_connector(desc: dict, concat: int, grid: int, projector: str, words: tuple, vision_params: int) -> dict:
    """The source description with the connector trained, and the counts `plan` reads from its shape block."""
    vision = {**desc.get("vision", {}), "concat": concat, "projector": projector}
    vision.pop("words", None)
    if words:
        vision["words"] = [list(g) for g in words]
    shape = dict(desc.get("shape", {}))
    if "vision" in shape:
        shape["vision"] = {**shape["vision"], "image_tokens": grid * grid // concat + len(words),
                           "params": vision_params}
    return {**desc, "vision": vision, **({"shape": shape} if shape else {})}


def _init_projector(proj, path: Path):
    from safetensors.torch import load_file

    from edge_vlm.errors import BadInput

    try:
        state = {k: v for k, v in load_file(str(path)).items() if not k.startswith("words.")}
        proj.load_state_dict(state)
    except (OSError, RuntimeError, ValueError) as e:
        raise BadInput(f"--init {path} does not fit this projector ({type(e).__name__}: {str(e)[:300]}); give a "
                       "projection.safetensors trained with the same --projector and --concat") from e


def _absolute_refs(desc: dict, root: Path) -> dict:
    """The source's relative file references, made absolute so the copy works from another folder."""
    def fix(ref):
        return str((root / ref).resolve()) if isinstance(ref, str) and not Path(ref).is_absolute() else ref

    v, llm = dict(desc.get("vision", {})), dict(desc.get("llm", {}))
    if "encoder_weights" in v:
        v["encoder_weights"] = fix(v["encoder_weights"])
    for k in ("gguf", "hf_dir", "adapter"):
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
    ax2.plot(a[v, 0], a[v, 4], "s--", color="C2", label="easy-VQA val answer acc")
    if a.shape[1] > 6 and not np.isnan(a[v, 6]).all():
        ax2.plot(a[v, 0], a[v, 6], "^--", color="C3", label="drawn-shapes val answer acc")
    ax2.set_ylim(0, 1)
    ax2.set_ylabel("val answer-token accuracy")
    fig.legend(loc="upper right", fontsize=8)
    ax.set_title("edge-vlm align: nano projection")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
