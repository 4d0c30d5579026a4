"""ASGI middleware in front of the app: metrics, auth, admission, content type and body size.

Everything here happens before a route sees the request, and before its body is read: a request
without the token, over the concurrency limit or with the wrong content type is refused at once;
the body is then read here, up to the size limit and within the request timeout, so an oversized
or stalled upload is cut off whether or not it announced its length.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time

from pso.config.reward_server import LimitsConfig
from reward_server.metrics import ServerMetrics

_BODY_METHODS = {"POST", "PUT", "PATCH"}


class RequestGuard:
    def __init__(
        self,
        app,
        *,
        token: str,
        limits: LimitsConfig,
        content_types: dict[str, tuple[str, ...]],
        open_paths: tuple[str, ...],
        metrics: ServerMetrics,
    ):
        self.app, self.token, self.limits, self.metrics = app, token.encode(), limits, metrics
        self.content_types, self.open_paths = content_types, set(open_paths)
        self.known_paths = self.open_paths | set(content_types) | {"/v1/models"}
        self.active = 0  # requests being handled, probes aside

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

        counted = path not in self.open_paths
        self.active += counted
        try:
            problem = await self._check(scope, receive)
            if isinstance(problem, tuple):
                await _send_error(send_and_count, *problem)
            else:
                await self.app(scope, problem, send_and_count)
        finally:
            self.active -= counted
            self.metrics.requests.labels(endpoint, str(status[0])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)

    async def _check(self, scope, receive):
        """A replaying `receive` for the app, or (status, code, message[, headers]) to answer with instead."""
        if scope["path"] in self.open_paths:
            return receive
        headers = dict(scope["headers"])
        if self.token and not _bearer_matches(headers.get(b"authorization", b""), self.token):
            return 401, "unauthorized", "missing or wrong bearer token", [(b"www-authenticate", b"Bearer")]
        if self.active > self.limits.max_concurrent_requests:
            return 429, "busy", "too many requests in progress; retry shortly", [(b"retry-after", b"1")]
        if scope["method"] not in _BODY_METHODS:
            return receive
        expected = self.content_types.get(scope["path"])
        ctype = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
        if expected and ctype not in expected:
            wanted = " or ".join(expected)
            return 415, "unsupported_media_type", f"{scope['path']} takes {wanted}, got {ctype or 'none'}"
        limit = self.limits.max_body_bytes
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return 400, "bad_request", "invalid Content-Length"
            if int(length) > limit:
                return 413, "body_too_large", f"body of {int(length)} bytes is over the limit of {limit}"
        try:
            body = await asyncio.wait_for(self._read_body(receive, limit), self.limits.request_timeout_s)
        except asyncio.TimeoutError:
            return 408, "body_timeout", f"the body did not arrive within {self.limits.request_timeout_s} s"
        if isinstance(body, tuple):
            return body
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay

    @staticmethod
    async def _read_body(receive, limit: int):
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return 400, "disconnected", "client went away"
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return 413, "body_too_large", f"body is over the limit of {limit} bytes"
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _bearer_matches(header: bytes, token: bytes) -> bool:
    scheme, _, given = header.partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), token)


async def _send_error(send, status: int, code: str, message: str, extra: list | None = None) -> None:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *(extra or [])]
    if status in (408, 413):
        headers.append((b"connection", b"close"))  # the unread rest of the upload is not ours to drain
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
