"""Request bodies read whole, bounded in size and time, before any route sees them.

The routes parse JSON bodies, so the whole body is in memory anyway; reading it here first
lets the server refuse what it must not parse: a body over --max-body-bytes (413, from the
Content-Length alone when it is declared), one that trickles in slower than --body-timeout
allows (408), and JSON that the parser accepts but Python text cannot hold (400, see
json_text). The route then receives the same bytes, and later receive() calls (the
disconnect watch) go to the client's connection as before.
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sageserve.server.json_text import json_body_problem
from sageserve.server.protocol import APIError, error_response

# Bodies up to this size are checked on the event loop: a thread hop would cost more.
_INLINE_CHECK_BYTES = 64 * 1024


class _BodyTooLarge(Exception):
    pass


class _ClientLeft(Exception):
    pass


class BoundedBody:
    """ASGI middleware: read each request body whole, within `max_bytes` and `timeout_s`."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        try:
            body = await self._read(scope, receive)
        except _ClientLeft:
            return
        except APIError as err:
            await error_response(err)(scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read(self, scope: Scope, receive: Receive) -> bytes:
        """The whole body; APIError 413 / 408 / 400 when it must be refused."""
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            raise _too_large(self.max_bytes)
        try:
            body = await asyncio.wait_for(_read_all(receive, self.max_bytes), self.timeout_s)
        except _BodyTooLarge:
            raise _too_large(self.max_bytes) from None
        except TimeoutError:
            raise APIError(
                408,
                f"the request body did not arrive within {self.timeout_s:g} s (--body-timeout)",
                code="request_timeout",
            ) from None
        if len(body) > _INLINE_CHECK_BYTES:
            problem = await asyncio.to_thread(json_body_problem, body)
        else:
            problem = json_body_problem(body)
        if problem is not None:
            raise APIError(400, problem, code="invalid_value")
        return body


async def _read_all(receive: Receive, max_bytes: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientLeft
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_bytes:
            raise _BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _content_length(scope: Scope) -> int | None:
    value = next((v for k, v in scope["headers"] if k == b"content-length"), None)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _too_large(max_bytes: int) -> APIError:
    return APIError(
        413,
        f"the request body is larger than {max_bytes} bytes (--max-body-bytes)",
        code="request_too_large",
    )


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive() that yields `body` once, then passes through to the client's."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        message: dict[str, Any] = {"type": "http.request", "body": body, "more_body": False}
        return message

    return replayed
