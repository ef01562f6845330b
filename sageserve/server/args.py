"""Server flags (SGLang names) and the frozen ServerArgs they build; parsing never imports torch."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from sageserve.models.default_model import DEFAULT_MODEL

LOG_LEVEL_CHOICES = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class ServerArgs:
    """What the HTTP layer needs, apart from the engine's own EngineConfig.

    max_queued_requests: how many requests may wait for a running slot beyond
    --max-running-requests; past that, new requests get HTTP 503. None = unbounded.
    """

    host: str = "127.0.0.1"
    port: int = 30000
    api_key: str | None = None
    max_queued_requests: int | None = None
    log_level: str = "info"
    served_model_name: str = DEFAULT_MODEL

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
        if self.api_key == "":
            raise ValueError("api_key must not be empty; leave --api-key out to disable it")


def add_server_args(parser: argparse.ArgumentParser) -> None:
    """Add the HTTP server's flags to `parser` (the engine's come from engine_args)."""
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1", help="address to listen on")
    group.add_argument("--port", type=int, default=30000, help="port to listen on")
    group.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer <key>' on every route but /health",
    )
    group.add_argument(
        "--max-queued-requests",
        type=int,
        default=None,
        help="most requests waiting beyond --max-running-requests; more get HTTP 503 "
        "(default: unbounded)",
    )
    group.add_argument(
        "--log-level", default="info", choices=LOG_LEVEL_CHOICES, help="server log level"
    )
    group.add_argument(
        "--served-model-name",
        default=None,
        help="the model name the OpenAI API reports and accepts; default: --model-path",
    )


def server_args_from_args(args: argparse.Namespace) -> ServerArgs:
    """Build ServerArgs; ValueError on bad values."""
    return ServerArgs(
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        max_queued_requests=args.max_queued_requests,
        log_level=args.log_level,
        served_model_name=args.served_model_name or args.model_path or DEFAULT_MODEL,
    )
