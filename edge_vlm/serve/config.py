"""The server's settings: one typed object, checked before the bundle loads."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edge_vlm.errors import BadInput


@dataclass(frozen=True)
class ServeConfig:
    bundle: str
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None  # clients send "Authorization: Bearer KEY" to /v1/*
    parallel: int = 4  # sequences decoded together (gguf); other backends answer one request at a time
    max_queue: int = 256  # requests waiting for a slot; one more is refused with 429
    threads: int = 0  # 0 = every core; shared by the vision model and the LLM, never more than the cores
    n_ctx: int | None = None  # positions per sequence (default 2048, or the model's trained context if smaller)
    device: str = "auto"
    vision_device: str = "same"
    model_name: str | None = None  # the id clients send as "model" (default: the bundle folder's name)
    default_max_tokens: int = 256  # when a request names no max_tokens (and the context has room)
    default_temperature: float = 0.0  # when a request names none: greedy, what the accuracy figures use
    max_request_mb: float = 20.0  # a larger body is refused with 413
    max_image_pixels: int = 16_000_000  # width x height, checked before the pixels are decoded (413)
    image_cache: int = 64  # image embeddings kept, by the image's sha256 (0: off)
    local_images: str | None = None  # a folder whose files requests may name as image_url (off by default)
    remote_images: bool = False  # fetch http(s) image URLs (off by default)
    remote_timeout_s: float = 10.0

    def __post_init__(self):
        checks = (("--port", self.port, 0, 65535), ("--parallel", self.parallel, 1, 256),
                  ("--max-queue", self.max_queue, 0, 1_000_000), ("--max-tokens", self.default_max_tokens, 1, 1 << 20),
                  ("--image-cache", self.image_cache, 0, 1_000_000),
                  ("--max-image-pixels", self.max_image_pixels, 1, 1 << 40))
        for flag, v, lo, hi in checks:
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
                raise BadInput(f"{flag} {v!r}: use a whole number from {lo} to {hi}")
        if not 0 < self.max_request_mb <= 4096:
            raise BadInput(f"--max-request-mb {self.max_request_mb}: use a size in MB above 0, at most 4096")
        if self.api_key is not None and not self.api_key.strip():
            raise BadInput("--api-key is empty: give a key, or leave the flag out for an open server")
        if self.local_images is not None and not Path(self.local_images).is_dir():
            raise BadInput(f"--allow-local-images {self.local_images}: not a folder; name the folder whose images "
                           "requests may read")

    @property
    def max_request_bytes(self) -> int:
        return int(self.max_request_mb * 1024 * 1024)
