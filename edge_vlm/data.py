"""Datasets: easy-VQA (installed by `pip install --no-deps easy-vqa`) or any folder in its format
(`questions.json` = [[question, answer, image_id], ...] and `images/<image_id>.png`)."""
from __future__ import annotations

import random
import re
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
    rows = read_rows(root / "questions.json")
    qs = [Question(q, a, root / "images" / f"{i}.png") for q, a, i in rows]
    random.Random(seed).shuffle(qs)
    return qs[:limit] if limit else qs


ROW = "[question: str, answer: str, image_id: int | str]"
JSON_KINDS = {dict: "an object", str: "a string", int: "a number", float: "a number", bool: "a boolean",
              type(None): "null"}
# an image id names images/<id>.png: letters, digits, '_', '-' and inner dots; no separators, no '..',
# so a row can never point outside images/
IMAGE_ID = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")


def read_rows(path: Path) -> list:
    """questions.json as a list of checked rows; anything else is BadInput naming the file and the first
    bad row. Plain checks, no schema library: easy-VQA's 48k rows take a few ms."""
    from edge_vlm.textfiles import read_structured

    rows = read_structured(path, BadInput)
    if not isinstance(rows, list) or not rows:
        what = "an empty list" if rows == [] else JSON_KINDS.get(type(rows), type(rows).__name__)
        raise BadInput(f"{path} holds {what}; expected a non-empty list of rows {ROW}")
    for n, row in enumerate(rows):
        why = _bad_row(row)
        if why:
            raise BadInput(f"{path}: row {n} {why}; every row is {ROW} (easy-VQA's format)")
    return rows


def _bad_row(row) -> str | None:
    if type(row) is not list or len(row) != 3:  # noqa: E721 (a list exactly, as JSON gives)
        return f"is not a list of 3 values: {_short(row)}"
    q, a, i = row
    if type(q) is not str or not q.strip() or type(a) is not str:  # noqa: E721
        return f"needs a non-empty question and an answer, both text: {_short(row)}"
    if type(i) is int:  # noqa: E721 (bool is not an image id)
        return None if 0 <= i < 10**18 else f"has image id {_short(i)}: ids are 0 ... 10^18"
    if type(i) is not str or len(i) > 128 or not IMAGE_ID.fullmatch(i):  # noqa: E721
        return f"has image id {_short(i)}: use a number or a plain name (no path separators, no '..')"
    return None


def _short(value) -> str:
    import reprlib

    try:
        return reprlib.repr(value)
    except Exception:  # a 5000-digit int refuses repr()
        return type(value).__name__


def normalize_answer(text: str) -> str:
    """Exact match is on the first word, lower-cased, punctuation stripped ('Red.' == 'red')."""
    words = text.strip().lower().replace(".", " ").replace(",", " ").replace("!", " ").split()
    return words[0] if words else ""
