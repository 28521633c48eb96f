"""Image loading and preprocessing, shared by the runtime and the torch reference (numpy + Pillow).

Both sides call the same function, so any difference between them is the model, never the input.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_vlm.errors import BadImage

_RESAMPLE = {"bicubic": 3, "bilinear": 2, "nearest": 0}  # PIL.Image.Resampling values (manifest.RESIZE_METHODS)


def load_image(image):
    """Open `image` (path, bytes or PIL image) as an RGB PIL image.

    Non-RGB images (grey, palette, RGBA, CMYK) are converted, not rejected.
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        img = image
    else:
        try:
            if isinstance(image, (bytes, bytearray)):
                import io

                img = Image.open(io.BytesIO(image))
            else:
                path = Path(image)
                if path.is_dir():
                    raise BadImage(f"image {path} is a folder: give an image file (PNG/JPEG/WebP)")
                if not path.is_file():
                    raise BadImage(f"image {path} does not exist")
                img = Image.open(path)
            img.load()  # decode now: truncated files fail here, not later
        except BadImage:
            raise
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise BadImage(f"cannot read image {image if not isinstance(image, (bytes, bytearray)) else '<bytes>'}: "
                           f"{e}. Is it a complete PNG/JPEG/WebP file?") from e
    from PIL import ImageOps

    img = ImageOps.exif_transpose(img)  # phone photos: apply the camera's orientation tag
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        img = _high_depth_to_8bit(img)
    if img.mode != "RGB":
        if img.mode in ("RGBA", "LA", "P", "PA"):
            img = img.convert("RGBA")
            bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
            img = Image.alpha_composite(bg, img)
        img = img.convert("RGB")
    return img


def _high_depth_to_8bit(img):
    """16-bit and float images scaled to 0-255 (Pillow's convert() would clip them to white/black)."""
    from PIL import Image

    x = np.asarray(img, dtype=np.float64)
    if img.mode == "F":
        hi = 1.0 if x.size and x.max() <= 1.0 else 255.0
    else:  # I;16 and 32-bit I holding 16-bit data
        hi = 65535.0 if x.size and x.max() > 255 else 255.0
    return Image.fromarray(np.clip(np.rint(x / hi * 255.0), 0, 255).astype(np.uint8), "L")


def preprocess(image, image_size: int, mean, std, resize: str = "bicubic") -> np.ndarray:
    """Image -> float32 array [1, 3, S, S]: direct square resize, scale to [0,1], normalize."""
    img = load_image(image)
    if resize not in _RESAMPLE:
        raise BadImage(f"unknown resize method {resize!r}; known: {sorted(_RESAMPLE)}")
    img = img.resize((image_size, image_size), _RESAMPLE[resize])
    x = np.asarray(img, dtype=np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])
