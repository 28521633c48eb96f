"""Datasets: easy-VQA (installed by `pip install --no-deps easy-vqa`) or any folder in its format
(`questions.json` = [[question, answer, image_id], ...] and `images/<image_id>.png`)."""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from edge_vlm.errors import BadInput


@dataclass(frozen=True)
class Question:
    text: str
    answer: str
    image: Path


def dataset_dir(dataset: str, split: str) -> Path:
    if dataset == "easy-vqa":
        from edge_vlm.families.resources import package_dir

        root = package_dir("easy_vqa") / "data" / split
        if split not in ("train", "test"):
            raise BadInput(f"easy-vqa has splits train and test, not {split!r}")
        return root
    root = Path(dataset) / split if (Path(dataset) / split).is_dir() else Path(dataset)
    if not (root / "questions.json").is_file():
        raise BadInput(f"{dataset}: no questions.json (expected easy-VQA's format: questions.json + images/)")
    return root


def load_questions(dataset: str = "easy-vqa", split: str = "test", limit: int | None = None,
                   seed: int = 0) -> list[Question]:
    """Questions in a fixed seeded order, so `--limit N` always means the same N questions."""
    root = dataset_dir(dataset, split)
    rows = json.loads((root / "questions.json").read_text())
    qs = [Question(q, a, root / "images" / f"{i}.png") for q, a, i in rows]
    random.Random(seed).shuffle(qs)
    return qs[:limit] if limit else qs


def normalize_answer(text: str) -> str:
    """Exact match is on the first word, lower-cased, punctuation stripped ('Red.' == 'red')."""
    words = text.strip().lower().replace(".", " ").replace(",", " ").replace("!", " ").split()
    return words[0] if words else ""
