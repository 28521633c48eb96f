"""One thread owns the model; requests queue for a slot and stream their tokens back.

gguf bundles: continuous batching. Up to --parallel requests hold a slot each (one llama.cpp
sequence, its own KV stream); every step decodes one token for all of them in one llama_decode,
so they share each read of the weights. A new request is prefilled (text tokens and its image's
embeddings, for its own sequence only) between two steps. Other backends take one request at a
time (capacity 1). The vision model runs on the same thread, so the server never uses more cores
than --threads, and image embeddings are cached by the image's sha256.
"""
from __future__ import annotations

import asyncio
import collections
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from edge_vlm.runtime.generate import CLEANUP_HOLD, _StopText
from edge_vlm.runtime.sampling import Sampler, SamplingConfig
from edge_vlm.serve.metrics import Metrics


class QueueFull(Exception):
    pass


@dataclass(eq=False)
class Job:
    """One chat completion: what to evaluate, how to sample, and where its events go."""

    pre_ids: list[int]
    post_ids: list[int]
    image: np.ndarray | None  # the vision model's input, [1, 3, S, S] (None: text only)
    image_key: str | None  # sha256 of the encoded image: the embedding cache's key
    n_image_tokens: int
    sampling: SamplingConfig
    stops: list[str]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    arrived: float = field(default_factory=time.perf_counter)
    cancelled: bool = False  # set by the HTTP side when the client goes away
    # the engine's state
    slot: int = -1
    pos: int = 0
    last: int = -1
    out: list[int] = field(default_factory=list)
    first_token: float | None = None
    embeds: np.ndarray | None = None  # the image's embeddings, between admission and prefill
    sampler: Sampler | None = None
    stopper: _StopText | None = None

    @property
    def prompt_tokens(self) -> int:
        return len(self.pre_ids) + (self.n_image_tokens if self.image is not None else 0) + len(self.post_ids)

    def emit(self, kind: str, value=None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed: the server is shutting down
            pass


class GgufSlots:
    """Slots = sequences of one llama.cpp context. One `run` is one step for every active request and the
    whole prefill of the new ones, in three llama_decode calls: [active requests' next tokens + new
    requests' text before the image], [new requests' image embeddings], [new requests' text after]. So
    new prompts are evaluated together, and with the decode step, as llama.cpp's own server batches them."""

    batched = True

    def __init__(self, llm, n: int):
        self.llm, self.capacity = llm, n

    def run(self, active: list, new: list) -> list[np.ndarray]:
        """Logits for each job of active + new, in that order (new jobs' `pos` set past their prompt)."""
        llm = self.llm
        for j in new:
            llm.seq_clear(j.slot)
        first = [(j.slot, j.pos, j.last, True) for j in active]
        for j in new:
            last_here = j.embeds is None and not j.post_ids  # a text-only prompt ends in this batch
            first += [(j.slot, k, t, last_here and k == len(j.pre_ids) - 1) for k, t in enumerate(j.pre_ids)]
        logits = llm.seq_tokens(first)
        out_active, text_only = logits[:len(active)], iter(logits[len(active):])
        with_image = [j for j in new if j.embeds is not None]
        if with_image:
            llm.seq_embeds([(j.slot, len(j.pre_ids), j.embeds) for j in with_image])
        after = []
        for j in new:
            start = len(j.pre_ids) + (0 if j.embeds is None else len(j.embeds))
            after += [(j.slot, start + k, t, k == len(j.post_ids) - 1) for k, t in enumerate(j.post_ids)]
            j.pos = start + len(j.post_ids)
        tail = iter(llm.seq_tokens(after)) if after else iter(())
        out_new = [next(tail) if j.post_ids else next(text_only) for j in new]
        return out_active + out_new

    def free(self, slot: int) -> None:
        self.llm.seq_clear(slot)


class SerialSlots:
    """Any LLMSession (onnx, gptq, bnb): one sequence, so one request at a time."""

    batched = False
    capacity = 1

    def __init__(self, llm):
        self.llm = llm

    def run(self, active: list, new: list) -> list[np.ndarray]:
        llm, out = self.llm, []
        for j in active:
            llm.eval_tokens([j.last])
            out.append(llm.logits())
        for j in new:
            llm.reset()
            if j.pre_ids:
                llm.eval_tokens(j.pre_ids)
            if j.embeds is not None:
                llm.eval_embeds(np.ascontiguousarray(j.embeds))
            if j.post_ids:
                llm.eval_tokens(j.post_ids)
            j.pos = len(j.pre_ids) + (0 if j.embeds is None else len(j.embeds)) + len(j.post_ids)
            out.append(llm.logits())
        return out

    def free(self, slot) -> None:
        pass


class Engine:
    def __init__(self, pipeline, parallel: int, max_queue: int, image_cache: int, metrics: Metrics):
        llm = pipeline.llm
        self.pipeline, self.llm, self.metrics = pipeline, llm, metrics
        self.slots = GgufSlots(llm, parallel) if hasattr(llm, "seq_tokens") else SerialSlots(llm)
        self.max_queue = max_queue
        self.cache: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self.cache_size = image_cache
        self.hold = CLEANUP_HOLD if getattr(llm, "clean_up_spaces", False) else 0
        self.pending: collections.deque[Job] = collections.deque()
        self.active: dict[int, Job] = {}
        self.cv = threading.Condition()
        self.admitting = 0  # taken from `pending`, being prefilled, not yet in `active`
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="edge-vlm-engine", daemon=True)

    # --- the HTTP side ----------------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def stop(self) -> bool:
        """Stop the engine thread; False if it did not stop in time (it is still inside the model)."""
        with self.cv:
            self.stopping = True
            self.cv.notify()
        self.thread.join(timeout=30)
        return not self.thread.is_alive()

    def submit(self, job: Job) -> None:
        with self.cv:
            if any(j.cancelled for j in self.pending):  # clients that left free their place in the queue
                self.pending = collections.deque(j for j in self.pending if not j.cancelled)
            held = len(self.pending) + len(self.active) + self.admitting
            if held >= self.slots.capacity + self.max_queue:
                raise QueueFull
            self.pending.append(job)
            self.metrics.queue_depth = len(self.pending)
            self.cv.notify()

    def tokenize(self, text: str, add_bos: bool) -> list[int]:
        return self.llm.tokenize(text, add_bos)

    @property
    def n_ctx(self) -> int:
        return self.llm.n_ctx

    # --- the engine thread ------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self.cv:
                while not self.stopping and not self.pending and not self.active:
                    self.cv.wait()
                if self.stopping:
                    break
            try:
                self._tick()
            except Exception as e:  # noqa: BLE001 - a bug must fail its requests, never hang them all
                for job in list(self.active.values()):
                    self.active.pop(job.slot, None)
                    job.emit("error", e)
                    try:
                        self.slots.free(job.slot)
                    except Exception:  # noqa: BLE001
                        pass
                self.metrics.active = 0
        from edge_vlm.serve.errors import ApiError

        for job in list(self.active.values()) + list(self.pending):
            job.emit("error", ApiError(503, "the server is shutting down: retry on another instance or later",
                                       "server_error", "shutting_down"))

    def _tick(self) -> None:
        """One step: every active request's next token, and the prefill of requests taking free slots."""
        for job in [j for j in self.active.values() if j.cancelled]:
            self._finish(job, None)
        new = self._take_new()
        active = list(self.active.values())
        if not active and not new:
            return
        try:
            logits = self.slots.run(active, new)
        except Exception as e:  # noqa: BLE001 - a failed decode fails its requests, not the server
            for j in active + new:
                self._finish(j, None)
                j.emit("error", e)
            return
        finally:
            with self.cv:
                self.admitting -= len(new)
        for j in new:
            j.embeds = None  # in the KV cache now (the image cache keeps its own reference)
            with self.cv:
                self.active[j.slot] = j
            j.emit("started")
        self.metrics.active = len(self.active)
        for j, lg in zip(active + new, logits):
            if j in active:
                j.pos += 1
            self._advance_safely(j, lg)

    def _take_new(self) -> list[Job]:
        """Waiting requests for the free slots, their images embedded (or taken from the cache)."""
        new = []
        with self.cv:
            free = [s for s in range(self.slots.capacity) if s not in self.active]
            while free and self.pending:
                job = self.pending.popleft()
                if job.cancelled:
                    self.metrics.outcome("cancelled")
                    continue
                job.slot = free.pop(0)
                new.append(job)
            self.metrics.queue_depth = len(self.pending)
            self.admitting += len(new)
        ready = []
        for job in new:
            try:
                job.embeds = self._embed(job)
                job.sampler = Sampler(job.sampling)
                job.stopper = _StopText(job.stops, hold=self.hold)
                ready.append(job)
            except Exception as e:  # noqa: BLE001 - this request fails, the others go on
                with self.cv:
                    self.admitting -= 1
                job.emit("error", e)
        return ready

    def _embed(self, job: Job) -> np.ndarray | None:
        if job.image is None:
            return None
        emb = self.cache.get(job.image_key) if self.cache_size else None
        self.metrics.cache(emb is not None)
        if emb is None:
            emb = self.pipeline.vision.embed_pixels(job.image)[0]
            if self.cache_size:
                self.cache[job.image_key] = emb
                while len(self.cache) > self.cache_size:
                    self.cache.popitem(last=False)
        else:
            self.cache.move_to_end(job.image_key)
        return emb

    def _advance_safely(self, job: Job, logits: np.ndarray) -> None:
        try:
            self._advance(job, logits)
        except Exception as e:  # noqa: BLE001 - this request fails; the others in the batch go on
            self._finish(job, None)
            job.emit("error", e)

    def _advance(self, job: Job, logits: np.ndarray) -> None:
        """Sample the next token of `job`, stream its text, and finish the job when it is done."""
        tok = job.sampler(logits)
        if job.first_token is None:
            job.first_token = time.perf_counter()
        if self.llm.is_eog(tok):
            return self._finish(job, "stop")
        job.out.append(tok)
        piece = job.stopper.feed(self.llm.detokenize(job.out))
        if piece:
            job.emit("text", piece)
        if job.stopper.stopped:
            return self._finish(job, "stop")
        if len(job.out) >= job.sampling.max_tokens:
            return self._finish(job, "length")
        job.last = tok

    def _finish(self, job: Job, reason: str | None) -> None:
        """reason: "stop" or "length"; None = cancelled (the client left) or failed."""
        with self.cv:
            self.active.pop(job.slot, None)
        self.slots.free(job.slot)
        self.metrics.active = len(self.active)
        now = time.perf_counter()
        if reason is None:
            if job.cancelled:
                self.metrics.outcome("cancelled")
            return
        tail = job.stopper.feed(self.llm.detokenize(job.out), final=True) if job.out else ""
        if tail:
            job.emit("text", tail)
        self.metrics.finished(job.prompt_tokens, len(job.out),
                              None if job.first_token is None else job.first_token - job.arrived, now - job.arrived)
        job.emit("done", {"finish_reason": reason, "prompt_tokens": job.prompt_tokens,
                          "completion_tokens": len(job.out)})
