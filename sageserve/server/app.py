"""The FastAPI app: routes of both APIs, the guards in front of them, every error as an
OpenAI body.

Middleware, outermost first: the API key (from the headers alone), the body read whole
within its size and time limits, then JSON assumed for unlabelled bodies.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from sageserve import __version__
from sageserve.engine.sampling_params import SamplingParams
from sageserve.server import openai_api, sglang_api, tokenize_api
from sageserve.server.api_key import APIKeyCheck
from sageserve.server.args import ServerArgs
from sageserve.server.engine_loop import EngineLoop
from sageserve.server.errors import (
    EngineDeadError,
    InvalidRequestError,
    QueueFullError,
    RequestFailedError,
)
from sageserve.server.gc_heap import freeze_startup_heap
from sageserve.server.json_body import DefaultJSONBody
from sageserve.server.metrics import CONTENT_TYPE_LATEST
from sageserve.server.model_files import ModelFiles
from sageserve.server.protocol import APIError, error_response
from sageserve.server.request_body import BoundedBody
from sageserve.server.request_model import UNSUPPORTED_VALUE
from sageserve.server.route_warmup import warm_up_routes
from sageserve.startup_phases import startup_phase

logger = logging.getLogger(__name__)

# Seconds a client told "queue full" (503) should wait before retrying.
RETRY_AFTER_S = 1
# How long /health_generate waits for its token (SGLang waits 20 s).
HEALTH_GENERATE_TIMEOUT_S = 20


def build_app(
    engine_loop: EngineLoop, server_args: ServerArgs, warm_up_routes: bool | None = None
) -> FastAPI:
    """The server's app; its lifespan starts and stops the engine's loop.

    warm_up_routes: send the route warm-up's requests (route_warmup.py) once the engine
    thread is ready, before /health answers 200; None: when the engine warms up (CUDA)."""

    model_files = ModelFiles(engine_loop.info.model_path, engine_loop.tokenizer)
    if warm_up_routes is None:
        warm_up_routes = engine_loop.warms_up
    routes_ready = asyncio.Event()
    if not warm_up_routes:
        routes_ready.set()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine_loop.start()
        task = None
        if warm_up_routes:
            task = asyncio.create_task(_warm_up_routes(app, engine_loop, server_args, routes_ready))
        logger.info(
            "serving %s on http://%s:%d",
            server_args.served_model_name,
            server_args.host,
            server_args.port,
        )
        yield
        if task is not None:
            task.cancel()
        engine_loop.stop()
        model_files.close()

    app = FastAPI(title="sageserve", version=__version__, lifespan=lifespan)
    _add_middleware(app, server_args)
    _add_error_handlers(app)
    app.include_router(sglang_api.build_router(engine_loop, server_args, model_files))
    app.include_router(openai_api.build_router(engine_loop, server_args))
    app.include_router(tokenize_api.build_router(engine_loop))

    @app.get("/health")
    async def health() -> JSONResponse:
        """200 while the engine serves (open without an API key, for probes); 503
        while it warms up or once it has stopped."""
        if engine_loop.is_ready and routes_ready.is_set():
            return JSONResponse({"status": "ok"})
        if engine_loop.is_alive:
            return error_response(APIError(503, "the engine is warming up", "server_error"))
        reason = engine_loop.failure or "not running"
        return error_response(APIError(503, f"the engine has stopped ({reason})", "server_error"))

    @app.get("/health_generate")
    async def health_generate() -> Response:
        """200 once one token went through the engine (SGLang's deep probe); 503 otherwise.

        Behind the API key: it costs a forward pass."""
        await _generate_one_token(engine_loop)
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus metrics (behind the API key unless --metrics-public)."""
        return Response(engine_loop.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


async def _warm_up_routes(
    app: FastAPI, engine_loop: EngineLoop, server_args: ServerArgs, done: asyncio.Event
) -> None:
    """Once the engine is ready: the route warm-up, then `done`. A failure stops the
    server (exit status 1): one that cannot answer its own requests must not say ready."""
    if not await engine_loop.wait_ready():
        return
    try:
        with startup_phase("warm-up", "the HTTP routes"):
            name = server_args.served_model_name
            count = await warm_up_routes(app, engine_loop, name, server_args.api_key)
    except Exception as err:
        logger.critical("the route warm-up failed", exc_info=True)
        engine_loop.stop_serving(f"the route warm-up failed: {err}")
        return
    logger.info("warm-up: %d requests through the HTTP routes", count)
    if server_args.freeze_gc:
        freeze_startup_heap("server")
    done.set()


async def _generate_one_token(engine_loop: EngineLoop) -> None:
    """One greedy token from a one-token prompt; an engine that cannot is a 503."""
    token = getattr(engine_loop.tokenizer, "bos_token_id", None) or 1
    params = SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eos=True)
    try:
        async with asyncio.timeout(HEALTH_GENERATE_TIMEOUT_S):
            stream = await engine_loop.submit([[token]], [params])
            async with stream:  # aborts the request on a timeout
                await stream.finals()
    except TimeoutError as err:
        message = f"the engine produced no token within {HEALTH_GENERATE_TIMEOUT_S} s"
        raise APIError(503, message, "server_error", code="unhealthy") from err


def _add_middleware(app: FastAPI, server_args: ServerArgs) -> None:
    # Starlette runs the middleware added last first.
    app.add_middleware(DefaultJSONBody)
    app.add_middleware(
        BoundedBody, max_bytes=server_args.max_body_bytes, timeout_s=server_args.body_timeout
    )
    if server_args.api_key:
        open_paths = frozenset({"/metrics"}) if server_args.metrics_public else frozenset()
        app.add_middleware(APIKeyCheck, api_key=server_args.api_key, open_paths=open_paths)


def _add_error_handlers(app: FastAPI) -> None:
    async def api_error(request: Request, err: Exception) -> JSONResponse:
        assert isinstance(err, APIError)
        return error_response(err)

    async def invalid(request: Request, err: Exception) -> JSONResponse:
        return error_response(APIError(400, str(err), code="invalid_value"))

    async def queue_full(request: Request, err: Exception) -> JSONResponse:
        headers = {"Retry-After": str(RETRY_AFTER_S)}
        error = APIError(503, str(err), "server_error", code="queue_full", headers=headers)
        return error_response(error)

    async def request_failed(request: Request, err: Exception) -> JSONResponse:
        return error_response(APIError(500, str(err), "server_error", code="engine_error"))

    async def engine_dead(request: Request, err: Exception) -> JSONResponse:
        return error_response(APIError(503, str(err), "server_error", code="engine_dead"))

    async def http_error(request: Request, err: Exception) -> JSONResponse:
        assert isinstance(err, HTTPException)
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return error_response(APIError(err.status_code, str(err.detail), kind, headers=err.headers))

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(InvalidRequestError, invalid)
    app.add_exception_handler(QueueFullError, queue_full)
    app.add_exception_handler(RequestFailedError, request_failed)
    app.add_exception_handler(EngineDeadError, engine_dead)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, _internal_error)


