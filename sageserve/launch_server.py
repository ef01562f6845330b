"""`python -m sageserve.launch_server` (also `sageserve serve`): the HTTP server.

Flags follow SGLang's names; a bad value exits with code 2 and a message naming the valid
choices.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import TYPE_CHECKING, Literal

from sageserve.engine_args import add_engine_args, engine_config_from_args
from sageserve.models.default_model import DEFAULT_MODEL
from sageserve.server.args import ServerArgs, add_server_args, server_args_from_args

if TYPE_CHECKING:
    from sageserve.config import EngineConfig
    from sageserve.engine.info import EngineInfo
    from sageserve.server.engine_loop import EngineHost, EngineLoop

EngineHostKind = Literal["process", "thread"]

logger = logging.getLogger("sageserve.launch_server")


def add_launch_args(parser: argparse.ArgumentParser) -> None:
    """Every engine flag and every server flag."""
    add_engine_args(parser)
    add_server_args(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sageserve.launch_server",
        description="Serve a model over HTTP: SGLang's /generate and OpenAI's /v1 APIs",
    )
    add_launch_args(parser)
    return parser


def run(args: argparse.Namespace, engine_host: EngineHostKind = "process") -> int:
    """Load the model in the engine's process, serve until interrupted.

    engine_host: "process" (served: the engine in a process of its own) or "thread" (in
    this process, sharing its interpreter lock; for lab comparisons).
    Returns 2 (after a message naming the problem) for bad flags or an unusable model, 1 when
    the engine stopped on a fault, 0 after a clean shutdown.
    """
    try:
        server_args, engine_loop = _load(args, engine_host)
    except ValueError as err:
        print(f"sageserve: error: {err}", file=sys.stderr)
        return 2
    from sageserve.server.serve import serve

    return serve(engine_loop, server_args)


def _load(args: argparse.Namespace, engine_host: EngineHostKind) -> tuple[ServerArgs, EngineLoop]:
    engine_config = engine_config_from_args(args)
    server_args = server_args_from_args(args)
    _setup_logging(server_args)
    start = time.monotonic()
    logger.info("loading %s ...", engine_config.model_path or DEFAULT_MODEL)
    host = _engine_host(engine_host, engine_config, server_args)
    # While an engine process loads, this process imports the server's own modules.
    from sageserve.server.engine_loop import EngineLoop
    from sageserve.server.limits import RequestLimits
    from sageserve.server.serve import serve  # noqa: F401

    limits = RequestLimits.for_context(
        host.info.context_length,
        max_prompt_chars=server_args.max_prompt_chars,
        max_batch_size=server_args.max_batch_size,
    )
    engine_loop = EngineLoop(host, limits=limits)
    _log_ready(engine_loop.info, time.monotonic() - start)
    return server_args, engine_loop


def _engine_host(kind: EngineHostKind, config: EngineConfig, server_args: ServerArgs) -> EngineHost:
    """The engine's host: a spawned process that loads the model (its answer is awaited on
    first use), or a thread over an Engine loaded here. Its loop warms it up before serving."""
    if kind == "process":
        from sageserve.server.engine_process import EngineProcess

        return EngineProcess(
            config, server_args.max_queued_requests, server_args.log_level, server_args.freeze_gc
        )
    from sageserve.engine.engine import Engine
    from sageserve.server.engine_thread import EngineThread

    engine = Engine(config, warm_up_now=False)
    return EngineThread(engine, server_args.max_queued_requests, server_args.freeze_gc)


def _setup_logging(server_args: ServerArgs) -> None:
    from sageserve.server.engine_process import LOG_FORMAT

    logging.basicConfig(level=server_args.log_level.upper(), format=LOG_FORMAT)


def _log_ready(info: EngineInfo, seconds: float) -> None:
    logger.info(
        "model loaded in %.1f s: attention backend=%s (%s), KV cache dtype=%s, pool=%d "
        "tokens (pages of %d), context=%d, dtype=%s, device=%s",
        seconds,
        info.attention_backend,
        info.attention_kernels,
        info.kv_cache_dtype,
        info.pool_capacity_tokens,
        info.page_size,
        info.context_length,
        info.dtype,
        info.device,
    )


def main(argv: list[str] | None = None, engine_host: EngineHostKind = "process") -> int:
    return run(build_parser().parse_args(argv), engine_host)


if __name__ == "__main__":
    sys.exit(main())
