"""The FastAPI application: routes, error handlers, the request gate, HTTP metrics and
the OpenAPI schema.

Handlers run on the event loop and never wait for the engine's step: they queue work with
:class:`~kvplane.engine.async_llm.AsyncLLM` and await its outputs.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any

from fastapi import FastAPI, Path, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from kvplane.server.chat import create_chat_completion
from kvplane.server.completions import create_completion
from kvplane.server.conversation import render_conversation
from kvplane.server.errors import APIError, bad_request, install_error_handlers
from kvplane.server.metrics import CONTENT_TYPE
from kvplane.server.middleware import HttpMetrics, RequestGate
from kvplane.server.openapi import STREAM_RESPONSE, ServerLimits, error_responses, install_openapi
from kvplane.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from kvplane.server.state import ServerState
from kvplane.server.tokenizer_pool import TokenizerWorker
from kvplane.version import __version__


def build_app(state: ServerState) -> FastAPI:
    """The app serving ``state``'s engine; the caller runs it (uvicorn) and stops the engine."""
    app = FastAPI(title="kvplane", version=__version__, docs_url=None, redoc_url=None)
    app.state.kvplane = state
    install_openapi(app, _limits(state), has_api_key=state.settings.api_key is not None)
    install_error_handlers(app)
    app.add_middleware(
        RequestGate,
        api_key=state.settings.api_key,
        max_body_bytes=state.settings.max_request_body_bytes,
        is_draining=lambda: state.draining,
    )
    # Added last, so it runs first: the gate's refusals are counted too. ``routes`` is the
    # list the routes below are added to.
    app.add_middleware(HttpMetrics, metrics=state.metrics, routes=app.router.routes)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(state, name) for name in state.model_names]}

    @app.get("/v1/models/{model:path}", responses=error_responses(404))
    async def retrieve_model(model: str = Path(examples=state.model_names)) -> dict[str, Any]:
        state.check_model(model or "?")
        return _model_card(state, model)

    @app.post("/v1/completions", responses=STREAM_RESPONSE | error_responses(400, 404, 503))
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await create_completion(state, body, request)

    @app.post("/v1/chat/completions", responses=STREAM_RESPONSE | error_responses(400, 404, 503))
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await create_chat_completion(state, body, request)

    @app.post("/tokenize", responses=error_responses(400, 404))
    async def tokenize(body: TokenizeRequest) -> Response:
        state.check_model(body.model)
        pool = state.require_tokenizer_pool()
        if (body.prompt is None) == (body.messages is None):
            raise bad_request("give exactly one of prompt and messages", "prompt")
        # Counts tokens past the context too, but refuses text too long to fit at all.
        if body.prompt is not None:
            token_ids = await pool.encode(
                body.prompt, body.add_special_tokens, "prompt", within_context=False
            )
        else:
            assert body.messages is not None
            token_ids = await render_conversation(
                state, body.messages, None, body.add_generation_prompt, within_context=False
            )
        answer = partial(_tokenize_answer, token_ids, state.max_model_len, body.return_token_strs)
        return await pool.run(answer)

    @app.post("/detokenize", responses=error_responses(400, 404))
    async def detokenize(body: DetokenizeRequest) -> Response:
        state.check_model(body.model)
        pool = state.require_tokenizer_pool()
        vocab_size = state.engine.model_config.hf_config.vocab_size
        return await pool.run(partial(_detokenize_answer, body.tokens, vocab_size))

    # A route per method: one route for both gives GET and HEAD the same operationId.
    @app.get("/health", responses=error_responses(503))
    @app.head("/health", responses=error_responses(503))
    @app.get("/ping", responses=error_responses(503))
    @app.head("/ping", responses=error_responses(503))
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

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        return Response(state.metrics.exposition(), media_type=CONTENT_TYPE)

    return app


def _tokenize_answer(
    token_ids: list[int], max_model_len: int, with_token_strs: bool, worker: TokenizerWorker
) -> Response:
    """``/tokenize``'s response, built on a tokenizer-pool thread (it may list many tokens)."""
    result: dict[str, Any] = {
        "count": len(token_ids),
        "max_model_len": max_model_len,
        "tokens": token_ids,
    }
    if with_token_strs:
        result["token_strs"] = worker.tokenizer.convert_ids_to_tokens(token_ids)
    return JSONResponse(result)


def _detokenize_answer(token_ids: list[int], vocab_size: int, worker: TokenizerWorker) -> Response:
    """``/detokenize``'s response, built on a tokenizer-pool thread."""
    bad = [token for token in token_ids if not 0 <= token < vocab_size]
    if bad:
        raise bad_request(f"token ids {bad[:5]} are outside the vocabulary", "tokens")
    return JSONResponse({"prompt": worker.decode(token_ids)})


def _limits(state: ServerState) -> ServerLimits:
    return ServerLimits(
        vocab_size=state.engine.model_config.hf_config.vocab_size,
        max_model_len=state.max_model_len,
        max_num_seqs=state.max_num_seqs,
        max_logprobs=state.settings.max_logprobs,
    )


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
