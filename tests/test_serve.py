"""`edge-vlm serve` against a live server on 127.0.0.1, driven by the official `openai` client
(and raw HTTP where the exact wire shape or a malformed request is the point)."""
from __future__ import annotations

import base64
import io
import json
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai", reason="the [serve] tests need the openai client (pip install -e '.[dev]')")
pytest.importorskip("fastapi", reason="edge-vlm serve needs its [serve] extra")

from serve_fixtures import live_server  # noqa: E402

def shape_png(shape: str, colour, size: int = 64, fmt: str = "PNG") -> bytes:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (250, 248, 240))
    d = ImageDraw.Draw(img)
    s = size / 64
    box = (14 * s, 14 * s, 50 * s, 50 * s)
    {"circle": lambda: d.ellipse(box, fill=colour), "rectangle": lambda: d.rectangle((10 * s, 18 * s, 54 * s, 46 * s),
                                                                                      fill=colour),
     "triangle": lambda: d.polygon([(32 * s, 8 * s), (56 * s, 54 * s), (8 * s, 54 * s)], fill=colour)}[shape]()
    out = io.BytesIO()
    img.save(out, fmt)
    return out.getvalue()


def easy_vqa(n: int):
    """(png bytes, question, answer) from easy-VQA's test split: what the built-in model was trained on."""
    from edge_vlm.data import load_questions

    return [(q.image.read_bytes(), q.text, q.answer) for q in load_questions("easy-vqa", "test", limit=n)]


def by_answer(answer: str):
    return next((png, q) for png, q, a in easy_vqa(40) if a == answer and q.startswith("what"))


