"""Training images for the built-in model: shapes drawn so that only the shape and its colour name stay fixed.

easy-VQA's renderer holds fixed what a model should not learn: one flat shape, pure CSS colours, a plain
pale background, 64x64. This generator varies all of it, reproducibly from a seed, by a procedure of its
own (signed-distance coverage in numpy; `drawn_shapes.py`, the held-out test, draws with Pillow polygons):

- shapes:  circles (slightly elliptic), rectangles of any proportion and rotation, triangles of any kind
           (equilateral, isosceles, right, scalene) and rotation; hard or soft edges, sometimes an outline
- size and position: 15-85 % of the image, anywhere inside it
- colour:  each name is a region of hue, saturation and value (`COLOUR_REGIONS`), sampled uniformly, so
           "brown" covers CSS brown (165,42,42) and the everyday orange-brown alike
- background: pale tints, flat or with a linear or radial gradient, value-noise texture, faint stripes,
           pixel noise
- several shapes: a share of images hold 2-3 shapes of different kinds and colours; their questions are
  the ones with one answer ("what color is the circle?", "is there a red shape?")
- image sizes 32-160 pixels, sometimes blurred or JPEG-compressed

`augment` perturbs easy-VQA's own images the same way (flips, quarter turns, scale and shift on the
background colour, noise, blur): the label never changes.

    python -m edge_vlm.train_shapes OUT_DIR --images 200 --seed 0     # easy-VQA's folder format
"""
from __future__ import annotations

import argparse
import colorsys
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_vlm import drawn_shapes as _drawn

SHAPES = _drawn.SHAPES
# name -> (hue degrees lo, hi), (saturation lo, hi), (value lo, hi); hue None = any (achromatic names)
COLOUR_REGIONS = {
    "red": ((-10, 8), (0.72, 1.0), (0.75, 1.0)),
    "brown": ((0, 33), (0.45, 0.85), (0.35, 0.66)),
    "yellow": ((48, 62), (0.72, 1.0), (0.85, 1.0)),
    "green": ((95, 140), (0.6, 1.0), (0.42, 0.85)),
    "teal": ((170, 190), (0.7, 1.0), (0.42, 0.7)),
    "blue": ((215, 245), (0.65, 1.0), (0.7, 1.0)),
    "gray": (None, (0.0, 0.08), (0.4, 0.66)),
    "black": (None, (0.0, 0.3), (0.0, 0.17)),
}
COLOURS = tuple(COLOUR_REGIONS)
SIZES = (32, 48, 64, 64, 64, 80, 96, 128, 160)  # 64 (easy-VQA's) drawn most often

# easy-VQA's question forms (one vocabulary for the training and the held-out shapes), split by whether a
# question needs a single shape in the image ("what shape is in the image?") or names one
WHAT_SHAPE, WHAT_SHAPE_OF = _drawn.WHAT_SHAPE[:3], _drawn.WHAT_SHAPE[3:]
WHAT_COLOUR, WHAT_COLOUR_OF = _drawn.WHAT_COLOUR[:2], _drawn.WHAT_COLOUR[2:]
YES_NO, YES_NO_NOT = _drawn.YES_NO, _drawn.YES_NO_NOT


@dataclass(frozen=True)
class TrainShapesConfig:
    images: int = 5000
    seed: int = 0
    multi: float = 0.2  # share of images with 2-3 shapes
    questions_per_image: int = 4
    yes_no: float = 0.5  # share of yes/no questions (the kind a frozen LLM finds hardest)


def sample_colour(rng, name: str) -> tuple[int, int, int]:
    hue, sat, val = COLOUR_REGIONS[name]
    h = (rng.uniform(*hue) % 360) / 360 if hue else 0.0
    r, g, b = colorsys.hsv_to_rgb(h, rng.uniform(*sat), rng.uniform(*val))
    return int(round(r * 255)), int(round(g * 255)), int(round(b * 255))


def _background(rng, n: int) -> np.ndarray:
    """[n, n, 3] float: a pale tint, flat or graded, maybe textured."""
    base = np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0, 0.22), rng.uniform(0.82, 1.0))) * 255
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / max(n - 1, 1)
    img = np.broadcast_to(base, (n, n, 3)).astype(np.float32).copy()
    kind = rng.integers(4)
    if kind == 1:  # linear gradient at any angle
        ang = rng.uniform(0, 2 * math.pi)
        t = (math.cos(ang) * xx + math.sin(ang) * yy)
        img += (t - t.mean())[..., None] * rng.uniform(-40, 40, 3)
    elif kind == 2:  # radial
        cx, cy = rng.uniform(0, 1, 2)
        img += (np.hypot(xx - cx, yy - cy) - 0.5)[..., None] * rng.uniform(-45, 45, 3)
    if rng.random() < 0.35:  # value noise texture
        cells = int(rng.integers(3, 12))
        from PIL import Image

        noise = Image.fromarray(rng.standard_normal((cells, cells)).astype(np.float32)).resize((n, n), Image.BICUBIC)
        img += np.asarray(noise)[..., None] * rng.uniform(3, 14)
    if rng.random() < 0.15:  # faint stripes
        ang, period = rng.uniform(0, math.pi), rng.uniform(4, 14)
        img += np.sin((math.cos(ang) * xx + math.sin(ang) * yy) * n / period * 2 * math.pi)[..., None] * rng.uniform(3, 10)
    if rng.random() < 0.4:
        img += rng.normal(0, rng.uniform(2, 9), (n, n, 1))
    return img


