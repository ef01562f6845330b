"""Non-streamed requests end when their client leaves, as streamed ones do.

A streamed response notices a disconnect when it next writes; a non-streamed one writes
only at the end, so it watches the connection while it waits: nobody is left to read the
result, and the requests would otherwise hold pages and running slots to the end.
"""

from __future__ import annotations

import asyncio

from fastapi import Request

from sageserve.engine.request import RequestOutput
from sageserve.server.engine_loop import OutputStream

# nginx's status for "the client closed the connection first"; nobody reads it.
CLIENT_CLOSED_REQUEST = 499

# How often the connection is checked: an abandoned request stops within about this long.
POLL_S = 0.25


async def finals_unless_disconnected(
    stream: OutputStream, request: Request
) -> list[RequestOutput] | None:
    """The stream's final outputs; None when the client left first (requests aborted)."""
    finals = asyncio.ensure_future(stream.finals())
    try:
        while True:
            done, _ = await asyncio.wait({finals}, timeout=POLL_S)
            if done:
                return finals.result()
            if await request.is_disconnected():
                return None
    finally:
        finals.cancel()
        stream.close()
