"""The API key, checked before anything reads the request body.

A dependency on the routes would run only after FastAPI has read and parsed the body, so a
client without the key could make the server read and parse a body of any size. This ASGI
middleware answers 401 from the headers alone. Open without the key: /health (for probes),
and /metrics when the server was started with --metrics-public. Everything else, the docs
and /openapi.json included, needs it.
"""

from __future__ import annotations

import secrets

from starlette.types import ASGIApp, Receive, Scope, Send

from sageserve.server.protocol import APIError, error_response

ALWAYS_OPEN = frozenset({"/health"})


class APIKeyCheck:
    """ASGI middleware: 401 for an HTTP request without `Authorization: Bearer <api_key>`."""

    def __init__(self, app: ASGIApp, api_key: str, open_paths: frozenset[str]) -> None:
        self.app = app
        self.api_key = api_key.encode()
        self.open_paths = ALWAYS_OPEN | open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        given = _bearer_token(scope["headers"])
        if given is not None and secrets.compare_digest(given, self.api_key):
            await self.app(scope, receive, send)
            return
        await error_response(_unauthorized(given is not None))(scope, receive, send)


def _bearer_token(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The credentials of an `Authorization: Bearer ...` header (the scheme in any case)."""
    value = next((v for k, v in headers if k == b"authorization"), None)
    if value is None:
        return None
    scheme, _, token = value.strip().partition(b" ")
    return token.strip() if scheme.lower() == b"bearer" else b""


def _unauthorized(key_given: bool) -> APIError:
    what = "a wrong" if key_given else "no"
    return APIError(
        401,
        f"{what} API key was given: send 'Authorization: Bearer <key>'",
        "authentication_error",
        code="invalid_api_key",
        headers={"WWW-Authenticate": "Bearer"},
    )
