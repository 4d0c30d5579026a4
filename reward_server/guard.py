"""ASGI middleware in front of the app: request metrics, content-type and body-size checks.

The body is read here, up to the limit, before any route sees it, so an oversized upload is cut
off with a 413 whether or not it announced its length.
"""

from __future__ import annotations

import json
import time

from reward_server.metrics import ServerMetrics

_BODY_METHODS = {"POST", "PUT", "PATCH"}


class RequestGuard:
    def __init__(self, app, *, max_body_bytes: int, content_types: dict[str, tuple[str, ...]], metrics: ServerMetrics):
        self.app, self.max_body_bytes, self.content_types, self.metrics = app, max_body_bytes, content_types, metrics
        self.known_paths = set(content_types)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in self.known_paths else "other"
        start, status = time.perf_counter(), [500]

        async def send_and_count(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            problem = await self._check(scope, receive)
            if isinstance(problem, tuple):
                await _send_error(send_and_count, *problem)
            else:
                await self.app(scope, problem, send_and_count)
        finally:
            self.metrics.requests.labels(endpoint, str(status[0])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)

    async def _check(self, scope, receive):
        """A replaying `receive` for the app, or (status, code, message) to answer with instead."""
        if scope["method"] not in _BODY_METHODS:
            return receive
        headers = dict(scope["headers"])
        expected = self.content_types.get(scope["path"])
        ctype = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
        if expected and ctype not in expected:
            wanted = " or ".join(expected)
            return 415, "unsupported_media_type", f"{scope['path']} takes {wanted}, got {ctype or 'none'}"
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return 400, "bad_request", "invalid Content-Length"
            if int(length) > self.max_body_bytes:
                return 413, "body_too_large", f"body of {int(length)} bytes is over the limit of {self.max_body_bytes}"
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return 400, "disconnected", "client went away"
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return 413, "body_too_large", f"body is over the limit of {self.max_body_bytes} bytes"
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay


async def _send_error(send, status: int, code: str, message: str) -> None:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 413:
        headers.append((b"connection", b"close"))  # the unread rest of the upload is not ours to drain
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
