"""The OpenAI chat-completions request: its schema, and what it turns into (messages with decoded
images, sampling, stop strings). Every problem is an ApiError with OpenAI's error JSON."""
from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge_vlm.errors import BadInput
from edge_vlm.runtime.conversation import MAX_IMAGES, Message
from edge_vlm.serve.errors import ApiError

MAX_MESSAGES = 256
MAX_STOPS = 4  # as OpenAI
MAX_STOP_CHARS = 256  # each stop string is matched against the answer after every token


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ImageURL(_Model):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ContentPart(_Model):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(_Model):
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # fields of newer OpenAI clients are ignored, unless UNSUPPORTED

    model: str
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None  # OpenAI's range
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None  # 0: only the most likely token (greedy)
    seed: Annotated[int, Field(ge=-(2 ** 63), lt=2 ** 64)] | None = None  # OpenAI takes any int64
    stop: Annotated[str, Field(max_length=MAX_STOP_CHARS)] | \
        Annotated[list[Annotated[str, Field(max_length=MAX_STOP_CHARS)]], Field(max_length=MAX_STOPS)] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = 1


# fields that change the answer in ways this server does not do: refused, never silently ignored
UNSUPPORTED = {
    "tools": lambda v: bool(v), "tool_choice": lambda v: v not in (None, "none"), "functions": lambda v: bool(v),
    "function_call": lambda v: v not in (None, "none"), "logprobs": lambda v: bool(v),
    "top_logprobs": lambda v: v not in (None, 0), "logit_bias": lambda v: bool(v),
    "frequency_penalty": lambda v: v not in (None, 0), "presence_penalty": lambda v: v not in (None, 0),
    "response_format": lambda v: v not in (None, {"type": "text"}), "audio": lambda v: v is not None,
    "modalities": lambda v: v not in (None, ["text"]), "prediction": lambda v: v is not None,
}


def parse(body: bytes) -> ChatRequest:
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        req = ChatRequest.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "body"
        raise ApiError(400, f"{where}: {err['msg']}", code="invalid_value", param=where) from None
    for name, refused in UNSUPPORTED.items():
        if refused((req.model_extra or {}).get(name)):
            raise ApiError(400, f"'{name}' is not supported by this server (edge-vlm serves plain chat with images)",
                           code="unsupported_parameter", param=name)
    n_images = sum(isinstance(m.content, list) and sum(p.type == "image_url" for p in m.content)
                   for m in req.messages)
    if n_images > MAX_IMAGES:  # before any image is decoded: each may be megapixels
        raise ApiError(400, f"the messages hold {n_images} images; this model takes {MAX_IMAGES} per conversation: "
                            "start a new conversation for another image", code="too_many_images", param="messages")
    if req.n not in (None, 1):
        raise ApiError(400, f"n={req.n}: this server returns one choice per request; send n=1 (or leave it out)",
                       code="unsupported_parameter", param="n")
    if req.max_tokens is not None and req.max_completion_tokens is not None \
            and req.max_tokens != req.max_completion_tokens:
        raise ApiError(400, "max_tokens and max_completion_tokens differ: send one of them", param="max_tokens")
    return req


def messages(req: ChatRequest, load_image) -> list[Message]:
    """The request's messages, images decoded by `load_image(url)` -> (key, image)."""
    out = []
    for i, m in enumerate(req.messages):
        where = f"messages.{i}"
        role = {"developer": "system"}.get(m.role, m.role)
        if role in ("tool", "function"):
            raise ApiError(400, f"{where}: role '{m.role}' is not supported (no tools here)", param=where)
        parts = [ContentPart(type="text", text=m.content)] if isinstance(m.content, str) else (m.content or [])
        texts, images = [], []
        for k, p in enumerate(parts):
            if p.type == "text":
                if p.text is None:
                    raise ApiError(400, f"{where}.content.{k}: a text part needs 'text'", param=where)
                texts.append(p.text)
            else:
                if p.image_url is None:
                    raise ApiError(400, f"{where}.content.{k}: an image_url part needs 'image_url'", param=where)
                if role != "user":
                    raise ApiError(400, f"{where}: only user messages may hold images", param=where)
                images.append(load_image(p.image_url.url))
        if role == "assistant" and m.content is None:
            raise ApiError(400, f"{where}: an assistant message needs its text content", param=where)
        text = " ".join(t for t in texts if t)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(400, f"{where}: the text is not valid UTF-8", param=where) from None
        out.append(Message(role, text, tuple(images)))
    return out


def sampling_fields(req: ChatRequest, default_temperature: float) -> dict[str, Any]:
    temperature = default_temperature if req.temperature is None else req.temperature
    top_p = 1.0 if req.top_p is None else req.top_p
    if top_p == 0:  # the nucleus holds only the most likely token
        temperature, top_p = 0.0, 1.0
    seed = req.seed % 2 ** 63 if req.seed is not None else (-1 if temperature > 0 else 0)
    return {"temperature": temperature, "top_p": top_p, "seed": seed}


def stops(req: ChatRequest) -> list[str]:
    s = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if any(not x for x in s):
        raise BadInput("stop strings must not be empty")
    return s
