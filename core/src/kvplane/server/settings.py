"""Options of ``kvplane serve``: the server's own plus every engine option.

Each option can be given as a flag, as a ``KVPLANE_<NAME>`` environment variable, or
left at its default; a flag wins over the environment. The engine options are derived
from :class:`~kvplane.config.EngineConfig`'s fields, so a new engine option becomes a
serve flag and an environment variable with no change here.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, get_type_hints

from pydantic import Field, create_model, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from kvplane.config import INTERNAL_FIELDS, EngineConfig
from kvplane.models.source import DEFAULT_MODEL_NAME

#: Prefix of the environment variables (``KVPLANE_PORT``, ``KVPLANE_MAX_NUM_SEQS``...).
ENV_PREFIX = "KVPLANE_"


class ServerOptions(BaseSettings):
    """The server's own options (the engine's are added by :data:`ServerSettings`)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid")

    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0: all interfaces)")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0: any free port)")
    api_key: str | None = Field(
        None, description="require 'Authorization: Bearer KEY' on every API route"
    )
    served_model_name: Annotated[list[str] | None, NoDecode] = Field(
        None,
        description="model name(s) clients use; the first is reported "
        "(default: MODEL as given, or SmolLM2-135M-Instruct)",
    )
    max_waiting_requests: int | None = Field(
        None,
        ge=0,
        description="answer 503 while this many sequences wait to be scheduled (default: no limit)",
    )
    max_request_body_bytes: int = Field(
        16 * 2**20, ge=1, description="larger request bodies get 413"
    )
    max_logprobs: int = Field(20, ge=0, description="most logprobs / top_logprobs per token")
    shutdown_timeout: float = Field(
        30.0,
        ge=0,
        description="on SIGTERM, seconds in-flight requests may run before they are aborted",
    )
    chat_template: str | None = Field(
        None, description="chat template (a file or the Jinja text) instead of the model's"
    )
    tool_call_parser: str | None = Field(
        None,
        description="tool-call format: hermes, llama3_json or mistral (default: from the "
        "chat template)",
    )
    uvicorn_log_level: str = Field("info", description="uvicorn's log level")
    access_log: bool = Field(True, description="log every HTTP request")

    @field_validator("served_model_name", mode="before")
    @classmethod
    def _split_names(cls, value: Any) -> Any:
        # KVPLANE_SERVED_MODEL_NAME=a,b gives two names; a flag gives a list already.
        if isinstance(value, str):
            return [name.strip() for name in value.split(",") if name.strip()]
        return value

    def engine_config(self) -> EngineConfig:
        """The engine options as an :class:`EngineConfig` (``ValueError`` if invalid)."""
        values = {
            field.name: getattr(self, field.name)
            for field in dataclasses.fields(EngineConfig)
            if field.name not in INTERNAL_FIELDS
        }
        return EngineConfig(**values, usage="online")

    def model_names(self) -> list[str]:
        """Names the server answers to; the first is the one it reports."""
        if self.served_model_name:
            return list(self.served_model_name)
        model = getattr(self, "model", None)
        return [model if model is not None else DEFAULT_MODEL_NAME]


def _engine_fields() -> dict[str, Any]:
    hints = get_type_hints(EngineConfig)
    return {
        field.name: (hints[field.name], field.default)
        for field in dataclasses.fields(EngineConfig)
        if field.name not in INTERNAL_FIELDS
    }


#: Server and engine options: ``ServerSettings(**flags_given)`` reads the rest from
#: ``KVPLANE_*`` variables, then the defaults (pydantic-settings: init values > env > default).
ServerSettings: type[ServerOptions] = create_model(  # type: ignore[call-overload]
    "ServerSettings",
    __base__=ServerOptions,
    __doc__="Options of ``kvplane serve``: the server's and every EngineConfig field.",
    **_engine_fields(),
)

#: Names of the server's own options, in declaration order.
SERVER_OPTION_NAMES: tuple[str, ...] = tuple(ServerOptions.model_fields)
