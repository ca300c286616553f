"""The OpenAI-compatible HTTP server behind ``kvplane serve``.

Modules: ``settings`` (options as flags and ``KVPLANE_*`` variables), ``launcher``
(engine + uvicorn, SIGTERM drain), ``app`` (routes), ``middleware`` (draining, API key,
body size, HTTP metrics), ``protocol`` (request bodies), ``params`` (request ->
SamplingParams), ``completions`` and ``chat`` (the generation endpoints),
``conversation`` (chat template), ``runner`` (one API request on the engine: merge,
cancel, disconnect), ``responses`` (SSE, usage), ``state`` (what handlers share),
``metrics`` (Prometheus series through prometheus-client), ``errors`` (OpenAI-style
error bodies), ``tool_parsers`` (tool-call formats).
Importing this package loads none of them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvplane.server.app import build_app
    from kvplane.server.launcher import run_server
    from kvplane.server.settings import ServerSettings

__all__ = ["ServerSettings", "build_app", "run_server"]

_LAZY = {
    "build_app": "kvplane.server.app",
    "run_server": "kvplane.server.launcher",
    "ServerSettings": "kvplane.server.settings",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kvplane.server' has no attribute {name!r}")
