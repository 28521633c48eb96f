"""Load test of `edge-vlm serve` against llama-cpp-python's own OpenAI server, on the same GGUF.

    python benchmarks/serve_load.py --soak                            # both servers, concurrency 1, 4, 16 + soak
    python benchmarks/serve_load.py --prompts story --name serve-load-story   # decode-heavy answers
    python benchmarks/serve_load.py --servers edge-vlm --concurrency 1,4 --requests 8 --name trial

What it measures. Closed-loop clients (asyncio + httpx, one process, light) send streaming
POST /v1/chat/completions, temperature 0, a fixed max_tokens (EOS is honoured: there is no
ignore_eos in the OpenAI API, so each answer has the length the model gives it). Per request: TTFT
(send -> first non-empty content delta), end-to-end latency, completion tokens (`usage` from
`stream_options.include_usage`; where a server sends none, llama-cpp-python's, the count of
content chunks, one per token there: a non-streamed probe request checks it), errors (non-200,
exceptions, empty answers, a stream without [DONE]). Per (server, concurrency) phase, after one
warm-up request: aggregate tokens/s (all completion tokens / the phase's wall time), requests/s,
TTFT and e2e p50/p95 (linear interpolation), errors, and whether the same image + question got
the same greedy answer in every phase (batching need not be bit-identical).

  A  edge-vlm serve BUNDLE --parallel P --max-queue Q --threads T: one 64x64 easy-VQA-style image per
     client (a seeded shape on white, as a base64 PNG data: URI) + "what shape is in the image?" /
     "what color is the shape?" (--prompts vqa: 1-3 token answers, so mostly vision + prefill) or
     "Tell me a story about this image." (--prompts story: answers up to max_tokens, decode-bound).
     For a gguf bundle the server batches all active sequences' decode steps in one llama.cpp context.
  B  python -m llama_cpp.server --model GGUF (the file the bundle's manifest names under llm.file)
     --n_ctx 2048 --n_threads T --n_threads_batch T --interrupt_requests false: what a Python user
     would pick. It cannot take the image embeddings, so it gets text: a short system prompt and the
     same question after a description of the same image ("A red circle."), about as many prompt
     tokens as A's (both counts are recorded). One sequence at a time (it queues requests behind a
     lock); its default `interrupt_requests` would cut a streaming answer short as soon as another
     request waits, so it is turned off. It is started through a few lines that first load llama.cpp's
     CPU backend the way edge-vlm does (a GGML_BACKEND_DL build ships it apart and llama-cpp-python
     never loads it), so both servers run the same llama.cpp kernels.

The servers run one at a time (never both alive), each with --threads = the cores by default:
llama.cpp threads spin, so two servers or more threads than cores would measure the contention.
Run it on a quiet machine: the CPU load of other processes is sampled before each server and phase,
recorded, and warned about.

--soak (A only): 200 requests fired at once (no failure expected: the server queues; --max-queue
256), then 1,000 at concurrency 16 with the server process's RSS (VmRSS of /proc/PID/status, and the
sum over its child processes if any) sampled after the first 100 and after all 1,000 answers.

Duration on a 2-core machine: about 1.5 minutes for the default phases (vqa prompts), plus about 4 for
--soak (200 at once, then 1,000 at 16); --prompts story takes about 3 minutes (32-token answers).
Results: OUT_DIR/NAME.{json,md,png} (default benchmarks/results/serve-load.*). Server logs: $TMPDIR/NAME.<server>.log.
Needs llama-cpp-python's server extras: pip install --no-deps -r requirements-bench.txt.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import io
import itertools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine  # noqa: E402

try:
    import httpx2 as httpx  # this venv's httpx (the openai package's dependency)
except ImportError:  # pragma: no cover
    import httpx

ROOT = Path(__file__).resolve().parent.parent
SERVERS = ("edge-vlm", "llama-cpp-python")
SHAPES = ("circle", "rectangle", "triangle")
COLORS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (240, 210, 20),
          "teal": (0, 128, 128), "brown": (139, 69, 19), "gray": (128, 128, 128), "black": (0, 0, 0)}
# (questions, llama-cpp-python's system prompt): "vqa" is what the model was trained for (answers of 1-3
# tokens, then EOS: the load is mostly prefill and vision); "story" makes both models write up to max_tokens
PROMPTS = {"vqa": (("what shape is in the image?", "what color is the shape?"), "Answer in one word."),
           "story": (("Tell me a story about this image.",), "You are a storyteller.")}
# python -m llama_cpp.server, after loading llama.cpp's CPU backend as edge-vlm does: a GGML_BACKEND_DL build
# (what `make setup` installs) ships one CPU backend per instruction set, which llama-cpp-python never loads
B_LAUNCHER = """
import runpy, sys
import llama_cpp
try:
    from edge_vlm.runtime.llm_gguf import _load_cpu_variants
