"""The FastAPI application: routes, authentication, and errors in OpenAI's shape.

    POST /v1/chat/completions   omni_fast.serve.handler
    GET  /v1/models             the one served model
    GET  /health                200 while the engine loop runs and the server is not draining, else 503
    GET  /metrics               Prometheus text (omni_fast.serve.metrics)

With an API key every route but /health needs `Authorization: Bearer <key>` (401 otherwise); the key is compared
in constant time. Every error body is {"error": {"message", "type", "param", "code"}}.
"""
from __future__ import annotations

import hmac

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from omni_fast.serve.handler import chat_completion
from omni_fast.serve.metrics import CONTENT_TYPE
from omni_fast.serve.protocol import ModelCard, ModelList, ServeError, error_body
from omni_fast.serve.state import ServerState


def _authorize(state: ServerState, request: Request) -> None:
    key = state.config.api_key
    if key is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
        raise ServeError(401, "missing or wrong API key: send the header Authorization: Bearer <key>",
                         headers={"WWW-Authenticate": "Bearer"})


def build_app(state: ServerState, lifespan=None) -> FastAPI:
    app = FastAPI(title="omni-fast", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serve = state

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, e: ServeError):
        return JSONResponse(e.body(), e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, e: HTTPException):
        return JSONResponse(error_body(e.status_code, str(e.detail)), e.status_code, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        return JSONResponse(error_body(400, str(e.errors()[0].get("msg", e))), 400)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        try:
            _authorize(state, request)
        except ServeError as e:
            state.metrics.finished(e.status)
            raise
        return await chat_completion(state, request)

    @app.get("/v1/models")
    async def models(request: Request):
        _authorize(state, request)
        return ModelList(data=[ModelCard(id=state.config.served_model_name, created=state.created)]).model_dump()

    @app.get("/health")
    async def health():
        if state.healthy:
            return Response(status_code=200)
        reason = "draining: the server is shutting down" if state.draining else "the engine loop is not running"
        return JSONResponse(error_body(503, reason), 503)

    @app.get("/metrics")
    async def metrics(request: Request):
        _authorize(state, request)
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    return app
