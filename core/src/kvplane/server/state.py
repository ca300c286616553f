"""What every handler shares: the engine, the options, the tokenizer, metrics, in-flight runs.

Lives on the event-loop thread; only :class:`~kvplane.engine.async_llm.AsyncLLM` crosses
to the engine thread, and tokenizer work of any size goes to the
:class:`~kvplane.server.tokenizer_pool.TokenizerPool`'s threads.
"""

from __future__ import annotations

import asyncio
import copy
import gc
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvplane.engine.async_llm import AsyncLLM
from kvplane.models.generation_config import SamplingDefaults
from kvplane.sampling.params import SamplingParams
from kvplane.server.errors import APIError, bad_request
from kvplane.server.metrics import ServerMetrics
from kvplane.server.prompt_limits import check_num_tokens
from kvplane.server.runner import RequestRun
from kvplane.server.settings import ServerOptions
from kvplane.server.tokenizer_pool import TokenizerPool

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class ServerState:
    """Shared by the handlers of one server (see the module docstring)."""

    engine: AsyncLLM
    settings: ServerOptions
    model_names: list[str]
    #: A copy of the engine's tokenizer, for small work on the loop (one token's text): the
    #: engine thread detokenizes with its own, and a Rust tokenizer used from two threads
    #: at once can fail with "Already borrowed".
    tokenizer: Any | None
    #: Threads (with their own copies) for tokenizer work that grows with the request:
    #: prompts, chat templates, /tokenize, /detokenize. None without a tokenizer.
    tokenizer_pool: TokenizerPool | None
    max_model_len: int
    max_num_seqs: int
    metrics: ServerMetrics
    chat_template: str | None = None
    #: The model's recommended sampling, for the fields a request leaves out.
    sampling_defaults: SamplingDefaults = field(default_factory=SamplingDefaults)
    runs: set[RequestRun] = field(default_factory=set)
    draining: bool = False
    created: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def create(cls, engine: AsyncLLM, settings: ServerOptions) -> ServerState:
        """The state of a server about to serve ``engine``: the last step of start-up."""
        names = settings.model_names()
        tokenizer = engine.tokenizer
        max_model_len = engine.model_config.max_model_len
        state = cls(
            engine=engine,
            settings=settings,
            model_names=names,
            tokenizer=None if tokenizer is None else copy.deepcopy(tokenizer),
            tokenizer_pool=None if tokenizer is None else TokenizerPool(tokenizer, max_model_len),
            max_model_len=max_model_len,
            max_num_seqs=engine.config.batch_limits().max_num_seqs,
            metrics=ServerMetrics(names[0], engine.stats),
            chat_template=_read_template(settings.chat_template),
            sampling_defaults=engine.model_config.sampling_defaults,
        )
        _freeze_startup_objects()
        return state

    @property
    def model_name(self) -> str:
        return self.model_names[0]

    # -- checks every endpoint makes -------------------------------------------------------

    def check_model(self, name: str | None) -> None:
        """404 for a model name this server does not serve (None or "" means the default)."""
        if name and name not in self.model_names:
            raise APIError(
                404,
                f"The model `{name}` does not exist; this server serves {self.model_names}.",
                param="model",
                code="model_not_found",
            )

    def require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise bad_request("this model has no tokenizer: send prompts as token ids")
        return self.tokenizer

    def require_tokenizer_pool(self) -> TokenizerPool:
        if self.tokenizer_pool is None:
            raise bad_request("this model has no tokenizer: send prompts as token ids")
        return self.tokenizer_pool

    def decode(self, token_ids: list[int]) -> str:
        """The text of ``token_ids`` ("" without a tokenizer), decoded on the loop: for a
        few tokens only (longer texts: ``tokenizer_pool.decode``)."""
        return "" if self.tokenizer is None else str(self.tokenizer.decode(token_ids))

    def check_prompt(self, token_ids: list[int], param: str) -> None:
        """400 for an empty prompt or one that leaves no room in the context."""
        if not token_ids:
            raise bad_request("the prompt is empty", param)
        check_num_tokens(len(token_ids), self.max_model_len, param)

    def check_max_tokens(self, token_ids: list[int], max_tokens: int | None, param: str) -> None:
        """400 when the prompt and ``max_tokens`` together exceed the context (as vLLM);
        without ``max_tokens`` the output may run to the end of the context."""
        if max_tokens is None or len(token_ids) + max_tokens <= self.max_model_len:
            return
        raise bad_request(
            f"This model's maximum context length is {self.max_model_len} tokens. However, "
            f"you requested {len(token_ids) + max_tokens} tokens ({len(token_ids)} in the "
            f"prompt, {max_tokens} in the completion). Please reduce the length of the prompt "
            "or completion.",
            param,
        )

    def check_capacity(self) -> None:
        """503 when the engine is gone or the waiting queue is at its limit."""
        if not self.engine.is_running:
            raise APIError(503, "the engine has stopped", code="engine_dead")
        limit = self.settings.max_waiting_requests
        if limit is not None and self.engine.num_waiting >= limit:
            raise APIError(
                503,
                f"the server is overloaded: {self.engine.num_waiting} sequences are waiting "
                f"(limit {limit}); retry later",
                code="server_overloaded",
            )

    # -- runs ------------------------------------------------------------------------------

    def new_run(
        self, prefix: str, prompts: list[list[int]], params: SamplingParams, priority: int = 0
    ) -> RequestRun:
        """A run for ``prompts`` (503 when the waiting queue is full); not started yet."""
        self.check_capacity()
        request_id = f"{prefix}-{uuid.uuid4().hex}"
        return RequestRun(
            self.engine, self.metrics, self.runs, request_id, prompts, params, priority
        )

    def begin_drain(self, grace_seconds: float) -> None:
        """Refuse new requests; abort the in-flight ones after ``grace_seconds``."""
        if self.draining:
            return
        self.draining = True
        logger.info(
            "shutting down: %d requests in flight get %.1f s to finish",
            len(self.runs),
            grace_seconds,
        )
        asyncio.get_running_loop().call_later(grace_seconds, self.abort_all)

    def abort_all(self) -> None:
        if self.runs:
            logger.warning("aborting %d requests still running", len(self.runs))
        for run in list(self.runs):
            run.cancel()


def _freeze_startup_objects() -> None:
    """Exempt what start-up allocated (imported modules, the model, the tokenizers: some
    300,000 objects) from the cyclic garbage collector. A full collection walks every
    tracked object with the GIL held: under 200 streams those walks paused the event
    loop, and /health, for 0.1 to 0.35 s at a time."""
    gc.collect()
    gc.freeze()


def _read_template(template: str | None) -> str | None:
    """A chat template given as a file path or as the Jinja text itself."""
    if template is None:
        return None
    path = Path(template)
    if len(template) < 4096 and "{" not in template and path.is_file():
        return path.read_text()
    return template
