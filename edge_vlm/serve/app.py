"""The HTTP side: OpenAI's chat-completions API, models, health, metrics and the chat page.

The bundle loads in a background thread after the port is open (/health says "loading", and
/v1/* answers 503 until it is "ready"). Handlers never touch the model: they check the request,
decode its image, tokenize, and hand a Job to the engine thread, whose events they stream.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import threading
import time
import uuid
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from edge_vlm.serve import images
from edge_vlm.serve import requests as chat
from edge_vlm.serve.config import ServeConfig
from edge_vlm.serve.engine import Engine, Job, QueueFull
from edge_vlm.serve.errors import ApiError, from_edge_error, too_large
from edge_vlm.serve.metrics import Metrics

OUTCOME_BY_STATUS = {400: "bad_request", 401: "unauthorized", 404: "bad_request", 413: "too_large",
                     429: "rejected", 503: "rejected"}
DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there


class Server:
    """The state one app serves: config, the loaded pipeline and engine, metrics."""

    def __init__(self, cfg: ServeConfig):
        self.cfg, self.metrics = cfg, Metrics()
        self.pipeline = self.engine = None
        self.load_error: str | None = None
        self.model_id = cfg.model_name or Path(cfg.bundle).resolve().name
        self.created = int(time.time())
        from concurrent.futures import ThreadPoolExecutor

        self.prep = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge-vlm-prep")

    def load(self) -> None:
        from edge_vlm.runtime.pipeline import Pipeline, RuntimeConfig

        try:
            rc = RuntimeConfig(device=self.cfg.device, n_ctx=self.cfg.n_ctx, threads=self.cfg.threads,
                               parallel=self.cfg.parallel, vision_device=self.cfg.vision_device)
            self.pipeline = Pipeline.load(self.cfg.bundle, rc)
            manifest = Path(self.cfg.bundle) / "manifest.json"
            self.created = int(manifest.stat().st_mtime)
            engine = Engine(self.pipeline, self.cfg.parallel, self.cfg.max_queue, self.cfg.image_cache, self.metrics)
            engine.start()
            self.engine = engine
        except Exception as e:  # noqa: BLE001 - shown by /health and the CLI
            self.load_error = str(e)

    def close(self) -> None:
        self.prep.shutdown(wait=False, cancel_futures=True)
        if self.engine is not None and not self.engine.stop():
            return  # the engine thread is still in llama.cpp: freeing its context now would crash; exit frees it
        if self.pipeline is not None:
            self.pipeline.close()

    def model_card(self) -> dict:
        m = self.pipeline.manifest
        batched = self.engine.slots.batched
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "edge-vlm",
                "edge_vlm": {
                    "family": m.family, "backend": m.llm.backend, "bits": m.llm.quant.bits,
                    "quant": m.llm.quant.requested, "vision_precision": m.vision.precision,
                    "n_ctx": self.engine.n_ctx, "n_image_tokens": m.vision.n_image_tokens,
                    "image_size": m.preprocess.image_size, "max_images": 1,
                    "batching": "continuous" if batched else "serial",
                    "parallel": self.engine.slots.capacity,
                    "note": (f"up to {self.engine.slots.capacity} requests decode together" if batched else
                             f"{m.llm.backend} bundles answer one request at a time; others wait in the queue"),
                    "device": self.pipeline.device.summary}}


def _error_response(e: ApiError):
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def create_app(cfg: ServeConfig, server: Server | None = None):
    server = server or Server(cfg)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        loader = threading.Thread(target=server.load, name="edge-vlm-load", daemon=True)
        loader.start()
        try:
            yield
        finally:
            await asyncio.to_thread(loader.join)
            await asyncio.to_thread(server.close)

    app = FastAPI(title="edge-vlm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return _error_response(e)

    @app.exception_handler(HTTPException)
    async def _http_error(request, e: HTTPException):
        return _error_response(ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}",
                                        code="not_found" if e.status_code == 404 else None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e):
        err = (e.errors() or [{}])[0]
        where = ".".join(str(p) for p in err.get("loc", ())) or "request"
        return _error_response(ApiError(400, f"{where}: {err.get('msg', 'invalid')}", param=where))

    @app.exception_handler(Exception)
    async def _internal(request, e):  # never a traceback to the client
        return _error_response(from_edge_error(e))

    def ready() -> None:
        if server.load_error:
            raise ApiError(503, f"the bundle failed to load: {server.load_error}", "server_error", "load_failed")
        if server.engine is None:
            raise ApiError(503, "the model is still loading: retry in a few seconds", "server_error", "loading",
                           headers={"Retry-After": "2"})

    def authorize(request: Request) -> None:
        if cfg.api_key is None:
            return
        got = request.headers.get("authorization", "")
        scheme, _, key = got.partition(" ")
        # headers arrive decoded as latin-1: back to the client's bytes, compared with the key's UTF-8
        sent = key.strip().encode("latin-1", errors="replace")
        if not (scheme.lower() == "bearer" and hmac.compare_digest(sent, cfg.api_key.encode())):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           "invalid_request_error", "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    @app.get("/health")
    async def health():
        if server.load_error:
            return JSONResponse({"status": "error", "error": server.load_error}, status_code=503)
        if server.engine is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ready", "model": server.model_id}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(server.metrics.text(), media_type="text/plain; version=0.0.4")

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(resources.files("edge_vlm.serve").joinpath("static/index.html").read_text("utf-8"))

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        ready()
        return {"object": "list", "data": [server.model_card()]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str, request: Request):
        authorize(request)
        ready()
        if model_id != server.model_id:
            raise ApiError(404, f"model {model_id!r} does not exist: this server serves {server.model_id!r}",
                           code="model_not_found", param="model")
        return server.model_card()

    @app.post("/v1/chat/completions")
    async def completions(request: Request):
        arrived = time.perf_counter()
        try:
            authorize(request)
            ready()
            job, req = await _job(request, arrived)
            try:
                server.engine.submit(job)
            except QueueFull:
                raise ApiError(429, f"the server is busy ({cfg.max_queue} requests waiting): retry shortly",
                               "rate_limit_error", "queue_full", headers={"Retry-After": "1"}) from None
            # "started" once prefilled, or the reason it failed; a client that leaves meanwhile is noticed
            kind, value = await _next_event(job, request)
            if kind is None:
                return _gone()
            if kind == "error":
                raise from_edge_error(value)
        except ApiError as e:
            server.metrics.outcome(OUTCOME_BY_STATUS.get(e.status, "error"))
            raise
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return JobStream(job, _stream(job, rid, usage), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _complete(job, rid, request)

    async def _next_event(job: Job, request: Request):
        """The job's next event; None (and the job cancelled) if the client disconnects first."""
        while True:
            try:
                return await asyncio.wait_for(job.events.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancelled = True
                    return None, None
            except asyncio.CancelledError:
                job.cancelled = True
                raise

    async def _job(request: Request, arrived: float) -> tuple[Job, chat.ChatRequest]:
        body = await _read_body(request)
        req = chat.parse(body)
        if req.model != server.model_id:
            raise ApiError(404, f"model {req.model!r} does not exist: this server serves {server.model_id!r} "
                                "(GET /v1/models)", code="model_not_found", param="model")
        loop = asyncio.get_running_loop()
        # decoding, resizing and tokenizing run on one thread of their own, one request at a time: beside
        # the engine's --threads they add one core's worth of work at most
        fields = await loop.run_in_executor(server.prep, _prepare_all, req)
        return Job(**fields, loop=loop, arrived=arrived), req

    def _prepare_all(req: chat.ChatRequest) -> dict:
        return _prepare(req, chat.messages(req, lambda url: images.load(url, cfg)))

    def _prepare(req: chat.ChatRequest, msgs) -> dict:
        """Render, tokenize and size the request (off the event loop: tokenizing is CPU work)."""
        from edge_vlm.errors import BadInput, ContextOverflow
        from edge_vlm.runtime.conversation import render
        from edge_vlm.runtime.sampling import SamplingConfig

        engine, m = server.engine, server.pipeline.manifest
        try:
            r = render(m.prompt, msgs)
            pre = engine.tokenize(r.before, m.prompt.add_bos)
            post = engine.tokenize(r.after, False) if r.image is not None else []
            n_img = m.vision.n_image_tokens if r.image is not None else 0
            used = len(pre) + n_img + len(post)
            asked = req.max_completion_tokens or req.max_tokens
            room = engine.n_ctx - used
            if room < 1 or (asked is not None and asked > room):
                raise ContextOverflow(used + (asked or 1), engine.n_ctx)
            max_tokens = asked or min(cfg.default_max_tokens, room)
            sampling = SamplingConfig(max_tokens=max_tokens, **chat.sampling_fields(req, cfg.default_temperature))
            stops = list(m.prompt.stop) + chat.stops(req)
        except BadInput as e:
            raise from_edge_error(e) from None
        key, image = r.image if r.image is not None else (None, None)
        if image is not None:  # queued requests hold the model's input (KBs), not a decoded photo (MBs)
            try:
                image = server.pipeline.vision.pixels(image)
            except BadInput as e:
                raise from_edge_error(e) from None
        return {"pre_ids": pre, "post_ids": post, "image": image, "image_key": key, "n_image_tokens": n_img,
                "sampling": sampling, "stops": stops}

    async def _read_body(request: Request) -> bytes:
        limit = cfg.max_request_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise too_large(f"the request is {int(declared):,} bytes; this server takes at most {limit:,} "
                            "(--max-request-mb)")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large(f"the request is larger than this server's limit of {limit:,} bytes "
                                "(--max-request-mb)")
            chunks.append(chunk)
        return b"".join(chunks)

    def _chunk(rid: str, created: int, delta: dict, finish=None, usage=False, choices=True) -> bytes:

        body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": server.model_id,
                "system_fingerprint": None,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}] if choices else []}
        if usage is not False:  # with include_usage, OpenAI sends "usage": null on every chunk but the last
            body["usage"] = usage
        return b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n"

    async def _stream(job: Job, rid: str, include_usage: bool):
        created = int(time.time())
        done = False
        usage = None if include_usage else False
        try:
            yield _chunk(rid, created, {"role": "assistant", "content": ""}, usage=usage)
            while True:
                kind, value = await job.events.get()
                if kind == "text":
                    yield _chunk(rid, created, {"content": value}, usage=usage)
                elif kind == "done":
                    done = True
                    server.metrics.outcome("ok")
                    yield _chunk(rid, created, {}, finish=value["finish_reason"], usage=usage)
                    if include_usage:
                        yield _chunk(rid, created, {}, usage=_usage(value), choices=False)
                    yield b"data: [DONE]\n\n"
                    return
                elif kind == "error":  # after the headers: an error event in the stream, as OpenAI does
                    done = True

                    server.metrics.outcome("error")
                    yield b"data: " + json.dumps(from_edge_error(value).body()).encode() + b"\n\n"
                    return
        finally:
            if not done:  # the client went away: free its slot at the next step
                job.cancelled = True

    async def _complete(job: Job, rid: str, request: Request):
        pieces = []
        checked = time.monotonic()
        try:
            while True:
                try:
                    kind, value = await asyncio.wait_for(job.events.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    kind = None
                if time.monotonic() - checked >= DISCONNECT_POLL_S:  # tokens may arrive faster than the poll
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        job.cancelled = True
                        return _gone()
                if kind is None:
                    continue
                if kind == "text":
                    pieces.append(value)
                elif kind == "error":
                    server.metrics.outcome("error")
                    raise from_edge_error(value)
                elif kind == "done":
                    server.metrics.outcome("ok")
                    return {"id": rid, "object": "chat.completion", "created": int(time.time()),
                            "model": server.model_id, "system_fingerprint": None,
                            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(pieces),
                                                                 "refusal": None},
                                         "logprobs": None, "finish_reason": value["finish_reason"]}],
                            "usage": _usage(value)}
        except asyncio.CancelledError:
            job.cancelled = True
            raise

    return app


class JobStream(StreamingResponse):
    """A streamed answer whose job is cancelled however the response ends early: a client gone before
    the first chunk is written never runs the body generator's own clean-up."""

    def __init__(self, job: Job, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.job = job

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancelled = True  # a no-op once the job is done: the engine has let it go


def _gone():
    """What a client that left is sent (nobody reads it; the access log does): nginx's 499."""
    return JSONResponse(ApiError(499, "the client closed the connection", code="client_closed").body(),
                        status_code=499)


def _usage(v: dict) -> dict:
    return {"prompt_tokens": v["prompt_tokens"], "completion_tokens": v["completion_tokens"],
            "total_tokens": v["prompt_tokens"] + v["completion_tokens"]}
