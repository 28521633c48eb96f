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
import urllib.request
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
    import os
    import stat

    root = Path(folder).resolve()
    try:
        full = (root / path).resolve()
    except (OSError, RuntimeError, ValueError):
        raise _bad(f"image path {path[:200]!r} cannot be resolved") from None
    if not full.is_relative_to(root):
        raise _bad(f"image path {path[:200]!r} is outside the folder this server may read")
    try:  # the resolved path, opened without following a link swapped in since
        fd = os.open(full, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        raise _bad(f"image file {path[:200]!r} does not exist or cannot be read in the allowed folder") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise _bad(f"image path {path[:200]!r} is not a file")
        if st.st_size > limit:
            raise too_large(f"the image file is larger than the server's limit of {limit // (1 << 20)} MB")
        return f.read(limit + 1)


def _from_remote(url: str, cfg: ServeConfig, limit: int) -> bytes:
    if not cfg.remote_images:
        raise _bad("this server does not fetch image URLs (off by default): send the image as a data: URI "
                   "(base64), or start the server with --allow-remote-images")
    import http.client
    import time

    _public_host(url)
    opener = urllib.request.build_opener(_NoRedirect)  # a redirect could lead to an internal address
    deadline = time.monotonic() + cfg.remote_timeout_s
    chunks, size = [], 0
    try:
        with opener.open(urllib.request.Request(url, headers={"User-Agent": "edge-vlm"}),
                         timeout=cfg.remote_timeout_s) as r:
            while chunk := r.read(1 << 16):
                size += len(chunk)
                if size > limit:
                    raise too_large(f"the image at that URL is larger than the server's limit of "
                                    f"{limit // (1 << 20)} MB")
                if time.monotonic() > deadline:
                    raise _bad(f"fetching the image took longer than {cfg.remote_timeout_s:g} s")
                chunks.append(chunk)
    except ApiError:
        raise
    except (OSError, ValueError, http.client.HTTPException):
        raise _bad("could not fetch the image at that URL (not reachable, not found, or redirected): send the "
                   "image as a data: URI") from None
    return b"".join(chunks)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None  # urllib then raises HTTPError for the 3xx


def _public_host(url: str) -> None:
    """Refuse URLs whose host resolves to a loopback, private, link-local or otherwise internal address."""
    import ipaddress
    import socket

    host = urllib.parse.urlparse(url).hostname
    if not host:
        raise _bad("image_url has no host")
    try:
        addrs = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        raise _bad("could not resolve the image URL's host") from None
    for a in addrs:
        ip = ipaddress.ip_address(a.split("%")[0])
        if not ip.is_global:
            raise _bad("image URLs must point to public hosts (this one resolves to an internal address)")


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
        img = Image.open(io.BytesIO(data), formats=list(FORMATS))  # no other decoder sees untrusted bytes
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError, EOFError, SyntaxError):
        raise _bad("the image is not a readable PNG, JPEG or WebP file") from None
    if img.format not in FORMATS:
        raise _bad(f"the image is {img.format or 'of an unknown format'}: send PNG, JPEG or WebP")
    w, h = img.size
    if w * h > cfg.max_image_pixels:
        raise too_large(f"the image is {w}x{h} = {w * h:,} pixels; this server takes at most "
                        f"{cfg.max_image_pixels:,} (--max-image-pixels): send a smaller image")
    try:
        img.load()  # decode now: a truncated file fails here, with a 400
        return load_image(img)
    except Exception as e:  # noqa: BLE001 - Pillow raises many types (EOFError, struct.error, ...) on bad bytes
        raise _bad(f"the image is damaged or truncated ({type(e).__name__}: {str(e)[:200]})") from None


def load(url: str, cfg: ServeConfig):
    """(sha256 hex of the encoded image, decoded RGB image)."""
    data = image_bytes(url, cfg)
    return hashlib.sha256(data).hexdigest(), decode(data, cfg)