except ImportError:
    _load_cpu_variants = None
if _load_cpu_variants is not None:
    _load_cpu_variants(llama_cpp)
sys.argv = ["llama_cpp.server", *sys.argv[1:]]
runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
"""
EXTRA_PACKAGES = ("fastapi", "uvicorn", "pydantic", "pydantic-settings", "sse-starlette", "starlette-context",
                  "httpx2", "pillow")


@dataclass
class Config:
    bundle: Path
    gguf: Path
    servers: list[str]
    concurrency: list[int]
    requests: int | None  # per phase; None: max(8, 4 x concurrency)
    max_tokens: int
    threads: int
    parallel: int
    max_queue: int
    n_ctx: int
    soak: bool
    soak_burst: int
    soak_requests: int
    soak_concurrency: int
    prompts: str
    unique_images: bool
    seed: int
    ready_timeout_s: float
    request_timeout_s: float
    name: str
    out_dir: Path

    def n_requests(self, c: int) -> int:
        return self.requests if self.requests else max(8, 4 * c)


@dataclass
class Request:
    client: int
    question: str
    shape: str
    color: str
    image_uri: str


@dataclass
class Outcome:
    ok: bool
    ttft_s: float | None = None
    e2e_s: float | None = None
    completion_tokens: int = 0
    prompt_tokens: int | None = None
    tokens_from: str = ""  # "usage" or "chunks"
    text: str = ""
    error: str = ""
    finish_reason: str | None = None
    sent_s: float = 0.0  # when it was sent, from the start of its phase


# ---------------------------------------------------------------- requests

def shape_image(rng: random.Random) -> tuple[str, str, bytes]:
    """A 64x64 easy-VQA-style image: one shape in one colour on white; PNG bytes."""
    from PIL import Image, ImageDraw

    shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
    img = Image.new("RGB", (64, 64), "white")
    d = ImageDraw.Draw(img)
    s = rng.randint(18, 40)
    x, y = rng.randint(2, 62 - s), rng.randint(2, 62 - s)
    fill = COLORS[color]
    if shape == "circle":
        d.ellipse((x, y, x + s, y + s), fill=fill)
    elif shape == "rectangle":
        h = rng.randint(max(10, s // 2), s)
        d.rectangle((x, y, x + s, y + h), fill=fill)
    else:
        d.polygon([(x + s / 2, y), (x, y + s), (x + s, y + s)], fill=fill)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return shape, color, buf.getvalue()


def make_clients(n: int, seed: int) -> list[tuple[str, str, str]]:
    """(shape, colour, data: URI) per client, each its own seeded image."""
    out = []
    for i in range(n):
        shape, color, png = shape_image(random.Random(seed * 100_003 + i))
        out.append((shape, color, "data:image/png;base64," + base64.b64encode(png).decode()))
    return out


_FRESH = itertools.count(1_000_000)


def request_for(clients: list[tuple[str, str, str]], client: int, k: int, unique: bool = False,
                prompts: str = "vqa") -> Request:
    """Client `client`'s k-th request: its own image, or with `unique` a new image every request."""
    if unique:
        shape, color, uri = make_clients(1, next(_FRESH))[0]
    else:
        shape, color, uri = clients[client % len(clients)]
    questions = PROMPTS[prompts][0]
    return Request(client, questions[(client + k) % len(questions)], shape, color, uri)


def body(server: str, req: Request, model: str, cfg: Config) -> dict:
    if server == "edge-vlm":
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": req.image_uri}},
                                                 {"type": "text", "text": req.question}]}]
    else:  # text only: the same question after a description of the same image
        messages = [{"role": "system", "content": PROMPTS[cfg.prompts][1]},
                    {"role": "user", "content": f"A {req.color} {req.shape}. {req.question}"}]
    return {"model": model, "messages": messages, "stream": True, "stream_options": {"include_usage": True},
            "max_tokens": cfg.max_tokens, "temperature": 0, "seed": cfg.seed}


