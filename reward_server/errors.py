"""Client-facing errors: each carries the HTTP status and a short code, and becomes a JSON body
`{"error": {"code": ..., "message": ...}}`."""

from __future__ import annotations

import json

MAX_MESSAGE_CHARS = 1000  # messages may quote what the client sent: never send back more than this
GONE = 499  # the status a request is counted with when its client left before the answer (as nginx does)


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def bad_request(code: str, message: str) -> ApiError:
    return ApiError(400, code, message)


def unprocessable(code: str, message: str) -> ApiError:
    return ApiError(422, code, message)


def client_gone() -> ApiError:
    return ApiError(GONE, "client_gone", "the client went away")


def error_body(code: str, message: str) -> bytes:
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[: MAX_MESSAGE_CHARS - 3] + "..."
    return json.dumps({"error": {"code": code, "message": message}}).encode()


def describe_validation(errors: list[dict]) -> str:
    """A schema validation failure in words: where and what, for the first few problems."""
    return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in errors[:10])


def shorten(text: str, chars: int = 60) -> str:
    """`text` as a client sent it, quoted and cut to `chars` characters for an error message."""
    return repr(text if len(text) <= chars else text[:chars] + "...")
