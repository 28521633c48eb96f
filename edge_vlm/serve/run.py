"""Start the server: check the flags and the bundle, open the port, load, serve until Ctrl-C."""
from __future__ import annotations

import logging
import socket
import sys

from edge_vlm.errors import BadInput, BundleError, MissingPackage
from edge_vlm.serve.config import ServeConfig


def _port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise BadInput(f"cannot listen on {host}:{port} ({e.strerror}): another server holds the port, or the "
                           "address is not this machine's; choose another --port / --host") from None


def serve(cfg: ServeConfig, verbose: bool = False) -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise MissingPackage("fastapi and uvicorn", "pip install 'edge-vlm[serve]'", "edge-vlm serve") from e
    from edge_vlm.manifest import load_manifest

    load_manifest(cfg.bundle)  # a missing or unreadable bundle fails now, not after the port is open
    _port_free(cfg.host, cfg.port)
    if verbose:
        import os

        os.environ["EDGE_VLM_LLAMA_VERBOSE"] = "1"
    from edge_vlm.serve.app import Server, create_app

    server = Server(cfg)
    uv = uvicorn.Server(uvicorn.Config(create_app(cfg, server), host=cfg.host, port=cfg.port,
                                       log_level="info" if verbose else "warning", access_log=verbose,
                                       timeout_graceful_shutdown=5))
    load = server.load

    def load_then_announce():
        load()
        if server.load_error:
            print(f"edge-vlm serve: error: {server.load_error}", file=sys.stderr, flush=True)
            uv.should_exit = True
            return
        card = server.model_card()["edge_vlm"]
        host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
        print(f"edge-vlm serve: {server.model_id} ready on http://{host}:{cfg.port}/  ({card['backend']} "
              f"{card['bits']}-bit, {card['batching']} batching x{card['parallel']}, {card['device']})\n"
              f"  chat page: http://{host}:{cfg.port}/   API: http://{host}:{cfg.port}/v1/chat/completions"
              + ("   (API key required)" if cfg.api_key else ""), file=sys.stderr, flush=True)

    server.load = load_then_announce
    logging.getLogger("uvicorn.error").setLevel(logging.INFO if verbose else logging.WARNING)
    print(f"edge-vlm serve: loading {cfg.bundle} ...", file=sys.stderr, flush=True)
    uv.run()
    if server.load_error:
        raise BundleError(server.load_error)