async def one(client: httpx.AsyncClient, url: str, payload: dict) -> Outcome:
    """One streaming chat completion, timed from the send to the first content delta and to the end."""
    t0 = time.perf_counter()
    out = Outcome(ok=False)
    chunks, done, usage, parts = 0, False, None, []
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=payload) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")[:200]
                out.error = f"HTTP {r.status_code}: {text}"
                out.e2e_s = time.perf_counter() - t0
                return out
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                ev = json.loads(data)
                if ev.get("usage"):
                    usage = ev["usage"]
                for ch in ev.get("choices") or []:
                    piece = (ch.get("delta") or {}).get("content")
                    if piece:
                        if out.ttft_s is None:
                            out.ttft_s = time.perf_counter() - t0
                        parts.append(piece)
                        chunks += 1
                    if ch.get("finish_reason"):
                        out.finish_reason = ch["finish_reason"]
    except Exception as e:  # noqa: BLE001 - every failure is a result here
        out.error = f"{type(e).__name__}: {e}"[:200]
        out.e2e_s = time.perf_counter() - t0
        return out
    out.e2e_s = time.perf_counter() - t0
    out.text = "".join(parts)
    if usage and usage.get("completion_tokens") is not None:
        out.completion_tokens, out.tokens_from = int(usage["completion_tokens"]), "usage"
        out.prompt_tokens = usage.get("prompt_tokens")
    else:
        out.completion_tokens, out.tokens_from = chunks, "chunks"
    if not done:
        out.error = "stream ended without [DONE]"
    elif not out.text.strip():
        out.error = "empty answer"
    else:
        out.ok = True
    return out


def pct(xs: list[float], q: float) -> float | None:
    return round(float(np.percentile(xs, q)) * 1e3, 1) if xs else None


@dataclass
class Phase:
    server: str
    label: str
    concurrency: int
    requests: int
    wall_s: float = 0.0
    ok: int = 0
    errors: int = 0
    completion_tokens: int = 0
    agg_tok_s: float = 0.0
    req_s: float = 0.0
    tokens_per_request: float = 0.0
    prompt_tokens_mean: float | None = None
    tokens_from: list[str] = field(default_factory=list)
    ttft_ms: dict = field(default_factory=dict)
    e2e_ms: dict = field(default_factory=dict)
    finish_reasons: dict = field(default_factory=dict)
    error_examples: list[str] = field(default_factory=list)
    sample_answers: list[dict] = field(default_factory=list)
    rss: dict = field(default_factory=dict)
    answers: dict = field(default_factory=dict)  # "colour shape sha256[:8] | question" -> {answer: count}
    cpu_busy_before: float | None = None  # share of the CPUs others used in the second before the phase
    raw: list = field(default_factory=list)  # per request: [sent s, TTFT ms, e2e ms, completion tokens, ok]


async def run_phase(server: str, label: str, url: str, model: str, cfg: Config, concurrency: int, n: int,
                    clients: list[tuple[str, str, str]], on_done=None) -> Phase:
    """n requests from `concurrency` closed-loop clients (each sends its next request when the last ends)."""
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    timeout = httpx.Timeout(cfg.request_timeout_s, connect=30.0)
    results: list[tuple[Request, Outcome]] = []
    busy = cpu_busy()  # the server idle: what is left is other work on the machine
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        warm = await one(client, url, body(server, request_for(clients, 0, 1, prompts=cfg.prompts), model, cfg))
        if not warm.ok:
            print(f"  warm-up failed: {warm.error}", flush=True)
        todo = iter(range(n))

        async def worker(w: int) -> None:
            for k in todo:
                req = request_for(clients, w, k, cfg.unique_images, cfg.prompts)
                sent = time.perf_counter() - t0
                res = await one(client, url, body(server, req, model, cfg))
                res.sent_s = sent
                results.append((req, res))
                if on_done:
                    on_done(len(results))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        wall = time.perf_counter() - t0
    good = [o for _, o in results if o.ok]
    ph = Phase(server, label, concurrency, n, wall_s=round(wall, 3), ok=len(good), errors=len(results) - len(good),
               cpu_busy_before=busy)
    ph.completion_tokens = sum(o.completion_tokens for o in good)
    ph.agg_tok_s = round(ph.completion_tokens / wall, 1)
    ph.req_s = round(len(good) / wall, 2)
    ph.tokens_per_request = round(ph.completion_tokens / len(good), 2) if good else 0.0
    prompts = [o.prompt_tokens for o in good if o.prompt_tokens is not None]
    ph.prompt_tokens_mean = round(float(np.mean(prompts)), 1) if prompts else None
    ph.tokens_from = sorted({o.tokens_from for o in good})
    ttft = [o.ttft_s for o in good if o.ttft_s is not None]
    e2e = [o.e2e_s for o in good]
    ph.ttft_ms = {"p50": pct(ttft, 50), "p95": pct(ttft, 95), "max": pct(ttft, 100)}
    ph.e2e_ms = {"p50": pct(e2e, 50), "p95": pct(e2e, 95), "max": pct(e2e, 100)}
    for o in good:
        ph.finish_reasons[str(o.finish_reason)] = ph.finish_reasons.get(str(o.finish_reason), 0) + 1
    ph.error_examples = sorted({o.error for _, o in results if not o.ok})[:5]
    ph.raw = [[round(o.sent_s, 3), round(o.ttft_s * 1e3, 1) if o.ttft_s is not None else None,
               round(o.e2e_s * 1e3, 1) if o.e2e_s is not None else None, o.completion_tokens, o.ok]
              for _, o in results]
    for req, o in results:
        if o.ok:
            img = hashlib.sha256(req.image_uri.encode()).hexdigest()[:8]  # the image itself, not its description
            per = ph.answers.setdefault(f"{req.color} {req.shape} {img} | {req.question}", {})
            per[o.text] = per.get(o.text, 0) + 1
    seen = set()
    for req, o in results:
        if o.ok and (req.shape, req.color, req.question) not in seen and len(ph.sample_answers) < 4:
            seen.add((req.shape, req.color, req.question))
            ph.sample_answers.append({"image": f"{req.color} {req.shape}", "question": req.question,
                                      "answer": o.text, "tokens": o.completion_tokens})
    return ph


