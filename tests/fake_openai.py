"""A scripted OpenAI-compatible chat-completions server on 127.0.0.1, shared by the VLM and pipeline tests.

`ScriptedServer(respond)` answers each POST with `respond(index, body) -> (status, text, delay_s)` and
records every request body and its headers, so a test can check what the client sent.
"""

from __future__ import annotations

import base64
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image


class ScriptedServer:
    """Answers POST /v1/chat/completions with `respond(index, body) -> (status, text, delay_s)`."""

    def __init__(self, respond):
        self.respond = respond
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        self.release = threading.Event()  # set on close, so a handler told to stall returns at once
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with owner.lock:
                    index = len(owner.requests)
                    owner.requests.append(body)
                    owner.headers.append(dict(self.headers))
                    owner.in_flight += 1
                    owner.max_in_flight = max(owner.max_in_flight, owner.in_flight)
                try:
                    status, text, delay = owner.respond(index, body)
                    if delay and owner.release.wait(delay):
                        return
                    if status == 200:
                        message = {"role": "assistant", "content": text}
                        payload = json.dumps({"choices": [{"index": 0, "message": message}]}).encode()
                    else:
                        payload = (text or "").encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up on this attempt
                finally:
                    with owner.lock:
                        owner.in_flight -= 1

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05})
        self.thread.daemon = True

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> "ScriptedServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def always(text: str, status: int = 200, delay: float = 0.0):
    return lambda index, body: (status, text, delay)


def endpoint(server: ScriptedServer, **extra) -> dict:
    options = {"backend": "openai", "base_url": server.base_url, "model": "qwen-vl", "backoff_s": 0.01}
    options.update(extra)
    return options


def decode_data_url(url: str) -> np.ndarray:
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix)
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url[len(prefix):]))).convert("RGB"))


def first_pixel(body: dict) -> int:
    """The red value of the first image of a recorded request: tests tag their images with it."""
    url = body["messages"][0]["content"][0]["image_url"]["url"]
    return int(decode_data_url(url)[0, 0, 0])