async def _internal_error(request: Request, err: Exception) -> JSONResponse:
    """Any other fault: logged (by uvicorn, with its traceback), an OpenAI-style 500."""
    message = f"internal server error ({type(err).__name__}); the server log has the details"
    return error_response(APIError(500, message, "server_error", code="internal_error"))


async def _validation_error(request: Request, err: Exception) -> JSONResponse:
    """Pydantic's errors as a 400 naming the first problem (not FastAPI's default 422)."""
    assert isinstance(err, RequestValidationError)
    first = err.errors()[0]
    loc = _field_path(first.get("loc", ()))
    if first.get("type") == UNSUPPORTED_VALUE:
        loc.append(first["ctx"]["field"])  # raised by the model holding the field
        message = f"{'.'.join(loc)}: {first.get('msg')}"
    elif first.get("type") == "json_invalid":
        loc = []  # its loc is a character offset, not a field
        message = f"malformed JSON: {first.get('msg')}"
        ctx = first.get("ctx", {})
        if "error" in ctx:
            message += f" ({ctx['error']})"
    elif not loc:
        message = (
            f"the request body must be a JSON object sent as application/json: {first.get('msg')}"
        )
    else:
        message = f"{'.'.join(loc)}: {first.get('msg')}"
    more = len(err.errors()) - 1
    if more:
        message += f" (and {more} more problem{'s' if more > 1 else ''})"
    error = APIError(400, message, param=loc[0] if loc else None, code="invalid_value")
    return error_response(error)


def _field_path(loc: tuple[int | str, ...] | list[int | str]) -> list[str]:
    """The body fields of an error location, without "body" and pydantic's union tags.

    Union members are tagged by type ("GenerateSamplingParams", "list[int]"); every field of
    our request models is snake_case, so a tag is recognisable by its capital or bracket.
    """
    parts = [str(part) for part in loc if part != "body"]
    return [p for p in parts if not (p[:1].isupper() or "[" in p)]
