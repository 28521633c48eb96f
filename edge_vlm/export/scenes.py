"""Seeded synthetic scenes: images that no dataset in the repository holds, for checks that need images
the export has not calibrated on (the vision precision floors in vision_precision.py).

Each scene is a tinted gradient background with value noise at two scales (texture), then 1-6 shapes
(ellipses, polygons, thick lines, rectangles) in random colours, sizes, positions and outlines, sometimes
blurred. Drawn at the requested size with Pillow, so the same seed always gives the same pixels.
"""
from __future__ import annotations

import numpy as np


def scene(seed: int, size: int = 256):
    """One RGB PIL image of `size` x `size`."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng([seed, 0x5CE7E])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    angle = rng.uniform(0, 2 * np.pi)
    t = (np.cos(angle) * xx + np.sin(angle) * yy + 1.5) / 3
    img = a[None, None] * (1 - t[..., None]) + b[None, None] * t[..., None]
    for cells, amp in ((4, rng.uniform(0, 40)), (max(size // 8, 2), rng.uniform(0, 25))):
        noise = rng.standard_normal((cells, cells, 3)).astype(np.float32)
        up = np.array(Image.fromarray(noise[..., 0]).resize((size, size), Image.BICUBIC))
        img += amp * up[..., None] * np.array([1.0, rng.uniform(0.5, 1), rng.uniform(0.5, 1)])
    im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(1, 7))):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        cx, cy = rng.uniform(0.1, 0.9, 2) * size
        r = rng.uniform(0.05, 0.35) * size
        kind = rng.integers(0, 4)
        outline = tuple(int(c) for c in rng.integers(0, 256, 3)) if rng.random() < 0.4 else None
        width = int(rng.integers(1, max(size // 40, 2) + 1))
        if kind == 0:
            box = [cx - r, cy - r * rng.uniform(0.4, 1.0), cx + r, cy + r * rng.uniform(0.4, 1.0)]
            draw.ellipse(box, fill=colour, outline=outline, width=width)
        elif kind == 1:
            n = int(rng.integers(3, 8))
            ang = np.sort(rng.uniform(0, 2 * np.pi, n))
            pts = [(cx + r * np.cos(q), cy + r * np.sin(q)) for q in ang]
            draw.polygon(pts, fill=colour, outline=outline)
        elif kind == 2:
            x2, y2 = rng.uniform(0, 1, 2) * size
            draw.line([(cx, cy), (x2, y2)], fill=colour, width=int(rng.integers(2, max(size // 16, 3) + 1)))
        else:
            draw.rectangle([cx - r, cy - r / 2, cx + r, cy + r / 2], fill=colour, outline=outline, width=width)
    if rng.random() < 0.3:
        im = im.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 2.0) * size / 256))
    return im


def scenes(n: int, size: int = 256, first_seed: int = 0) -> list:
    return [scene(first_seed + i, size) for i in range(n)]
