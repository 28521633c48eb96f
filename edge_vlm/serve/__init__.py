"""`edge-vlm serve`: a bundle behind an OpenAI-compatible HTTP API and a chat page.

    config.py    ServeConfig: every flag, checked before anything loads
    errors.py    the HTTP errors, as OpenAI's error JSON
    images.py    image_url parts -> images (data: URIs; local files and URLs only behind flags)
    requests.py  the chat request schema -> sampling, stops and the rendered conversation
    engine.py    one thread owns the model: continuous batching (gguf) or one request at a time
    metrics.py   Prometheus text for /metrics
    app.py       the FastAPI app: routes, auth, streaming
    static/      the chat page served at /
"""
