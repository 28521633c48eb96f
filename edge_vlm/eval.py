"""`edge-vlm eval`: exact-match accuracy of a bundle or of the torch reference on a VQA set."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from edge_vlm.data import load_questions, normalize_answer
from edge_vlm.runtime.sampling import SamplingConfig


@dataclass(frozen=True)
class EvalConfig:
    target: str | None = None  # bundle folder, or source (built-in name / source folder) for the torch reference
    dataset: str = "easy-vqa"
    split: str = "test"
    limit: int | None = None
    seed: int = 0  # question order (so --limit N always picks the same questions)
    max_tokens: int = 6
    threads: int = 0

    def __post_init__(self):
        from edge_vlm import limits
        from edge_vlm.errors import BadInput

        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            raise BadInput(f"--limit {self.limit}: give a number of questions >= 1 (or no --limit for all)")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise BadInput(f"--seed {self.seed}: give a whole number >= 0")
        object.__setattr__(self, "threads", limits.threads(self.threads)[0])  # never more threads than cores


def is_bundle(target: str | None) -> bool:
    return target is not None and (Path(target) / "manifest.json").is_file()


def open_target(cfg: EvalConfig):
    """A bundle's Pipeline, or the torch reference for a source. Both have .generate()."""
    if is_bundle(cfg.target):
        from edge_vlm.runtime.pipeline import Pipeline, RuntimeConfig

        return "bundle", Pipeline.load(cfg.target, RuntimeConfig(device="cpu", threads=cfg.threads))
    from edge_vlm.families import BUILTIN

    if cfg.target and cfg.target not in BUILTIN and Path(cfg.target).is_dir() and \
            not (Path(cfg.target) / "edge-vlm-source.json").is_file():
        from edge_vlm.errors import BundleError

        raise BundleError(f"{cfg.target} has neither manifest.json (a bundle) nor edge-vlm-source.json (a source): "
                          "an interrupted export? export it again")
    import torch

    from edge_vlm.reference import ReferencePipeline

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return "reference", ReferencePipeline.load(cfg.target)


def question_kind(answer: str) -> str:
    return "yes/no" if answer in ("yes", "no") else "shape" if answer in ("circle", "rectangle", "triangle") \
        else "color"


def evaluate(cfg: EvalConfig, progress: bool = True) -> dict:
    from tqdm import tqdm

    qs = load_questions(cfg.dataset, cfg.split, cfg.limit, cfg.seed)
    kind, pipe = open_target(cfg)
    sampling = SamplingConfig(max_tokens=cfg.max_tokens)
    correct, by_kind, records = 0, {}, []
    t0 = time.perf_counter()
    try:
        for q in tqdm(qs, desc=f"eval {Path(cfg.target).name if cfg.target else 'nano'}", unit="q",
                      disable=not progress):
            text = "".join(pipe.generate(q.image, q.text, sampling))
            ok = normalize_answer(text) == q.answer
            correct += ok
            k = question_kind(q.answer)
            n_ok, n = by_kind.get(k, (0, 0))
            by_kind[k] = (n_ok + ok, n + 1)
            records.append({"question": q.text, "image": q.image.name, "answer": q.answer, "output": text,
                            "correct": bool(ok)})
    finally:
        pipe.close()
    n = len(qs)
    return {"target": cfg.target or "nano", "kind": kind, "dataset": cfg.dataset, "split": cfg.split,
            "seed": cfg.seed, "n": n, "correct": correct, "accuracy": correct / n if n else 0.0,
            "by_kind": {k: {"n": v[1], "accuracy": v[0] / v[1]} for k, v in sorted(by_kind.items())},
            "seconds": round(time.perf_counter() - t0, 1), "records": records}