async def probe(server: str, url: str, model: str, cfg: Config) -> dict:
    """The same request non-streamed (its `usage`) and streamed: the prompt tokens, and a check of the
    streamed token count (usage, or content chunks where the server sends no usage in a stream)."""
    req = request_for(make_clients(1, cfg.seed), 0, 0, prompts=cfg.prompts)
    payload = body(server, req, model, cfg)
    async with httpx.AsyncClient(timeout=httpx.Timeout(cfg.request_timeout_s)) as client:
        r = await client.post(url + "/v1/chat/completions", json={**payload, "stream": False})
        plain = r.json() if r.status_code == 200 else {"error": f"HTTP {r.status_code}: {r.text[:200]}"}
        streamed = await one(client, url, payload)
    usage = plain.get("usage") or {}
    text = ((plain.get("choices") or [{}])[0].get("message") or {}).get("content")
    return {"image": f"{req.color} {req.shape}", "question": req.question, "usage": usage, "answer": text,
            "error": plain.get("error"), "streamed_answer": streamed.text,
            "streamed_tokens": streamed.completion_tokens, "streamed_tokens_from": streamed.tokens_from,
            "streamed_matches": streamed.text == text and streamed.completion_tokens == usage.get("completion_tokens")}


# ---------------------------------------------------------------- servers

def cpu_busy(seconds: float = 1.0) -> float:
    """Share of all CPUs busy over `seconds` (from /proc/stat): others' load, when no server is running."""
    def sample() -> tuple[int, int]:
        v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return sum(v), v[3] + v[4]  # total, idle + iowait

    t0, i0 = sample()
    time.sleep(seconds)
    t1, i1 = sample()
    return round(1 - (i1 - i0) / max(t1 - t0, 1), 3)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> dict:
    """VmRSS of the process, and summed over it and its descendants (a server may spawn workers)."""
    def one_rss(p: int) -> float:
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def children(p: int) -> list[int]:
        out = []
        for t in Path(f"/proc/{p}/task").iterdir():
            try:
                out += [int(c) for c in (t / "children").read_text().split()]
            except OSError:
                pass
        return out

    main = one_rss(pid)
    total, stack = 0.0, [pid]
    while stack:
        p = stack.pop()
        try:
            total += one_rss(p)
            stack += children(p)
        except OSError:
            pass
    return {"process_mb": round(main, 1), "tree_mb": round(total, 1)}


