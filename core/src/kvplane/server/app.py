"""The FastAPI application: routes, error handlers and the request gate.

Handlers run on the event loop and never wait for the engine's step: they queue work with
:class:`~kvplane.engine.async_llm.AsyncLLM` and await its outputs.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from kvplane.server.chat import create_chat_completion
from kvplane.server.completions import create_completion
from kvplane.server.conversation import render_conversation
from kvplane.server.errors import APIError, bad_request, install_error_handlers
from kvplane.server.metrics import CONTENT_TYPE
from kvplane.server.middleware import RequestGate
from kvplane.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from kvplane.server.state import ServerState
from kvplane.version import __version__


def build_app(state: ServerState) -> FastAPI:
    """The app serving ``state``'s engine; the caller runs it (uvicorn) and stops the engine."""
    app = FastAPI(title="kvplane", version=__version__, docs_url=None, redoc_url=None)
    app.state.kvplane = state
    install_error_handlers(app)
    app.add_middleware(
        RequestGate,
        api_key=state.settings.api_key,
        max_body_bytes=state.settings.max_request_body_bytes,
        is_draining=lambda: state.draining,
    )

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(state, name) for name in state.model_names]}

    @app.get("/v1/models/{model:path}")
    async def retrieve_model(model: str) -> dict[str, Any]:
        state.check_model(model or "?")
        return _model_card(state, model)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await create_completion(state, body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await create_chat_completion(state, body, request)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        state.check_model(body.model)
        tokenizer = state.require_tokenizer()
        if (body.prompt is None) == (body.messages is None):
            raise bad_request("give exactly one of prompt and messages", "prompt")
        if body.messages is not None:
            token_ids = render_conversation(state, body.messages, None, body.add_generation_prompt)
        else:
            token_ids = list(
                tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
            )
        result: dict[str, Any] = {
            "count": len(token_ids),
            "max_model_len": state.max_model_len,
            "tokens": token_ids,
        }
        if body.return_token_strs:
            result["token_strs"] = tokenizer.convert_ids_to_tokens(token_ids)
        return result

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        state.check_model(body.model)
        tokenizer = state.require_tokenizer()
        vocab_size = state.engine.engine.model_config.hf_config.vocab_size
        bad = [token for token in body.tokens if not 0 <= token < vocab_size]
        if bad:
            raise bad_request(f"token ids {bad[:5]} are outside the vocabulary", "tokens")
        return {"prompt": tokenizer.decode(body.tokens)}

    @app.api_route("/health", methods=["GET", "HEAD"])
    @app.api_route("/ping", methods=["GET", "HEAD"])
    async def health() -> JSONResponse:
        """Liveness: 200 with a small JSON body while the engine runs, else 503."""
        if not state.engine.is_running:
            raise APIError(503, "the engine has stopped", code="engine_dead")
        return JSONResponse(
            {
                "status": "ok",
                "model": state.model_name,
                "uptime_s": round(time.time() - state.created, 1),
            }
        )

    @app.get("/version")
    async def version() -> JSONResponse:
        return JSONResponse({"version": __version__})

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        text = state.metrics.render(state.engine.stats())
        return PlainTextResponse(text, media_type=CONTENT_TYPE)

    return app


def _model_card(state: ServerState, name: str) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": state.created,
        "owned_by": "kvplane",
        "root": getattr(state.settings, "model", None),
        "parent": None,
        "max_model_len": state.max_model_len,
    }