def data_uri(png: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(png).decode()


def ask(text: str, png: bytes | None = None) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": data_uri(png)}}] if png else []
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


def post(url: str, body, headers=None, raw: bytes | None = None) -> tuple[int, dict]:
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", data=data, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                if line.rsplit(" ", 1)[0] == name or "{" in name:
                    return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


@pytest.fixture(scope="module")
def server(nano_q4):
    with live_server(nano_q4, "--parallel", "4", "--model-name", "nano") as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


def test_models_health_and_metrics(server, client):
    models = client.models.list().data
    assert [m.id for m in models] == ["nano"]
    card = models[0].model_extra["edge_vlm"]
    assert card["backend"] == "gguf" and card["batching"] == "continuous" and card["parallel"] == 4
    with urllib.request.urlopen(server + "/health") as r:
        assert json.load(r)["status"] == "ready"
    with urllib.request.urlopen(server + "/metrics") as r:
        text = r.read().decode()
    assert 'edge_vlm_requests_total{outcome="ok"}' in text and "edge_vlm_time_to_first_token_seconds_bucket" in text


def test_image_question_non_streaming(client):
    png, question = by_answer("rectangle")
    r = client.chat.completions.create(model="nano", messages=ask(question, png), max_tokens=8)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert "rectangle" in r.choices[0].message.content.lower()
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens > 4 and r.usage.completion_tokens >= 1
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streaming_chunks_are_shaped_as_openai_does(server):
    png, question = by_answer("red")
    body = {"model": "nano", "messages": ask(question, png),
            "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 8}
    req = urllib.request.Request(server + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [ln[len("data: "):] for ln in r.read().decode().split("\n") if ln.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finals) == 1 and finals[0]["choices"][0]["finish_reason"] in ("stop", "length")
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 1
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert "red" in text.lower()


def test_streaming_with_the_openai_client_matches_non_streaming(client):
    msgs = ask("what shape is in the image?", shape_png("triangle", (40, 160, 60)))
    whole = client.chat.completions.create(model="nano", messages=msgs, max_tokens=12).choices[0].message.content
    pieces = [c.choices[0].delta.content or "" for c in
              client.chat.completions.create(model="nano", messages=msgs, max_tokens=12, stream=True) if c.choices]
    assert "".join(pieces) == whole and whole


def test_stop_strings_and_seeds(client):
    png, question = by_answer("rectangle")
    r = client.chat.completions.create(model="nano", messages=ask(question, png), max_tokens=8, stop=["tangle"])
    assert r.choices[0].message.content == "rec" and r.choices[0].finish_reason == "stop"
    story = [{"role": "user", "content": "Tell me a story."}]
    runs = [client.chat.completions.create(model="nano", messages=story, max_tokens=12, temperature=1.0, seed=s)
            .choices[0].message.content for s in (7, 7, 8)]
    assert runs[0] == runs[1] and runs[0] != runs[2]
    r = client.chat.completions.create(model="nano", messages=story, max_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3


def test_multi_turn_puts_the_image_in_its_turn(client):
    png, question = by_answer("rectangle")
    first = ask(question, png)
    a1 = client.chat.completions.create(model="nano", messages=first, max_tokens=8).choices[0].message.content
    msgs = first + [{"role": "assistant", "content": a1}, {"role": "user", "content": "what color is the shape?"}]
    r = client.chat.completions.create(model="nano", messages=msgs, max_tokens=12)
    assert r.choices[0].message.content.strip()
    # the second turn's prompt holds the first turn, its answer and the image
    assert r.usage.prompt_tokens > client.chat.completions.create(
        model="nano", messages=first, max_tokens=1).usage.prompt_tokens


def test_several_clients_at_once_each_get_the_answer_for_their_own_image(client):
    """Batched decoding must never mix sequences: each concurrent answer equals the answer the same
    server gives that request alone."""
    from edge_vlm.data import normalize_answer

    items = easy_vqa(16)
    reqs = [ask(q, png) for png, q, _ in items]

    def one(msgs):
        return client.chat.completions.create(model="nano", messages=msgs, max_tokens=10).choices[0].message.content

    alone = [one(m) for m in reqs]
    with ThreadPoolExecutor(len(reqs)) as pool:
        together = list(pool.map(one, reqs))
    assert together == alone
    right = sum(normalize_answer(a) == want for a, (_, _, want) in zip(together, items))
    assert right >= 11, list(zip(together, [want for *_, want in items]))


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server, client):
    before = metric(server, 'edge_vlm_requests_total{outcome="cancelled"}')
    stream = client.chat.completions.create(
        model="nano", messages=[{"role": "user", "content": "Write a long story about a robot."}],
        max_tokens=1500, temperature=1.5, seed=1, stream=True)
    got = 0
    for chunk in stream:
        got += bool(chunk.choices and chunk.choices[0].delta.content)
        if got >= 3:
            break
    stream.close()
    deadline = time.monotonic() + 10
    while metric(server, "edge_vlm_active_requests") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(server, "edge_vlm_active_requests") == 0
    assert metric(server, 'edge_vlm_requests_total{outcome="cancelled"}') == before + 1


def test_a_client_that_gives_up_on_a_whole_answer_frees_its_slot(server):
    before = metric(server, 'edge_vlm_requests_total{outcome="cancelled"}')
    body = {"model": "nano", "messages": [{"role": "user", "content": "Write a long story about a robot."}],
            "max_tokens": 1500, "temperature": 1.5, "seed": 1}
    req = urllib.request.Request(server + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(OSError):  # the client's timeout: it closes the connection
        urllib.request.urlopen(req, timeout=1.5)
    deadline = time.monotonic() + 10
    while metric(server, 'edge_vlm_requests_total{outcome="cancelled"}') == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(server, 'edge_vlm_requests_total{outcome="cancelled"}') == before + 1
    assert metric(server, "edge_vlm_active_requests") == 0


def test_the_image_embedding_cache_skips_the_vision_model(server, client):
    png = shape_png("triangle", (0, 128, 128), size=80)  # an image no other test sends
    hits, misses = (metric(server, "edge_vlm_image_cache_hits_total"),
                    metric(server, "edge_vlm_image_cache_misses_total"))
    for q in ("what shape is in the image?", "what color is the shape?"):
        client.chat.completions.create(model="nano", messages=ask(q, png), max_tokens=4)
    assert metric(server, "edge_vlm_image_cache_misses_total") == misses + 1
    assert metric(server, "edge_vlm_image_cache_hits_total") == hits + 1


BAD_REQUESTS = [
    ("unknown model", {"model": "gpt-4o"}, 404, "model_not_found"),
    ("n > 1", {"n": 2}, 400, "unsupported_parameter"),
    ("temperature out of range", {"temperature": 5}, 400, None),
    ("tools", {"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "unsupported_parameter"),
    ("no messages", {"messages": []}, 400, None),
    ("assistant last", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
     400, None),
    ("not base64", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@@"}}]}]}, 400, "invalid_image"),
    ("not an image", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_uri(b"hello, not a png")}}]}]}, 400, "invalid_image"),
    ("gif media type", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/gif;base64,R0lGOD=="}}]}]}, 400, "invalid_image"),
    ("remote URL", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]}, 400, "invalid_image"),
    ("local path", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "/etc/passwd"}}]}]}, 400, "invalid_image"),
    ("two images", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_uri(shape_png("circle", (1, 2, 3)))}},
        {"type": "image_url", "image_url": {"url": data_uri(shape_png("circle", (1, 2, 3)))}}]}]}, 400, None),
    ("max_tokens beyond the context", {"max_tokens": 100_000}, 400, "context_length_exceeded"),
    ("prompt beyond the context", {"messages": [{"role": "user", "content": "word " * 5000}]}, 400,
     "context_length_exceeded"),
]