class Server:
    """One server subprocess on a free 127.0.0.1 port, its own process group; output to a log file."""

    def __init__(self, kind: str, cfg: Config):
        self.kind, self.cfg = kind, cfg
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        if kind == "edge-vlm":
            exe = Path(sys.executable).with_name("edge-vlm")
            head = [str(exe)] if exe.exists() else [sys.executable, "-m", "edge_vlm.cli"]
            self.cmd = head + ["serve", str(cfg.bundle), "--host", "127.0.0.1", "--port", str(self.port),
                               "--parallel", str(cfg.parallel), "--max-queue", str(cfg.max_queue),
                               "--threads", str(cfg.threads)]
        else:
            self.cmd = [sys.executable, "-c", B_LAUNCHER, "--model", str(cfg.gguf), "--host", "127.0.0.1",
                        "--port", str(self.port), "--n_ctx", str(cfg.n_ctx), "--n_threads", str(cfg.threads),
                        "--n_threads_batch", str(cfg.threads), "--interrupt_requests", "false"]
        self.log_path = Path(tempfile.gettempdir()) / f"{cfg.name}.{kind}.log"
        self.proc: subprocess.Popen | None = None
        self.model = ""
        self.ready_s = 0.0

    @property
    def shown(self) -> list[str]:
        """The command as a person would type it (B's launcher shown as -m llama_cpp.server)."""
        if self.cmd[1:2] == ["-c"]:
            return [self.cmd[0], "-m", "llama_cpp.server", *self.cmd[3:]]
        return self.cmd

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def start(self) -> None:
        self.cfg.out_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "w")
        t0 = time.perf_counter()
        env = {k: v for k, v in os.environ.items() if k != "EDGE_VLM_API_KEY"}  # an open server: no key to send
        self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True, cwd=ROOT, env=env)
        log.close()
        deadline = time.monotonic() + self.cfg.ready_timeout_s
        with httpx.Client(timeout=5.0) as c:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.kind} exited with {self.proc.returncode} while starting "
                                       f"(`{' '.join(self.shown)}`); log {self.log_path}:\n{self.log_tail()}")
                try:
                    if self.kind == "edge-vlm":
                        r = c.get(self.url + "/health")
                        ready = r.status_code == 200 and r.json().get("status") == "ready"
                    else:  # llama-cpp-python loads the model before it listens
                        ready = c.get(self.url + "/v1/models").status_code == 200
                    if ready:
                        models = c.get(self.url + "/v1/models").json().get("data") or [{}]
                        self.model = models[0].get("id", "")
                        break
                except (httpx.HTTPError, ValueError):
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"{self.kind} not ready after {self.cfg.ready_timeout_s:.0f} s; "
                                       f"log {self.log_path}:\n{self.log_tail()}")
                time.sleep(0.25)
        self.ready_s = round(time.perf_counter() - t0, 2)

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        os.killpg(self.proc.pid, signal.SIGTERM)  # the group this script started (start_new_session)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait()


# ---------------------------------------------------------------- phases

def show(ph: Phase) -> None:
    print(f"  {ph.server} {ph.label}: c={ph.concurrency} n={ph.requests} {ph.wall_s:.1f} s, "
          f"{ph.agg_tok_s} tok/s, {ph.req_s} req/s, {ph.tokens_per_request} tok/req, "
          f"TTFT p50/p95 {ph.ttft_ms['p50']}/{ph.ttft_ms['p95']} ms, e2e p50/p95 {ph.e2e_ms['p50']}/"
          f"{ph.e2e_ms['p95']} ms, errors {ph.errors}" + (f" {ph.error_examples}" if ph.errors else "")
          + (f" [CPUs {ph.cpu_busy_before:.0%} busy before the phase]" if ph.cpu_busy_before > 0.1 else ""),
          flush=True)


def bench_server(kind: str, cfg: Config) -> dict:
    busy = cpu_busy()
    if busy > 0.1:
        print(f"warning: {busy:.0%} of the CPUs busy before {kind} starts: other work will skew the timings",
              flush=True)
    srv = Server(kind, cfg)
    print(f"[{kind}] starting: {' '.join(srv.shown)}", flush=True)
    srv.start()
    print(f"[{kind}] ready in {srv.ready_s} s, model {srv.model!r}, RSS {rss_mb(srv.proc.pid)}", flush=True)
    out = {"command": srv.shown, "model": srv.model, "cpu_busy_before_start": busy, "ready_s": srv.ready_s,
           "log": str(srv.log_path), "rss_ready": rss_mb(srv.proc.pid), "phases": [], "soak": None}
    try:
        out["probe"] = pr = asyncio.run(probe(kind, srv.url, srv.model, cfg))
        print(f"  probe: prompt tokens {pr['usage'].get('prompt_tokens')}, {pr['image']}: {pr['question']!r} -> "
              f"{pr['answer']!r} ({pr['usage'].get('completion_tokens')} tokens; streamed {pr['streamed_tokens']} "
              f"from {pr['streamed_tokens_from']}, same: {pr['streamed_matches']})"
              + (f" error {pr['error']}" if pr["error"] else ""), flush=True)
        clients = make_clients(max(*cfg.concurrency, cfg.soak_burst if cfg.soak else 0), cfg.seed)
        for c in cfg.concurrency:
            ph = asyncio.run(run_phase(kind, f"c{c}", srv.url, srv.model, cfg, c, cfg.n_requests(c), clients))
            show(ph)
            out["phases"].append(asdict(ph))
        if cfg.soak and kind == "edge-vlm":
            out["soak"] = soak(srv, cfg, clients)
        out["rss_end"] = rss_mb(srv.proc.pid)
    finally:
        alive = srv.proc.poll() is None
        rc = srv.stop()
        out["exit"] = {"alive_at_end": alive, "returncode": rc}
        if not alive:
            print(f"[{kind}] died during the run (code {rc}); log tail:\n{srv.log_tail()}", flush=True)
    out["distinct_answers"] = d = distinct_answers(out)
    print(f"  {d['keys_with_more_than_one_answer']} of {d['keys']} (image, question) pairs got more than one "
          "greedy answer across the phases", flush=True)
    return out


