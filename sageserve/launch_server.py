"""`python -m sageserve.launch_server` (also `sageserve serve`): the HTTP server.

Flags follow SGLang's names; a bad value exits with code 2 and a message naming the valid
choices.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import TYPE_CHECKING

from sageserve.engine_args import add_engine_args, engine_config_from_args
from sageserve.models.default_model import DEFAULT_MODEL
from sageserve.server.args import ServerArgs, add_server_args, server_args_from_args

if TYPE_CHECKING:
    from sageserve.engine.info import EngineInfo
    from sageserve.server.engine_loop import EngineLoop

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


def run(args: argparse.Namespace) -> int:
    """Load the model, start the engine thread, serve until interrupted.

    Returns 2 (after a message naming the problem) for bad flags or an unusable model, 1 when
    the engine thread stopped on a fault, 0 after a clean shutdown.
    """
    from sageserve.server.serve import serve

    try:
        server_args, engine_loop = _load(args)
    except ValueError as err:
        print(f"sageserve: error: {err}", file=sys.stderr)
        return 2
    return serve(engine_loop, server_args)


def _load(args: argparse.Namespace) -> tuple[ServerArgs, EngineLoop]:
    from sageserve.engine.engine import Engine
    from sageserve.server.engine_loop import EngineLoop
    from sageserve.server.limits import RequestLimits

    engine_config = engine_config_from_args(args)
    server_args = server_args_from_args(args)
    _setup_logging(server_args)
    start = time.monotonic()
    logger.info("loading %s ...", engine_config.model_path or DEFAULT_MODEL)
    engine = Engine(engine_config, warm_up_now=False)  # the engine thread warms it up
    limits = RequestLimits.for_context(
        engine.info.context_length,
        max_prompt_chars=server_args.max_prompt_chars,
        max_batch_size=server_args.max_batch_size,
    )
    engine_loop = EngineLoop(engine, server_args.max_queued_requests, limits)
    _log_ready(engine_loop.info, time.monotonic() - start)
    return server_args, engine_loop


def _setup_logging(server_args: ServerArgs) -> None:
    logging.basicConfig(
        level=server_args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


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


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