def _triangle(rng) -> np.ndarray:
    """Unit-size triangle vertices [3, 2] around the origin, of a random kind."""
    kind = rng.integers(4)
    if kind == 0:
        angles = np.array([0, 2 * math.pi / 3, 4 * math.pi / 3])
        pts = np.stack([np.cos(angles), np.sin(angles)], 1)
    elif kind == 1:
        h = rng.uniform(0.7, 1.8)
        pts = np.array([[-0.5, 0.0], [0.5, 0.0], [0.0, h]])
    elif kind == 2:
        pts = np.array([[0.0, 0.0], [rng.uniform(0.6, 1.4), 0.0], [0.0, rng.uniform(0.6, 1.4)]])
    else:
        while True:  # scalene, no angle under 25 degrees
            pts = rng.uniform(-1, 1, (3, 2))
            if _min_angle(pts) > math.radians(25):
                break
    pts = pts - pts.mean(0)
    return pts / np.abs(pts).max()


def _min_angle(p) -> float:
    out = []
    for i in range(3):
        a, b = p[(i + 1) % 3] - p[i], p[(i + 2) % 3] - p[i]
        c = np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-9)
        out.append(math.acos(np.clip(c, -1, 1)))
    return min(out)


def _sdf(shape: str, rng, xx, yy, cx, cy, r):
    """Signed distance in pixels (negative inside) of one shape of radius ~r centred at (cx, cy)."""
    ang = rng.uniform(0, math.pi)
    c, s = math.cos(ang), math.sin(ang)
    x, y = (xx - cx) * c + (yy - cy) * s, -(xx - cx) * s + (yy - cy) * c
    if shape == "circle":
        a, b = r, r * rng.uniform(0.85, 1.15)
        return (np.hypot(x / a, y / b) - 1) * min(a, b)
    if shape == "rectangle":
        aspect = rng.uniform(0.4, 2.5)
        hw, hh = r * min(1, aspect), r * min(1, 1 / aspect)
        qx, qy = np.abs(x) - hw, np.abs(y) - hh
        return np.hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0)
    pts = _triangle(rng) * r
    if (pts[1, 0] - pts[0, 0]) * (pts[2, 1] - pts[0, 1]) - (pts[1, 1] - pts[0, 1]) * (pts[2, 0] - pts[0, 0]) < 0:
        pts = pts[::-1]  # counter-clockwise: every edge's outward normal points right of it
    d = np.full(x.shape, -np.inf, dtype=np.float32)
    for i in range(3):
        p, q = pts[i], pts[(i + 1) % 3]
        e = q - p
        nx, ny = e[1] / np.hypot(*e), -e[0] / np.hypot(*e)
        d = np.maximum(d, (x - p[0]) * nx + (y - p[1]) * ny)
    return d


def _place(rng, n: int, k: int) -> list[tuple[float, float, float]]:
    """k (cx, cy, r) that fit in the image and do not overlap (bounding circles)."""
    for _ in range(200):
        out = []
        for _ in range(k):
            r = rng.uniform(0.075, 0.425 if k == 1 else 0.22) * n
            cx, cy = rng.uniform(r + 1, n - r - 1, 2)
            out.append((cx, cy, r))
        if all(math.hypot(a[0] - b[0], a[1] - b[1]) > (a[2] + b[2]) * 1.05
               for i, a in enumerate(out) for b in out[i + 1:]):
            return out
    return out[:1]


def draw(rng, cfg: TrainShapesConfig = TrainShapesConfig()):
    """One image: (PIL image, [(shape, colour), ...]) with distinct shapes and distinct colours."""
    from PIL import Image

    n = int(SIZES[rng.integers(len(SIZES))])
    k = int(rng.integers(2, 4)) if rng.random() < cfg.multi else 1
    places = _place(rng, n, k)
    shapes = rng.permutation(SHAPES)[:len(places)]
    colours = rng.permutation(COLOURS)[:len(places)]
    img = _background(rng, n)
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) + 0.5
    for shape, colour, (cx, cy, r) in zip(shapes, colours, places):
        d = _sdf(str(shape), rng, xx, yy, cx, cy, r)
        soft = rng.choice([0.05, 1.0, 1.0, 2.0])  # aliased like easy-VQA, anti-aliased, or soft
        fill = np.array(sample_colour(rng, str(colour)), np.float32)
        cover = np.clip(0.5 - d / soft, 0, 1)[..., None]
        img = img * (1 - cover) + fill * cover
        if rng.random() < 0.2:  # an outline in a darker shade of the same colour
            w = rng.uniform(1, max(1.5, r / 8))
            ring = np.clip(0.5 - np.abs(d + w / 2) / w, 0, 1)[..., None] * cover
            img = img * (1 - ring) + fill * rng.uniform(0.55, 0.8) * ring
    im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    return _finish(rng, im), [(str(s), str(c)) for s, c in zip(shapes, colours)]