def distinct_answers(r: dict) -> dict:
    """Greedy answers to the same image + question across all of a server's phases: how many differ.
    (Batched decoding need not be bit-identical to one sequence alone: llama.cpp's kernels are not
    batch-invariant, so a different batch can flip a near-tie.)"""
    phases = list(r["phases"]) + ([r["soak"]["burst"], r["soak"]["sustained"]] if r.get("soak") else [])
    merged: dict = {}
    for p in phases:
        for key, per in p["answers"].items():
            for text, n in per.items():
                merged.setdefault(key, {}).setdefault(text, 0)
                merged[key][text] += n
    varied = {k: v for k, v in merged.items() if len(v) > 1}
    return {"keys": len(merged), "keys_with_more_than_one_answer": len(varied),
            "examples": dict(list(varied.items())[:3])}


def soak(srv: Server, cfg: Config, clients) -> dict:
    nb, ns, c = cfg.soak_burst, cfg.soak_requests, cfg.soak_concurrency
    first = min(100, ns // 2)
    print(f"[{srv.kind}] soak: {nb} requests at once", flush=True)
    burst = asyncio.run(run_phase(srv.kind, f"burst-{nb}", srv.url, srv.model, cfg, nb, nb, clients))
    show(burst)
    rss_after_burst = rss_mb(srv.proc.pid)
    samples: dict = {}

    def on_done(k: int) -> None:
        if k == first:
            samples["after_first"] = rss_mb(srv.proc.pid)

    print(f"[{srv.kind}] soak: {ns} requests at concurrency {c}", flush=True)
    sustained = asyncio.run(run_phase(srv.kind, f"sustained-{ns}", srv.url, srv.model, cfg, c, ns, clients,
                                      on_done=on_done))
    samples["after_all"] = rss_mb(srv.proc.pid)
    show(sustained)
    ratio = {k: round(samples["after_all"][k] / samples["after_first"][k], 3) for k in samples["after_first"]}
    print(f"  RSS after {first}: {samples['after_first']}, after {ns}: {samples['after_all']}, ratio {ratio}",
          flush=True)
    sustained.rss = {**samples, "first": first, "all": ns, "ratio_all_over_first": ratio}
    return {"burst": asdict(burst), "rss_after_burst": rss_after_burst, "sustained": asdict(sustained)}


# ---------------------------------------------------------------- output

def table(results: dict) -> list[str]:
    lines = ["| server | phase | concurrency | requests | ok | agg tok/s | req/s | tokens/req | prompt tokens | "
             "TTFT p50 / p95 ms | e2e p50 / p95 ms | errors |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for kind, r in results.items():
        phases = list(r["phases"])
        if r.get("soak"):
            phases += [r["soak"]["burst"], r["soak"]["sustained"]]
        probe_prompt = (r.get("probe") or {}).get("usage", {}).get("prompt_tokens")
        for p in phases:
            if p["prompt_tokens_mean"] is None and probe_prompt is not None:
                p = {**p, "prompt_tokens_mean": f"{probe_prompt} (probe)"}
            lines.append(f"| {kind} | {p['label']} | {p['concurrency']} | {p['requests']} | {p['ok']} | "
                         f"{p['agg_tok_s']} | {p['req_s']} | {p['tokens_per_request']} | "
                         f"{p['prompt_tokens_mean'] if p['prompt_tokens_mean'] is not None else '?'} | "
                         f"{p['ttft_ms']['p50']} / {p['ttft_ms']['p95']} | {p['e2e_ms']['p50']} / "
                         f"{p['e2e_ms']['p95']} | {p['errors']} |")
    return lines


def markdown(out: dict) -> str:
    m, cfg, res = out["machine"], out["config"], out["results"]
    lines = [f"# Serving load: edge-vlm serve vs llama-cpp-python server ({Path(cfg['gguf']).name})", "",
             f"{m.get('cpu', '?')}, {m.get('cores')} cores; servers one at a time, {cfg['threads']} threads each; "
             f"prompts {cfg['prompts']!r}, max_tokens {cfg['max_tokens']}, temperature 0, EOS honoured; "
             f"`{out['command']}`", "",
             *table(res), "",
             "agg tok/s: completion tokens of the phase / its wall time (closed loop: each client sends its next "
             "request when the last ends; one warm-up request first). TTFT: send -> first content delta. "
             "edge-vlm gets a 64x64 image + question; llama-cpp-python the same question after a text description "
             "of the image (no image input), so its answers differ in length: compare tokens/req and req/s too. "
             + ("Every request has a new image (no embedding-cache hits). " if cfg["unique_images"] else
                "Each client repeats its own image: after a client's first request edge-vlm serve can answer the "
                "image from its embedding cache; llama-cpp-python reuses the KV cache of the prompt prefix it "
                "shares with the previous request. ")]
    for kind, r in res.items():
        lines += ["", f"- {kind}: `{' '.join(r['command'])}`; ready in {r['ready_s']} s; RSS at ready "
                      f"{r['rss_ready']['process_mb']} MB, at end {r.get('rss_end', {}).get('process_mb', '?')} MB; "
                      f"tokens counted from {sorted({t for p in r['phases'] for t in p['tokens_from']})}; "
                      f"{r['distinct_answers']['keys_with_more_than_one_answer']} of {r['distinct_answers']['keys']} "
                      "(image, question) pairs got more than one greedy answer across the phases"]
        for p in r["phases"][:1]:
            lines += [f"  - e.g. {a['image']}: {a['question']!r} -> {a['answer']!r}" for a in p["sample_answers"][:2]]
    soak_r = next((r["soak"] for r in res.values() if r.get("soak")), None)
    if soak_r:
        b, s = soak_r["burst"], soak_r["sustained"]
        rss = s["rss"]
        lines += ["", "## Soak (edge-vlm)", "",
                  f"- {b['requests']:,} requests fired at once: {b['ok']} ok, {b['errors']} failed "
                  f"{b['error_examples'] if b['errors'] else ''}; wall {b['wall_s']} s, TTFT p95 "
                  f"{b['ttft_ms']['p95']} ms, e2e max {b['e2e_ms']['max']} ms",
                  f"- {s['requests']:,} requests at concurrency {s['concurrency']}: {s['ok']} ok, "
                  f"{s['errors']} failed; {s['agg_tok_s']} tok/s, {s['req_s']} req/s",
                  f"- server RSS (VmRSS) after the first {rss['first']:,}: {rss['after_first']['process_mb']} MB, "
                  f"after all {rss['all']:,}: {rss['after_all']['process_mb']} MB, ratio "
                  f"{rss['ratio_all_over_first']['process_mb']}"
                  + (f" (with child processes: {rss['after_first']['tree_mb']} -> {rss['after_all']['tree_mb']} MB)"
                     if rss['after_first']['tree_mb'] != rss['after_first']['process_mb'] else "")]
    return "\n".join(lines) + "\n"


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax3, ax2) = plt.subplots(1, 3, figsize=(15, 4.2))
    for (kind, r), color in zip(out["results"].items(), ("tab:blue", "tab:orange")):
        ps = r["phases"]
        cs = [p["concurrency"] for p in ps]
        ax1.plot(cs, [p["agg_tok_s"] for p in ps], "o-", color=color, label=kind)
        ax3.plot(cs, [p["req_s"] for p in ps], "o-", color=color, label=kind)
        ax2.plot(cs, [p["ttft_ms"]["p50"] for p in ps], "o-", color=color, label=f"{kind} p50")
        ax2.plot(cs, [p["ttft_ms"]["p95"] for p in ps], "s--", color=color, label=f"{kind} p95")
    for ax, title, ylabel in ((ax1, "aggregate throughput", "completion tokens/s"),
                              (ax3, "requests completed", "requests/s (answer lengths differ)"),
                              (ax2, "time to first token", "TTFT ms")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(out["config"]["concurrency"], [str(c) for c in out["config"]["concurrency"]])
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax1.set_ylim(bottom=0)
    ax3.set_ylim(bottom=0)
    ax2.set_yscale("log")
    fig.suptitle(f"{out['machine'].get('cpu', '?')}, {out['config']['threads']} threads, "
                 f"prompts {out['config']['prompts']!r}, max_tokens {out['config']['max_tokens']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default="bundles/nano-gguf-4",
                    help="gguf bundle for edge-vlm serve (default: the built-in model's 4-bit Q4_K_M bundle); "
                         "llama-cpp-python serves the GGUF its manifest names under llm.file")
    ap.add_argument("--servers", default=",".join(SERVERS), help=f"comma-separated, of {', '.join(SERVERS)}")
    ap.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts, one phase each")
    ap.add_argument("--requests", type=int, default=None,
                    help="requests per phase (default: 4 x concurrency, at least 8), after one warm-up")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="threads of each server (default: the cores; more would make llama.cpp's spinning "
                         "threads fight)")
    ap.add_argument("--parallel", type=int, default=16, help="edge-vlm serve --parallel (sequences batched)")
    ap.add_argument("--max-queue", type=int, default=256, help="edge-vlm serve --max-queue (>= --soak-burst)")
    ap.add_argument("--n-ctx", type=int, default=2048, help="llama-cpp-python --n_ctx")
    ap.add_argument("--soak", action="store_true",
                    help="edge-vlm only, after its phases: 200 requests at once, then 1,000 at concurrency 16 "
                         "with the server's RSS after 100 and after 1,000")
    ap.add_argument("--soak-burst", type=int, default=200, help="--soak: requests fired at once")
    ap.add_argument("--soak-requests", type=int, default=1000,
                    help="--soak: requests of the sustained part (RSS after min(100, half) and after all)")
    ap.add_argument("--soak-concurrency", type=int, default=16, help="--soak: clients of the sustained part")
    ap.add_argument("--prompts", choices=sorted(PROMPTS), default="vqa",
                    help="vqa (default): the shape/colour questions the model was trained on, answers of 1-3 "
                         "tokens; story: 'Tell me a story about this image.', answers up to --max-tokens, a "
                         "decode-heavy load (use another --name)")
    ap.add_argument("--unique-images", action="store_true",
                    help="a new image for every request (default: each client repeats its own image, which "
                         "edge-vlm serve's image-embedding cache then answers without running the vision model)")
    ap.add_argument("--seed", type=int, default=0, help="images and the requests' seed")
    ap.add_argument("--ready-timeout", type=float, default=300.0, help="seconds a server may take to be ready")
    ap.add_argument("--request-timeout", type=float, default=600.0)
    ap.add_argument("--name", default="serve-load", help="output file stem")
    ap.add_argument("--out-dir", default=str(RESULTS))
    a = ap.parse_args()

    bundle = Path(a.bundle)
    if not bundle.is_absolute():
        bundle = (ROOT / bundle) if not bundle.exists() else bundle.resolve()
    manifest = json.loads((bundle / "manifest.json").read_text())
    if manifest["llm"].get("backend") != "gguf":
        ap.error(f"{bundle}: llm backend {manifest['llm'].get('backend')!r}, not gguf: no GGUF for llama-cpp-python")
    servers = [s.strip() for s in a.servers.split(",") if s.strip()]
    if bad := [s for s in servers if s not in SERVERS]:
        ap.error(f"unknown server(s) {bad}; choose from {SERVERS}")
    if a.soak and a.max_queue < a.soak_burst:
        ap.error(f"--soak fires {a.soak_burst} requests at once: --max-queue must be at least that")
    cfg = Config(bundle=bundle, gguf=bundle / manifest["llm"]["file"], servers=servers,
                 concurrency=[int(c) for c in a.concurrency.split(",")], requests=a.requests,
                 max_tokens=a.max_tokens, threads=a.threads, parallel=a.parallel, max_queue=a.max_queue,
                 n_ctx=a.n_ctx, soak=a.soak, soak_burst=a.soak_burst,
                 soak_requests=a.soak_requests, soak_concurrency=a.soak_concurrency, prompts=a.prompts,
                 unique_images=a.unique_images, seed=a.seed,
                 ready_timeout_s=a.ready_timeout, request_timeout_s=a.request_timeout, name=a.name,
                 out_dir=Path(a.out_dir).resolve())
    if a.threads > (os.cpu_count() or 1):
        print(f"warning: --threads {a.threads} > {os.cpu_count()} cores: llama.cpp threads will contend",
              flush=True)

    for sig in (signal.SIGTERM, signal.SIGHUP):  # stop the server (finally: in bench_server) when stopped
        signal.signal(sig, lambda signum, frame: sys.exit(128 + signum))
    t0 = time.perf_counter()
    results = {}
    for kind in cfg.servers:  # one at a time: each server is stopped before the next starts
        results[kind] = bench_server(kind, cfg)
    m = machine()
    from edge_vlm.bench.machine import versions

    m["packages"] = {**m.get("packages", {}), **versions(EXTRA_PACKAGES)}
    out = {"machine": m, "command": "python " + " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
           "config": {**asdict(cfg), "bundle": str(cfg.bundle), "gguf": str(cfg.gguf), "out_dir": str(cfg.out_dir)},
           "duration_s": round(time.perf_counter() - t0, 1), "results": results}
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    (cfg.out_dir / f"{cfg.name}.json").write_text(json.dumps(out, indent=2) + "\n")
    md = markdown(out)
    (cfg.out_dir / f"{cfg.name}.md").write_text(md)
    plot(out, cfg.out_dir / f"{cfg.name}.png")
    print()
    print(md)
    print(f"{out['duration_s']:.0f} s; results: {cfg.out_dir / cfg.name}.{{json,md,png}}")


if __name__ == "__main__":
    main()
