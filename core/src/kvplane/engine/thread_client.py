"""The engine loop on a thread of this process, for :class:`~kvplane.engine.async_llm.AsyncLLM`.

The same :class:`~kvplane.engine.engine_core.EngineCoreLoop` as the engine-core process,
fed by an in-process pipe; its outputs are dispatched on the engine's thread without
pickling. When a step raises out of the engine (it cannot go on), the thread ends every
stream through ``AsyncLLM.die`` and exits.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
from typing import TYPE_CHECKING

from kvplane.engine.core_client import EngineClientBase
from kvplane.engine.engine_core import EngineCoreLoop, Shutdown
from kvplane.engine.llm_engine import LLMEngine

if TYPE_CHECKING:
    from kvplane.engine.async_llm import AsyncLLM

logger = logging.getLogger(__name__)


class EngineThreadClient(EngineClientBase):
    """Steps an in-process :class:`LLMEngine` on its own thread."""

    def __init__(self, engine: LLMEngine) -> None:
        commands_reader, commands = multiprocessing.Pipe(duplex=False)
        super().__init__(commands, engine.stats())
        self.engine = engine
        self.config = engine.config
        self.model_config = engine.model_config
        self.tokenizer = engine.tokenizer
        self._loop = EngineCoreLoop(engine, commands_reader, self._dispatch)
        self._thread = threading.Thread(target=self._run, name="kvplane-engine", daemon=True)

    def start(self, streams: AsyncLLM) -> None:
        self._streams = streams
        self._thread.start()

    def shutdown(self) -> None:
        self._send(Shutdown())
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        try:
            self._loop.run()
        except BaseException as error:
            logger.exception("engine thread failed: the engine cannot go on")
            assert self._streams is not None
            self._streams.die(error)
