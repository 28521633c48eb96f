"""An `image_url` content part -> (sha256 of its bytes, an RGB image), with every size bounded.

`data:` URIs (base64 PNG/JPEG/WebP) always work. A local path (or file:// URL) only inside the
folder named by --allow-local-images; http(s) URLs only with --allow-remote-images. The image's
width x height is read from its header and bounded before any pixel is decoded.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
import urllib.parse
from pathlib import Path

from edge_vlm.serve.config import ServeConfig
from edge_vlm.serve.errors import ApiError, too_large

FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}  # what Pillow calls them
DATA_URI = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(?:;[^;,]*)*),", re.ASCII)


def _bad(message: str) -> ApiError:
    return ApiError(400, message, code="invalid_image", param="messages")


def _from_data_uri(url: str, limit: int) -> bytes:
    m = DATA_URI.match(url)
    if not m:
        raise _bad("image_url is a malformed data: URI: use data:image/png;base64,<base64 bytes> (or jpeg, webp)")
    mime = (m["mime"] or "").lower()
    if mime not in FORMATS.values():
        raise _bad(f"image_url has media type {mime or 'none'!r}: send image/png, image/jpeg or image/webp")
    if ";base64" not in m["params"].lower():
        raise _bad("image_url data: URI is not base64: use data:image/png;base64,<base64 bytes>")
    payload = url[m.end():]
    if len(payload) * 3 // 4 > limit:
        raise too_large(f"the image is larger than the server's limit of {limit // (1 << 20)} MB")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise _bad("image_url's base64 payload is not valid base64 (standard alphabet, padded)") from None


def _from_local(url: str, folder: str | None, limit: int) -> bytes:
    if folder is None:
        raise _bad("this server does not read local image files: send the image as a data: URI (base64), or "
                   "start the server with --allow-local-images FOLDER")
    path = urllib.parse.unquote(urllib.parse.urlparse(url).path) if url.startswith("file:") else url
    root = Path(folder).resolve()
    try:
        full = (root / path).resolve()
    except (OSError, RuntimeError, ValueError):
        raise _bad(f"image path {path[:200]!r} cannot be resolved") from None
    if not full.is_relative_to(root):
        raise _bad(f"image path {path[:200]!r} is outside the folder this server may read ({root})")
    if not full.is_file():
        raise _bad(f"image file {path[:200]!r} does not exist in {root}")
    if full.stat().st_size > limit:
        raise too_large(f"the image file is larger than the server's limit of {limit // (1 << 20)} MB")
    return full.read_bytes()


def _from_remote(url: str, cfg: ServeConfig, limit: int) -> bytes:
    if not cfg.remote_images:
        raise _bad("this server does not fetch image URLs (off by default): send the image as a data: URI "
                   "(base64), or start the server with --allow-remote-images")
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "edge-vlm"}),
                                    timeout=cfg.remote_timeout_s) as r:
            data = r.read(limit + 1)
    except (OSError, ValueError) as e:
        raise _bad(f"could not fetch the image at {url[:200]} ({e})") from None
    if len(data) > limit:
        raise too_large(f"the image at {url[:200]} is larger than the server's limit of {limit // (1 << 20)} MB")
    return data


def image_bytes(url: str, cfg: ServeConfig) -> bytes:
    if not isinstance(url, str) or not url:
        raise _bad("image_url.url is empty")
    limit = cfg.max_request_bytes
    if url[:5].lower() == "data:":
        return _from_data_uri(url, limit)
    scheme = urllib.parse.urlparse(url).scheme.lower() if "://" in url else ""
    if scheme in ("http", "https"):
        return _from_remote(url, cfg, limit)
    if scheme in ("", "file"):
        return _from_local(url, cfg.local_images, limit)
    raise _bad(f"image_url scheme {scheme!r} is not supported: send a data: URI (base64 PNG/JPEG/WebP)")


def decode(data: bytes, cfg: ServeConfig):
    """Bytes -> RGB PIL image; the header's size is checked against --max-image-pixels first."""
    from PIL import Image, UnidentifiedImageError

    from edge_vlm.preprocess import load_image

    try:
        img = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise _bad("the image is not a readable PNG, JPEG or WebP file") from None
    if img.format not in FORMATS:
        raise _bad(f"the image is {img.format or 'of an unknown format'}: send PNG, JPEG or WebP")
    w, h = img.size
    if w * h > cfg.max_image_pixels:
        raise too_large(f"the image is {w}x{h} = {w * h:,} pixels; this server takes at most "
                        f"{cfg.max_image_pixels:,} (--max-image-pixels): send a smaller image")
    try:
        img.load()  # decode now: a truncated file fails here, with a 400
    except (OSError, ValueError, SyntaxError) as e:
        raise _bad(f"the image is damaged or truncated ({str(e)[:200]})") from None
    return load_image(img)


def load(url: str, cfg: ServeConfig):
    """(sha256 hex of the encoded image, decoded RGB image)."""
    data = image_bytes(url, cfg)
    return hashlib.sha256(data).hexdigest(), decode(data, cfg)


