"""What can go wrong with a request between the HTTP layer and the engine.

Each maps to one HTTP status (see app._add_error_handlers): the client's mistake is a 400,
a full queue a 503 to retry, an internal fault with one request a 500, and a dead engine a
503 that no retry will cure (the process is exiting).
"""

from __future__ import annotations


class InvalidRequestError(ValueError):
    """The request cannot be served as asked (empty or too long a prompt, a limit, ...)."""


class QueueFullError(RuntimeError):
    """More requests are waiting than --max-queued-requests allows; retry later."""


class RequestFailedError(RuntimeError):
    """An internal fault while admitting or stepping this request (logged with its rid)."""


class EngineDeadError(RuntimeError):
    """The engine has stopped (its loop failed or its process exited); the server is
    shutting down."""
