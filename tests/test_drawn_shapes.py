"""The held-out shape renderer: reproducible, in easy-VQA's format, its answers true to what it drew."""
import hashlib

from edge_vlm.data import load_questions
from edge_vlm.drawn_shapes import COLOURS, SHAPES, DrawnConfig, write


def _digest(folder):
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())).hexdigest()


def test_same_seed_same_files_and_easy_vqa_format(tmp_path):
    a = write(tmp_path / "a", DrawnConfig(images=12, seed=5))
    b = write(tmp_path / "b", DrawnConfig(images=12, seed=5))
    c = write(tmp_path / "c", DrawnConfig(images=12, seed=6))
    assert _digest(a) == _digest(b) != _digest(c)
    qs = load_questions(str(a), split="", limit=None)
    assert len(qs) == 36
    answers = {q.answer for q in qs}
    assert answers <= set(SHAPES) | set(COLOURS) | {"yes", "no"}


def test_answers_agree_with_each_other_per_image(tmp_path):
    """Per image, the shape and colour asked about by 'what' questions are one shape and one colour, and
    'is there a X' answers yes exactly for them."""
    qs = load_questions(str(write(tmp_path / "d", DrawnConfig(images=60, seed=7, questions_per_image=8))), split="")
    by_image = {}
    for q in qs:
        by_image.setdefault(q.image, []).append(q)
    for image, rows in by_image.items():
        named = {q.answer for q in rows if q.text.startswith("what") and q.answer in SHAPES}
        coloured = {q.answer for q in rows if q.text.startswith("what") and q.answer in COLOURS}
        assert len(named) <= 1 and len(coloured) <= 1, rows
        for q in rows:
            for x in named | coloured:
                if q.text in (f"is there a {x}?", f"is there a {x} shape?"):
                    assert q.answer == "yes", q
