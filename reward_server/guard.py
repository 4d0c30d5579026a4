"""ASGI middleware in front of the app: metrics, cross-site refusal, auth, admission, content type,
body size and memory, client disconnects and errors.

Everything here happens before a route sees the request, and before its body is read: a browser
request from another site, a request without the token, over the concurrency limit or with the
wrong content type is refused at once; the body is then read here, up to the size limit, within
the request timeout and within the bytes all requests may hold together, so an oversized,
stalled or crowding upload is cut off whether or not it announced its length. After the body,
a watcher listens for the client going away and completes `scope[CLIENT_GONE]`, so that the work of
a request nobody waits for stops (the request is counted with status 499). An error in the app
is answered with a JSON 500 and logged here, so it never reaches the HTTP server, which would
drop the kept-alive connection. (Header size and header time are bounded by the HTTP server:
see `reward_server/main.py`.)
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from urllib.parse import urlsplit

from pso.config import ConfigError
from pso.config.reward_server import LimitsConfig, RewardServerConfig
from pso.secrets import read_secret
from reward_server.errors import GONE, error_body
from reward_server.metrics import ServerMetrics

log = logging.getLogger("pso.reward_server")

CLIENT_GONE = "pso.client_gone"  # scope key: a future that is done once the client disconnects
_BODY_METHODS = {"POST", "PUT", "PATCH"}


def bearer_token(config: RewardServerConfig) -> str:
    """The token from `$token_env` or the file `${token_env}_FILE` names ("" for none); a value of only
    whitespace is a mistake, not "no auth"."""
    value = read_secret(config.token_env) or ""
    if value and not value.strip():
        raise ConfigError(f"${config.token_env} holds only whitespace: set a real token, or leave it empty for no auth")
    return value.strip()


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
        self.buffered = 0  # body bytes held by the requests being handled

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in self.known_paths else "other"
        start, status, answered = time.perf_counter(), [None], [False]
        gone = scope[CLIENT_GONE] = asyncio.get_running_loop().create_future()

        async def send_and_count(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            if gone.done():
                return  # nobody to answer
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                answered[0] = True

        counted = path not in self.open_paths
        self.active += counted
        held, watcher = [0], None
        try:
            problem = await self._check(scope, receive, held)
            if isinstance(problem, tuple):
                if problem[0] != GONE:  # the body may be unread: the connection cannot carry another request
                    await _send_error(send_and_count, *problem, close=scope["method"] in _BODY_METHODS)
                return
            if problem is not receive:  # the body was read here: listen for the client leaving
                watcher = asyncio.create_task(_watch(receive, gone, answered))
            await self.app(scope, problem, send_and_count)
        except Exception:
            log.exception("%s %s failed", scope["method"], path)
            if status[0] is None and not gone.done():  # nothing sent yet
                await _send_error(send_and_count, 500, "internal", "internal error; see the server log")
        finally:
            if watcher is not None:
                watcher.cancel()
            self.active -= counted
            self.buffered -= held[0]
            self.metrics.body_bytes.set(self.buffered)
            if status[0] is None or (gone.done() and not answered[0]):
                status[0] = GONE  # the client left before its answer
            self.metrics.requests.labels(endpoint, str(status[0])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)

    async def _check(self, scope, receive, held: list[int]):
        """A `receive` for the app, or (status, code, message[, headers]) to answer with instead. Body bytes
        held for the request are added to `held[0]` (and to `self.buffered`) as they are taken."""
        if scope["path"] in self.open_paths:
            return receive
        headers = dict(scope["headers"])
        if scope["method"] in _BODY_METHODS and _cross_site(headers):
            return 403, "cross_site", "requests from a web page of another site are refused"
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
            return 415, "unsupported_media_type", f"{scope['path']} takes {wanted}, got {ctype[:100] or 'none'}"
        limit = self.limits.max_body_bytes
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit() or len(length) > 20:
                return 400, "bad_request", "invalid Content-Length"
            if int(length) > limit:
                return 413, "body_too_large", f"body of {int(length)} bytes is over the limit of {limit}"
        try:
            body = await asyncio.wait_for(self._read_body(receive, limit, held), self.limits.request_timeout_s)
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
            await scope[CLIENT_GONE]  # the watcher owns the real `receive` from now on
            return {"type": "http.disconnect"}

        return replay

    def _hold(self, n: int, held: list[int]) -> bool:
        """Take `n` more bytes of the shared body budget for this request, if there are that many left."""
        if self.buffered + n > self.limits.max_buffered_bytes:
            return False
        self.buffered += n
        held[0] += n
        self.metrics.body_bytes.set(self.buffered)
        return True

    async def _read_body(self, receive, limit: int, held: list[int]):
        """The body, taking its bytes from the shared budget as they arrive (an announced length that never
        arrives holds nothing); or the answer to give instead."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return GONE, "client_gone", "the client went away"  # answered to nobody
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return 413, "body_too_large", f"body is over the limit of {limit} bytes"
            if not self._hold(len(chunk), held):
                return _crowded()
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


async def _watch(receive, gone: asyncio.Future, answered: list[bool]) -> None:
    """Complete `gone` if the client disconnects before the answer is sent (servers also report a
    disconnect once the answer is out)."""
    while (await receive())["type"] != "http.disconnect":
        pass
    if not answered[0]:
        gone.set_result(None)


def _crowded() -> tuple:
    return 429, "busy", "too many request bodies held in memory; retry shortly", [(b"retry-after", b"1")]


def _cross_site(headers: dict[bytes, bytes]) -> bool:
    """Whether a browser sent this from a page of another origin (a cross-site form post needs no CORS
    preflight). Browsers say so in Sec-Fetch-Site, or else in an Origin that differs from the Host;
    requests without either (curl, httpx, the actors) are not from a browser page."""
    site = headers.get(b"sec-fetch-site")
    if site is not None:
        return site not in (b"same-origin", b"none")
    origin = headers.get(b"origin")
    if origin is None:
        return False
    return urlsplit(origin.decode("latin-1")).netloc != headers.get(b"host", b"").decode("latin-1")


def _bearer_matches(header: bytes, token: bytes) -> bool:
    scheme, _, given = header.partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), token)


async def _send_error(
    send, status: int, code: str, message: str, extra: list | None = None, close: bool = False
) -> None:
    body = error_body(code, message)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *(extra or [])]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