@pytest.mark.parametrize("what,change,status,code", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_openai_errors(server, what, change, status, code):
    body = {"model": "nano", "messages": [{"role": "user", "content": "hi"}], **change}
    got, err = post(server, body)
    assert got == status, err
    assert set(err["error"]) >= {"message", "type", "code"} and err["error"]["message"]
    assert "Traceback" not in err["error"]["message"]
    if code:
        assert err["error"]["code"] == code, err


def test_truncated_image_and_malformed_json(server):
    png = shape_png("circle", (30, 60, 200))
    got, err = post(server, {"model": "nano", "messages": ask("hi", png[: len(png) // 2])})
    assert got == 400 and err["error"]["code"] == "invalid_image"
    got, err = post(server, None, raw=b'{"model": "nano", "messages": [')
    assert got == 400 and "JSON" in err["error"]["message"]
    req = urllib.request.Request(server + "/v1/nothing-here")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req)
    assert e.value.code == 404 and json.load(e.value)["error"]["message"]


def test_the_openai_client_raises_its_own_error_types(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="nano", messages=[{"role": "user", "content": "hi"}], n=3)


@pytest.fixture(scope="module")
def strict_server(nano_q4, tmp_path_factory):
    images = tmp_path_factory.mktemp("served-images")
    png, _ = by_answer("rectangle")
    (images / "shape.png").write_bytes(png)
    with live_server(nano_q4, "--api-key", "s3cret", "--parallel", "1", "--max-queue", "0", "--model-name", "nano",
                     "--max-request-mb", "0.05", "--max-image-pixels", "20000",
                     "--allow-local-images", str(images), "--allow-remote-images") as url:
        yield url


def test_api_key(strict_server):
    body = {"model": "nano", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        got, err = post(strict_server, body, headers)
        assert got == 401 and err["error"]["code"] == "invalid_api_key"
    got, _ = post(strict_server, body, {"Authorization": "Bearer s3cret"})
    assert got == 200
    c = openai.OpenAI(base_url=strict_server + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        c.models.list()


def test_sizes_are_bounded(strict_server):
    auth = {"Authorization": "Bearer s3cret"}
    big = {"model": "nano", "messages": [{"role": "user", "content": "x" * 100_000}]}
    got, err = post(strict_server, big, auth)
    assert got == 413, err
    wide = shape_png("circle", (30, 60, 200), size=200)  # 40,000 pixels > --max-image-pixels 20000, a small file
    got, err = post(strict_server, {"model": "nano", "messages": ask("hi", wide)}, auth)
    assert got == 413 and "pixels" in err["error"]["message"], err


def test_local_images_only_inside_the_allowed_folder(strict_server):
    auth = {"Authorization": "Bearer s3cret"}

    def with_url(url):
        return {"model": "nano", "max_tokens": 4, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what shape is in the image?"}]}]}

    got, r = post(strict_server, with_url("shape.png"), auth)
    assert got == 200 and "rectangle" in r["choices"][0]["message"]["content"].lower()
    for outside in ("../shape.png", "/etc/hostname", "file:///etc/hostname"):
        got, err = post(strict_server, with_url(outside), auth)
        assert got == 400 and err["error"]["code"] == "invalid_image", (outside, err)
    # --allow-remote-images fetches only from public hosts: this server itself is not one
    for internal in (strict_server + "/metrics", "http://169.254.169.254/latest/meta-data/"):
        got, err = post(strict_server, with_url(internal), auth)
        assert got == 400 and "internal address" in err["error"]["message"], (internal, err)


def test_a_full_queue_answers_429(strict_server):
    """--parallel 1 --max-queue 0: while one request decodes, the next is refused at once."""
    c = openai.OpenAI(base_url=strict_server + "/v1", api_key="s3cret", max_retries=0)
    stream = c.chat.completions.create(model="nano", messages=[{"role": "user", "content": "Tell a long story."}],
                                       max_tokens=1000, temperature=1.5, seed=3, stream=True)
    next(iter(stream))
    try:
        with pytest.raises(openai.RateLimitError):
            c.chat.completions.create(model="nano", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    finally:
        stream.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the slot comes back once the stream is gone
        try:
            c.chat.completions.create(model="nano", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
            break
        except openai.RateLimitError:
            time.sleep(0.1)
    else:
        pytest.fail("the cancelled stream never gave its slot back")


def test_serve_refuses_bad_flags_and_bundles_in_one_line(tmp_path):
    import subprocess
    import sys

    for args, needle in ((["serve", str(tmp_path / "nope")], "not a bundle"),
                         (["serve", str(tmp_path), "--parallel", "0"], "out of range"),
                         (["serve", str(tmp_path), "--allow-local-images", str(tmp_path / "no-such-dir")], "not a folder")):
        p = subprocess.run([sys.executable, "-m", "edge_vlm.cli", *args], capture_output=True, text=True, timeout=60)
        assert p.returncode in (2, 3), p
        assert "Traceback" not in p.stderr and needle in p.stderr.lower(), p.stderr




def test_other_backends_answer_one_request_at_a_time(export_backend, shape_image):
    """An onnx bundle has one sequence: /v1/models says "serial", and concurrent clients all get their
    answers (queued), the same as when they come one by one."""
    bundle = export_backend("onnx", 8)
    with live_server(bundle, "--model-name", "tiny") as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        card = c.models.list().data[0].model_extra["edge_vlm"]
        assert card["batching"] == "serial" and card["parallel"] == 1
        reqs = [ask(q, shape_image.read_bytes()) for q in ("what is it?", "describe it", "colour?", "shape?")]

        def one(msgs):
            return c.chat.completions.create(model="tiny", messages=msgs, max_tokens=6).choices[0].message.content

        alone = [one(m) for m in reqs]
        with ThreadPoolExecutor(len(reqs)) as pool:
            assert list(pool.map(one, reqs)) == alone


def test_while_loading_every_api_route_answers_503_and_health_says_loading(tmp_path):
    """The app before its bundle has loaded (FastAPI's test client runs no lifespan, so nothing loads)."""
    from fastapi.testclient import TestClient

    from edge_vlm.serve.app import Server, create_app
    from edge_vlm.serve.config import ServeConfig

    cfg = ServeConfig(bundle=str(tmp_path))
    c = TestClient(create_app(cfg, Server(cfg)))
    r = c.get("/health")
    assert r.status_code == 503 and r.json() == {"status": "loading"}
    r = c.post("/v1/chat/completions", json={"model": tmp_path.name, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 503 and r.json()["error"]["code"] == "loading" and r.headers["retry-after"]
    assert c.get("/v1/models").status_code == 503
    assert "edge_vlm_requests_total" in c.get("/metrics").text
