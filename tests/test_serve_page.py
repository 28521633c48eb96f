"""The chat page (`GET /` of `edge-vlm serve`) in a real headless browser, Debian's chromium driven by
playwright, against a live server on the built-in model: attach an image, ask, read the streamed answer;
and the API-key field when the server has a key."""
from __future__ import annotations

import json
import os
import urllib.request

import pytest

CHROMIUM = "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium): no browser for the chat page test",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")

from serve_fixtures import live_server  # noqa: E402

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ANSWER_S = 90  # first request: the server may still be warming up its model
QUESTION = "what shape is in the image?"


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser):
    """A fresh page (own localStorage) at a phone's size; fails the test on any JavaScript error."""
    context = browser.new_context(viewport={"width": 390, "height": 780}, device_scale_factor=1)
    pg = context.new_page()
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.set_default_timeout(20_000)
    yield pg
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


@pytest.fixture
def circle_png(tmp_path):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(img).ellipse((17, 17, 47, 47), fill=(0, 0, 255))
    path = tmp_path / "blue-circle.png"
    img.save(path)
    return path


def model_id(url: str, key: str | None = None) -> str:
    req = urllib.request.Request(url + "/v1/models", headers={"Authorization": f"Bearer {key}"} if key else {})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)["data"][0]["id"]


def ask(page, text: str):
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def test_page_streams_an_answer_about_an_attached_image(page, nano_q4, circle_png, tmp_path):
    expect = sync_api.expect
    with live_server(nano_q4) as url:
        posted = []
        page.on("request", lambda r: posted.append(r.post_data_json)
                if r.method == "POST" and r.url.endswith("/v1/chat/completions") else None)
        page.goto(url + "/")
        expect(page.locator("#model")).to_have_text(model_id(url))
        expect(page.locator("#api-key")).to_be_hidden()

        page.set_input_files("#image-input", str(circle_png))
        expect(page.locator("#preview")).to_be_visible()
        ask(page, QUESTION)
        expect(page.locator(".stats")).to_have_count(1, timeout=ANSWER_S * 1000)

        assert page.locator(".error").count() == 0, page.locator(".error").all_inner_texts()
        answer = page.locator(".assistant").inner_text().strip()
        assert answer, "the assistant bubble is empty"
        assert "circle" in answer.lower(), f"the model answered {answer!r} for a blue circle"
        stats = page.locator(".stats").inner_text()
        assert "TTFT" in stats and "tok/s" in stats, stats  # "tok/s": the usage chunk arrived
        expect(page.locator("#preview")).to_be_hidden()  # the image went with the message
        expect(page.locator(".user img")).to_have_count(1)

        (body,) = posted
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
        assert body["max_tokens"] == 128 and body["model"] == model_id(url)
        (user,) = body["messages"]
        assert user["role"] == "user"
        image_part, text_part = user["content"]
        assert image_part["type"] == "image_url" and image_part["image_url"]["url"].startswith("data:image/png;base64,")
        assert text_part == {"type": "text", "text": QUESTION}

        # the second turn sends the history: the first question (with its image), the answer, the new question
        ask(page, "what color is the shape?")
        expect(page.locator(".stats")).to_have_count(2, timeout=ANSWER_S * 1000)
        assert page.locator(".error").count() == 0, page.locator(".error").all_inner_texts()
        second = posted[1]["messages"]
        assert [m["role"] for m in second] == ["user", "assistant", "user"]
        assert second[0] == user and second[1]["content"] == answer
        assert second[2]["content"] == "what color is the shape?"
        page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)

        # another image starts a new conversation (the models take one image each), and the page says so
        page.set_input_files("#image-input", str(circle_png))
        expect(page.locator(".notice")).to_contain_text("new conversation")
        expect(page.locator(".assistant")).to_have_count(0)
        page.click("#new-chat")
        expect(page.locator("#preview")).to_be_hidden()


def test_page_asks_for_the_api_key(page, nano_q4, circle_png):
    expect = sync_api.expect
    with live_server(nano_q4, "--api-key", "secret") as url:
        page.goto(url + "/")
        expect(page.locator("#api-key")).to_be_visible()

        page.fill("#api-key", "wrong")
        page.click("#save-key")
        page.set_input_files("#image-input", str(circle_png))
        ask(page, QUESTION)
        expect(page.locator(".error")).to_have_count(1)
        assert page.locator(".error").inner_text().strip() != "Error:"
        expect(page.locator("#preview")).to_be_visible()  # the image waits for the next try
        expect(page.locator("#prompt")).to_have_value(QUESTION)  # and so does the question

        page.fill("#api-key", "secret")
        page.click("#save-key")
        expect(page.locator("#model")).to_have_text(model_id(url, "secret"))
        assert page.evaluate("localStorage.getItem('edge-vlm.api-key')") == "secret"
        ask(page, QUESTION)
        expect(page.locator(".stats")).to_have_count(1, timeout=ANSWER_S * 1000)
        assert page.locator(".error").count() == 1
        assert page.locator(".assistant").inner_text().strip()

        # a key that stops working: the chat request itself is refused with OpenAI's error JSON
        page.fill("#api-key", "wrong-again")
        page.click("#save-key")
        expect(page.locator("#auth-note")).to_contain_text("did not accept")
        ask(page, "what color is the shape?")
        expect(page.locator(".error")).to_have_count(2)
