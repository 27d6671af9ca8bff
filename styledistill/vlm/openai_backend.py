"""An OpenAI-compatible chat-completions endpoint (a vLLM server the user runs), over the standard library.

Each request is one user message: the images as base64 PNG data URLs in order, then the text;
`temperature: 0` for greedy answers. Connection errors, timeouts, HTTP 429 and 5xx are retried with
exponential backoff; other HTTP errors are not (a 400 stays a 400). After the last attempt the result
carries the error. Requests run on a thread pool of `concurrency` workers.

Bounded time: connecting and every wait for data time out after `timeout_s` (a non-streaming server
sends nothing until its answer is done, so a slow or hung server fails the attempt there), and a body
still arriving `timeout_s` after the attempt began is abandoned. Once one request of a batch has used up
its attempts on a retryable failure, the endpoint is taken as down for the rest of that batch: the other
requests stop instead of each waiting out their own attempts, so a dead endpoint costs a batch about
attempts * timeout_s plus backoff, not that times the batch size. The next batch tries again.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from styledistill.vlm.base import ChatRequest, ChatResult, OpenAIVLMOptions, VLMClient

RETRYABLE_STATUS = {429, 500, 502, 503, 504}
_ERROR_SNIPPET = 300


def png_data_url(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class _Retryable(Exception):
    """A failure worth another attempt (connection, timeout, 429, 5xx)."""


class _EndpointDown:
    """Shared by the requests of one batch: set once a request has exhausted its attempts."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.reason = ""

    def mark(self, reason: str) -> None:
        self.reason = reason
        self.event.set()


class OpenAIChatVLM(VLMClient):
    def __init__(self, options: OpenAIVLMOptions, device: str = "cpu", threads: int = 1):
        # device and threads: the endpoint's concern, not this client's; accepted so every client is built alike
        self.options = options
        self.url = options.base_url.rstrip("/") + "/chat/completions"
        self.headers = {"Content-Type": "application/json"}

    def setup(self) -> None:
        name = self.options.api_key_env
        if name is not None:
            key = os.environ.get(name)
            if not key:
                raise ValueError(f"VLM endpoint api_key_env names {name}, which is not set")
            self.headers["Authorization"] = f"Bearer {key}"

    def payload(self, request: ChatRequest) -> dict:
        content = [
            {"type": "image_url", "image_url": {"url": png_data_url(image)}} for image in request.images
        ]
        content.append({"type": "text", "text": request.text})
        return {
            "model": self.options.model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": request.max_new_tokens,
            "temperature": 0,
        }

    def chat(self, requests: list[ChatRequest]) -> list[ChatResult]:
        if not requests:
            return []
        down = _EndpointDown()
        workers = min(self.options.concurrency, len(requests))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vlm-http") as pool:
            return list(pool.map(lambda request: self._chat_one(request, down), requests))

    def _chat_one(self, request: ChatRequest, down: _EndpointDown) -> ChatResult:
        body = json.dumps(self.payload(request)).encode()
        last = ""
        for attempt in range(self.options.attempts):
            delay = 0.0
            if attempt:
                delay = min(self.options.backoff_s * 2 ** (attempt - 1), self.options.max_backoff_s)
            if down.event.wait(delay):  # wait(0) just reads the flag
                if not attempt:
                    return ChatResult(error=f"not sent: endpoint down for this batch ({down.reason})")
                return ChatResult(error=f"stopped after {attempt} attempt(s), endpoint down: {last}")
            try:
                return self._attempt(body)
            except _Retryable as err:
                last = str(err)
        reason = f"{self.url}: gave up after {self.options.attempts} attempt(s): {last}"
        down.mark(reason)
        return ChatResult(error=reason)

    def _attempt(self, body: bytes) -> ChatResult:
        """One POST; a retryable failure raises `_Retryable`, anything else is a final result."""
        started = time.monotonic()
        request = urllib.request.Request(self.url, data=body, headers=self.headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.options.timeout_s) as response:
                raw = self._read(response, started + self.options.timeout_s)
        except urllib.error.HTTPError as err:
            detail = f"HTTP {err.code}: {_snippet(err)}"
            if err.code in RETRYABLE_STATUS:
                raise _Retryable(detail) from None
            return ChatResult(error=detail)
        except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
            # URLError wraps refused/unreachable connections; OSError covers socket timeouts and resets.
            raise _Retryable(f"{type(err).__name__}: {getattr(err, 'reason', err)}") from None
        return _parse_completion(raw)

    @staticmethod
    def _read(response: http.client.HTTPResponse, deadline: float) -> bytes:
        # read1 returns after one socket read, so a server trickling bytes cannot outlive the deadline.
        chunks = []
        while chunk := response.read1(65536):
            chunks.append(chunk)
            if time.monotonic() > deadline:
                raise TimeoutError("response body not complete within timeout_s")
        return b"".join(chunks)

    def model_info(self) -> dict[str, str]:
        options = self.options
        return {"vlm_backend": "openai", "vlm_model": options.model, "vlm_endpoint": options.base_url}


def _snippet(err: urllib.error.HTTPError) -> str:
    try:
        return err.read(_ERROR_SNIPPET).decode("utf-8", "replace").strip()
    except OSError:
        return ""


def _parse_completion(raw: bytes) -> ChatResult:
    snippet = raw[:_ERROR_SNIPPET].decode("utf-8", "replace")
    try:
        text = json.loads(raw)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        return ChatResult(error=f"unexpected response: {snippet}")
    if not isinstance(text, str):
        return ChatResult(error=f"response has no text content: {snippet}")
    return ChatResult(text=text.strip())