def _finish(rng, im):
    """Camera-ish damage that keeps the label: a little blur, sometimes JPEG."""
    from PIL import Image, ImageFilter

    if rng.random() < 0.2:
        im = im.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    if rng.random() < 0.2:
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=int(rng.integers(40, 90)))
        im = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return im


def augment(rng, im):
    """An easy-VQA image perturbed without changing its answers: flips, quarter turns, scale and shift
    (the border filled with the background colour), pixel noise, blur or JPEG."""
    from PIL import Image

    if rng.random() < 0.5:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    k = int(rng.integers(4))
    if k:
        im = im.rotate(90 * k)
    n = im.size[0]
    bg = tuple(int(v) for v in np.median(np.asarray(im)[[0, -1]].reshape(-1, 3), 0))
    scale = rng.uniform(0.6, 1.15)
    m = max(8, int(round(n * scale)))
    small = im.resize((m, m), Image.BICUBIC)
    canvas = Image.new("RGB", (n, n), bg)
    lo, hi = min(0, n - m), max(0, n - m)
    canvas.paste(small, (int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))))
    x = np.asarray(canvas, np.float32)
    if rng.random() < 0.5:
        x = x + rng.normal(0, rng.uniform(2, 8), (n, n, 1))
    out = Image.fromarray(np.clip(x, 0, 255).astype(np.uint8))
    size = int(SIZES[rng.integers(len(SIZES))])
    if size != n:
        out = out.resize((size, size), Image.BICUBIC)
    return _finish(rng, out)


def questions(rng, objects: list[tuple[str, str]], k: int, yes_no: float = 0.5) -> list[tuple[str, str]]:
    """k questions in easy-VQA's forms with exactly one right answer for these objects."""
    present_s = {s for s, _ in objects}
    present_c = {c for _, c in objects}
    out = []
    for _ in range(k):
        if rng.random() < yes_no:
            about_shape = rng.random() < 0.5
            truth = rng.random() < 0.5
            pool, present = (SHAPES, present_s) if about_shape else (COLOURS, present_c)
            absent = [v for v in pool if v not in present]
            truth = truth or not absent  # three shapes: none is absent
            choices = sorted(present) if truth else absent
            x = choices[rng.integers(len(choices))]
            x = x if about_shape else f"{x} shape"
            negated = rng.random() < 0.5
            form = (YES_NO_NOT if negated else YES_NO)[rng.integers(4)]
            out.append((form.format(x=x), "yes" if truth != negated else "no"))
            continue
        shape, colour = objects[rng.integers(len(objects))]
        ask_shape = rng.random() < 0.5
        if len(objects) == 1 and rng.random() < 0.6:  # the forms that need a single shape
            forms = WHAT_SHAPE if ask_shape else WHAT_COLOUR
        else:
            forms = WHAT_SHAPE_OF if ask_shape else WHAT_COLOUR_OF
        q = forms[rng.integers(len(forms))].format(c=colour, s=shape)
        out.append((q, shape if ask_shape else colour))
    return out


def examples(cfg: TrainShapesConfig):
    """Yields (PIL image, [(question, answer), ...]) for cfg.images images, the same for the same seed."""
    rng = np.random.default_rng([cfg.seed, 0x5A4E5])
    for _ in range(cfg.images):
        im, objects = draw(rng, cfg)
        yield im, questions(rng, objects, cfg.questions_per_image, cfg.yes_no)


def write(out: Path, cfg: TrainShapesConfig) -> Path:
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (im, qa) in enumerate(examples(cfg)):
        im.save(out / "images" / f"{i}.png")
        rows += [[q, a, i] for q, a in qa]
    (out / "questions.json").write_text(json.dumps(rows))
    (out / "README.md").write_text(f"Drawn by edge_vlm.train_shapes with {cfg}.\n")
    return out


def main(argv=None) -> None:
    from edge_vlm.drawn_shapes import _at_least

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--images", type=_at_least(1), default=200)
    ap.add_argument("--seed", type=_at_least(0), default=TrainShapesConfig.seed)
    a = ap.parse_args(argv)
    cfg = TrainShapesConfig(images=a.images, seed=a.seed)
    write(Path(a.out), cfg)
    print(f"{a.out}: {a.images} images, {a.images * cfg.questions_per_image} questions")


if __name__ == "__main__":
    main()
