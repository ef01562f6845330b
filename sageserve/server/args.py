"""Server flags (SGLang names) and the frozen ServerArgs they build; parsing never imports torch."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from sageserve.models.default_model import DEFAULT_MODEL
from sageserve.server.limits import DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_BODY_BYTES

LOG_LEVEL_CHOICES = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class ServerArgs:
    """What the HTTP layer needs, apart from the engine's own EngineConfig.

    max_queued_requests: how many requests may wait for a running slot beyond
    --max-running-requests; past that, new requests get HTTP 503. None = unbounded.
    max_prompt_chars: None = the context length x limits.CHARS_PER_TOKEN_BOUND.
    Timeouts are in seconds.
    served_model_names: the names the OpenAI API accepts; the first is the one reported.
    freeze_gc: freeze each process's startup heap out of garbage collection once it is
    ready (server/gc_heap.py); off only to compare.
    """

    host: str = "127.0.0.1"
    port: int = 30000
    api_key: str | None = None
    metrics_public: bool = False
    max_queued_requests: int | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_prompt_chars: int | None = None
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    shutdown_timeout: float = 30.0
    log_level: str = "info"
    served_model_names: tuple[str, ...] = (DEFAULT_MODEL,)
    freeze_gc: bool = True

    @property
    def served_model_name(self) -> str:
        """The name responses report."""
        return self.served_model_names[0]

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_queued_requests is not None and self.max_queued_requests < 0:
            raise ValueError(f"max_queued_requests must be >= 0, got {self.max_queued_requests}")
        if self.log_level not in LOG_LEVEL_CHOICES:
            raise ValueError(
                f"log_level={self.log_level!r} is not valid; choose one of: "
                + ", ".join(LOG_LEVEL_CHOICES)
            )
        if not self.served_model_names or not all(self.served_model_names):
            raise ValueError("served_model_names must hold at least one non-empty name")
        if self.api_key == "":
            raise ValueError("api_key must not be empty; leave --api-key out to disable it")
        for name in ("max_body_bytes", "max_prompt_chars", "max_batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        for name in ("header_timeout", "body_timeout", "shutdown_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)}")


def add_server_args(parser: argparse.ArgumentParser) -> None:
    """Add the HTTP server's flags to `parser` (the engine's come from engine_args)."""
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1", help="address to listen on")
    group.add_argument("--port", type=int, default=30000, help="port to listen on")
    group.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer <key>' on every route but /health (and "
        "/metrics with --metrics-public); the docs and /openapi.json need it too",
    )
    group.add_argument(
        "--metrics-public",
        action="store_true",
        help="serve /metrics without the API key (for a Prometheus scraper)",
    )
    group.add_argument(
        "--max-queued-requests",
        type=int,
        default=None,
        help="most requests waiting beyond --max-running-requests; more get HTTP 503 "
        "(default: unbounded)",
    )
    _add_limit_args(group)
    group.add_argument(
        "--log-level", default="info", choices=LOG_LEVEL_CHOICES, help="server log level"
    )
    group.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        help="the model name(s) the OpenAI API accepts; responses report the first. With one "
        "name, any `model` in a request is accepted (as in SGLang); default: --model-path",
    )
    group.add_argument(
        "--disable-gc-freeze",
        action="store_true",
        help="keep the startup's objects in Python's garbage collection (by default each "
        "process freezes them out once ready, so full collections stay short; to compare)",
    )


def _add_limit_args(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--max-body-bytes",
        type=int,
        default=DEFAULT_MAX_BODY_BYTES,
        help="largest request body; larger ones get HTTP 413 (default: %(default)s)",
    )
    group.add_argument(
        "--max-prompt-chars",
        type=int,
        default=None,
        help="most characters in one text prompt (or one chat), checked before tokenizing "
        "(default: 32 per token of context)",
    )
    group.add_argument(
        "--max-batch-size",
        type=int,
        default=DEFAULT_MAX_BATCH_SIZE,
        help="most sequences (prompts x n) one request may ask for (default: %(default)s)",
    )
    group.add_argument(
        "--header-timeout",
        type=float,
        default=10.0,
        help="seconds a client has to send a request's headers; then the connection is "
        "closed (default: %(default)s)",
    )
    group.add_argument(
        "--body-timeout",
        type=float,
        default=60.0,
        help="seconds a client has to send a request's body; then HTTP 408 (default: %(default)s)",
    )
    group.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM, seconds requests in flight get to finish before they are aborted "
        "(default: %(default)s)",
    )


def server_args_from_args(args: argparse.Namespace) -> ServerArgs:
    """Build ServerArgs; ValueError on bad values."""
    return ServerArgs(
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        metrics_public=args.metrics_public,
        max_queued_requests=args.max_queued_requests,
        max_body_bytes=args.max_body_bytes,
        max_prompt_chars=args.max_prompt_chars,
        max_batch_size=args.max_batch_size,
        header_timeout=args.header_timeout,
        body_timeout=args.body_timeout,
        shutdown_timeout=args.shutdown_timeout,
        log_level=args.log_level,
        served_model_names=tuple(args.served_model_name or [args.model_path or DEFAULT_MODEL]),
        freeze_gc=not args.disable_gc_freeze,
    )
