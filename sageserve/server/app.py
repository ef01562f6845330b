"""The FastAPI app: routes of both APIs, API-key check, and every error as an OpenAI body."""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException

from sageserve import __version__
from sageserve.server import openai_api, sglang_api
from sageserve.server.args import ServerArgs
from sageserve.server.engine_loop import (
    EngineLoop,
    EngineStepError,
    InvalidRequestError,
    QueueFullError,
)
from sageserve.server.json_body import DefaultJSONBody
from sageserve.server.metrics import CONTENT_TYPE_LATEST
from sageserve.server.protocol import APIError

logger = logging.getLogger(__name__)

# Seconds a client told "queue full" (503) should wait before retrying.
RETRY_AFTER_S = 1


def build_app(engine_loop: EngineLoop, server_args: ServerArgs) -> FastAPI:
    """The server's app; its lifespan starts and stops the engine thread."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine_loop.start()
        logger.info(
            "serving %s on http://%s:%d",
            server_args.served_model_name,
            server_args.host,
            server_args.port,
        )
        yield
        engine_loop.stop()

    app = FastAPI(title="sageserve", version=__version__, lifespan=lifespan)
    app.add_middleware(DefaultJSONBody)
    _add_error_handlers(app)
    auth = [Depends(_api_key_check(server_args.api_key))] if server_args.api_key else []
    app.include_router(sglang_api.build_router(engine_loop, server_args), dependencies=auth)
    app.include_router(openai_api.build_router(engine_loop, server_args), dependencies=auth)

    @app.get("/health")
    async def health() -> JSONResponse:
        """200 while the engine thread runs (open without an API key, for probes)."""
        if engine_loop.is_alive:
            return JSONResponse({"status": "ok"})
        return _error(APIError(503, "the engine thread is not running", "server_error"))

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus metrics (open without an API key, like /health)."""
        return Response(engine_loop.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


# NOTE: module level, not inside _api_key_check: with `from __future__ import annotations`
# FastAPI resolves the annotation below from this module's globals.
_bearer = HTTPBearer(auto_error=False)


def _api_key_check(api_key: str) -> Any:
    async def check(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> None:
        given = credentials.credentials if credentials else ""
        if not secrets.compare_digest(given.encode(), api_key.encode()):
            what = "a wrong" if credentials else "no"
            raise APIError(
                401,
                f"{what} API key was given: send 'Authorization: Bearer <key>'",
                "authentication_error",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return check


def _error(err: APIError) -> JSONResponse:
    return JSONResponse(err.body.model_dump(), status_code=err.status, headers=err.headers)


def _add_error_handlers(app: FastAPI) -> None:
    async def api_error(request: Request, err: Exception) -> JSONResponse:
        assert isinstance(err, APIError)
        return _error(err)

    async def invalid(request: Request, err: Exception) -> JSONResponse:
        return _error(APIError(400, str(err), code="invalid_value"))

    async def queue_full(request: Request, err: Exception) -> JSONResponse:
        headers = {"Retry-After": str(RETRY_AFTER_S)}
        return _error(APIError(503, str(err), "server_error", code="queue_full", headers=headers))

    async def engine_failed(request: Request, err: Exception) -> JSONResponse:
        return _error(APIError(500, str(err), "server_error", code="engine_error"))

    async def http_error(request: Request, err: Exception) -> JSONResponse:
        assert isinstance(err, HTTPException)
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return _error(APIError(err.status_code, str(err.detail), kind, headers=err.headers))

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(InvalidRequestError, invalid)
    app.add_exception_handler(QueueFullError, queue_full)
    app.add_exception_handler(EngineStepError, engine_failed)
    app.add_exception_handler(HTTPException, http_error)


async def _validation_error(request: Request, err: Exception) -> JSONResponse:
    """Pydantic's errors as a 400 naming the first problem (not FastAPI's default 422)."""
    assert isinstance(err, RequestValidationError)
    first = err.errors()[0]
    loc = _field_path(first.get("loc", ()))
    if first.get("type") == "json_invalid":
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
    return _error(APIError(400, message, param=loc[0] if loc else None, code="invalid_value"))


def _field_path(loc: tuple[int | str, ...] | list[int | str]) -> list[str]:
    """The body fields of an error location, without "body" and pydantic's union tags.

    Union members are tagged by type ("GenerateSamplingParams", "list[int]"); every field of
    our request models is snake_case, so a tag is recognisable by its capital or bracket.
    """
    parts = [str(part) for part in loc if part != "body"]
    return [p for p in parts if not (p[:1].isupper() or "[" in p)]
