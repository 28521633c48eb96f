"""Shapes drawn by a procedure of our own, not easy-VQA's: a held-out test of whether a model learned
shapes and colours or easy-VQA's renderer.

Same vocabulary and question forms as easy-VQA (3 shapes, 8 colour names, 24 question templates),
everything else varies: anti-aliased drawing (4x supersampled), size 25-75 % of the image, any position,
ellipses and rectangles of varied proportions, rotated rectangles and free triangles, jittered colours,
tinted backgrounds with a gradient and optional noise. Reproducible from a seed; written in easy-VQA's
folder format, so `edge-vlm eval TARGET --dataset FOLDER` scores it by question kind.

    python -m edge_vlm.drawn_shapes OUT_DIR --images 200 --seed 20261130
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SHAPES = ("circle", "rectangle", "triangle")
COLOURS = {"red": (215, 40, 40), "green": (45, 165, 60), "blue": (40, 75, 215), "yellow": (235, 205, 35),
           "teal": (0, 135, 135), "brown": (135, 85, 40), "gray": (130, 130, 130), "black": (25, 25, 25)}
JITTER = (14, 5)  # brightness (all channels), then each channel: hues stay apart, no two names meet
SUPERSAMPLE = 4

WHAT_SHAPE = ("what shape is in the image?", "what shape is present?", "what shape does the image contain?",
              "what is the {c} shape?")
WHAT_COLOUR = ("what color is the shape?", "what is the color of the shape?", "what color is the {s}?",
               "what is the color of the {s}?")
YES_NO = ("is there a {x}?", "is there a {x} in the image?", "does the image contain a {x}?", "is a {x} present?")
YES_NO_NOT = ("is there not a {x}?", "is there not a {x} in the image?", "does the image not contain a {x}?",
              "is no {x} present?")


@dataclass(frozen=True)
class DrawnConfig:
    images: int = 200
    seed: int = 20261130
    size: int = 64
    questions_per_image: int = 3
    noise: float = 0.5  # share of backgrounds with a noise texture


def _background(rng, n: int) -> np.ndarray:
    tint = rng.uniform(205, 255, 3)
    tint2 = np.clip(tint + rng.uniform(-25, 25, 3), 190, 255)
    t = np.linspace(0, 1, n)[:, None, None] if rng.random() < 0.5 else np.linspace(0, 1, n)[None, :, None]
    img = tint * (1 - t) + tint2 * t
    return np.broadcast_to(img, (n, n, 3)).copy()


def _polygon(rng, shape: str, n: int) -> tuple[str, list]:
    side = rng.uniform(0.25, 0.75) * n
    cx, cy = (rng.uniform(side / 2 + 1, n - side / 2 - 1) for _ in range(2))
    if shape == "circle":
        a = side / 2
        b = a * rng.uniform(0.85, 1.15)
        return "ellipse", [cx - a, cy - b, cx + a, cy + b]
    if shape == "rectangle":
        aspect = rng.uniform(0.45, 2.2)
        w, h = side * min(1, aspect), side * min(1, 1 / aspect)
        ang = math.radians(rng.uniform(-30, 30))
        pts = [(-w / 2, -h / 2), (w / 2, -h / 2), (w / 2, h / 2), (-w / 2, h / 2)]
    else:
        r = side / 2
        start = rng.uniform(0, 2 * math.pi)
        angles = start + np.array([0, 2.1, 4.2]) + rng.uniform(-0.35, 0.35, 3)  # a triangle, never a sliver
        pts = [(r * math.cos(t), r * math.sin(t)) for t in angles]
        ang = 0.0
    c, s = math.cos(ang), math.sin(ang)
    return "polygon", [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]


def draw(rng, cfg: DrawnConfig):
    """One image: (PIL image, shape, colour name)."""
    from PIL import Image, ImageDraw

    n = cfg.size * SUPERSAMPLE
    shape = SHAPES[rng.integers(len(SHAPES))]
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    bg = _background(rng, n)
    if rng.random() < cfg.noise:
        bg += rng.normal(0, 6, (n, n, 1))
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    shade = rng.integers(-JITTER[0], JITTER[0] + 1)
    fill = tuple(int(np.clip(v + shade + rng.integers(-JITTER[1], JITTER[1] + 1), 0, 255)) for v in COLOURS[colour])
    kind, geometry = _polygon(rng, shape, n)
    d = ImageDraw.Draw(img)
    (d.ellipse if kind == "ellipse" else d.polygon)(geometry, fill=fill)
    return img.resize((cfg.size, cfg.size), Image.Resampling.LANCZOS), shape, colour


def questions(rng, shape: str, colour: str, k: int) -> list[tuple[str, str]]:
    """k questions in easy-VQA's forms, yes/no ones half true, half false."""
    out = []
    for _ in range(k):
        kind = rng.integers(4)
        if kind == 0:
            out.append((WHAT_SHAPE[rng.integers(4)].format(c=colour), shape))
        elif kind == 1:
            out.append((WHAT_COLOUR[rng.integers(4)].format(s=shape), colour))
        else:
            about_shape = rng.random() < 0.5
            truth = rng.random() < 0.5
            pool = SHAPES if about_shape else tuple(COLOURS)
            real = shape if about_shape else colour
            x = real if truth else [v for v in pool if v != real][rng.integers(len(pool) - 1)]
            x = x if about_shape else f"{x} shape"
            negated = rng.random() < 0.5
            form = (YES_NO_NOT if negated else YES_NO)[rng.integers(4)]
            out.append((form.format(x=x), "yes" if truth != negated else "no"))
    return out


def write(out: Path, cfg: DrawnConfig = DrawnConfig()) -> Path:
    rng = np.random.default_rng(cfg.seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(cfg.images):
        img, shape, colour = draw(rng, cfg)
        img.save(out / "images" / f"{i}.png")
        rows += [[q, a, i] for q, a in questions(rng, shape, colour, cfg.questions_per_image)]
    (out / "questions.json").write_text(json.dumps(rows))
    (out / "README.md").write_text(f"Drawn by edge_vlm.drawn_shapes with {cfg} (not easy-VQA's renderer).\n")
    return out


def _at_least(lo: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"{v} is out of range: use {lo} or more")
        return v

    return parse


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--images", type=_at_least(1), default=DrawnConfig.images)
    ap.add_argument("--seed", type=_at_least(0), default=DrawnConfig.seed)
    ap.add_argument("--size", type=_at_least(16), default=DrawnConfig.size, help="pixels per side (16 or more)")
    a = ap.parse_args(argv)
    path = write(Path(a.out), DrawnConfig(images=a.images, seed=a.seed, size=a.size))
    print(f"{path}: {a.images} images, {a.images * DrawnConfig.questions_per_image} questions")


if __name__ == "__main__":
    main()
