"""Run the app under uvicorn until SIGINT/SIGTERM or until the engine stops.

Shutdown is graceful and bounded: uvicorn stops accepting connections, requests in flight
get --shutdown-timeout seconds to finish, the rest are cancelled (their engine requests
aborted, pages freed), then the engine stops. A dead engine (its loop failed, its process
exited) triggers the same shutdown, and the exit status says it (1).
"""

from __future__ import annotations

import logging
import signal
import threading

import uvicorn

from sageserve.server.app import build_app
from sageserve.server.args import ServerArgs
from sageserve.server.engine_loop import EngineLoop
from sageserve.server.header_timeout import header_timeout_protocol

logger = logging.getLogger(__name__)


def uvicorn_server(engine_loop: EngineLoop, server_args: ServerArgs) -> uvicorn.Server:
    """The uvicorn server for the app; it exits on its own if the engine stops."""
    config = uvicorn.Config(
        build_app(engine_loop, server_args),
        host=server_args.host,
        port=server_args.port,
        log_level=server_args.log_level,
        http=header_timeout_protocol(server_args.header_timeout),
        timeout_graceful_shutdown=server_args.shutdown_timeout,
    )
    server = uvicorn.Server(config)

    def exit_on_death() -> None:
        logger.critical("the engine has stopped: shutting the server down")
        server.should_exit = True

    engine_loop.on_death = exit_on_death
    return server


# Exit status after a Ctrl-C (SIGINT), as a shell reports a process it ended: 128 + 2.
INTERRUPTED = 130


def serve(engine_loop: EngineLoop, server_args: ServerArgs) -> int:
    """Serve until asked to stop; 1 if the engine stopped on a fault, INTERRUPTED after a
    Ctrl-C, else 0 (a SIGTERM ends the process with that signal, as uvicorn re-raises it)."""
    if threading.current_thread() is threading.main_thread():
        # uvicorn handles SIGINT whatever this process inherited (a shell starts background
        # jobs with it ignored) and re-raises it after its shutdown into the handler it
        # found: with Python's own handler that is the KeyboardInterrupt below.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        uvicorn_server(engine_loop, server_args).run()
    except KeyboardInterrupt:
        # uvicorn re-raises the Ctrl-C it shut down on: the shutdown is done, so exit with
        # the status that says so rather than a traceback.
        return 1 if engine_loop.failure is not None else INTERRUPTED
    return 1 if engine_loop.failure is not None else 0
