"""Read a request body as JSON when the client did not say what it sent.

`curl -d '{...}'` labels its body `application/x-www-form-urlencoded`, and some clients send
no Content-Type at all; every POST route of this server takes JSON, so such a body is read as
JSON (and malformed JSON is a 400 naming the parse error, as for any other body). A body
labelled with any other type (multipart, text/plain, ...) is left alone and gets the 400
that names application/json.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

# Content types that say nothing about the body: no header, or curl's default for -d.
_UNLABELLED = (b"", b"application/x-www-form-urlencoded")


class DefaultJSONBody:
    """ASGI middleware: POST bodies without a meaningful Content-Type are JSON."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            scope = {**scope, "headers": _as_json(scope["headers"])}
        await self.app(scope, receive, send)


def _as_json(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The headers with Content-Type set to application/json when it said nothing."""
    content_type = next((v for k, v in headers if k == b"content-type"), b"")
    if content_type.split(b";")[0].strip().lower() not in _UNLABELLED:
        return headers
    kept = [(k, v) for k, v in headers if k != b"content-type"]
    return [*kept, (b"content-type", b"application/json")]
