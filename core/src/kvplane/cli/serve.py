"""``kvplane serve [MODEL]``: the OpenAI-compatible HTTP server.

Every option is a flag and a ``KVPLANE_<NAME>`` environment variable; a flag given on
the command line wins, then the environment, then the default. The flags carry no
argparse defaults (``SUPPRESS``) so the settings can tell a given flag from an absent one.
"""

from __future__ import annotations

import argparse
import sys
import typing
from typing import Any

from kvplane.cli.engine_args import add_engine_arguments, with_default

#: Server options whose flag takes several values.
_LIST_OPTIONS = frozenset({"served_model_name"})


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    from kvplane.server.settings import ServerOptions

    parser = subparsers.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve a model over an OpenAI-compatible HTTP API (completions, chat, "
        "tokenize, metrics). Every option can also be set as KVPLANE_<OPTION> in the "
        "environment (e.g. KVPLANE_PORT=9000); flags win.",
    )
    parser.add_argument(
        "model_tag",
        nargs="?",
        metavar="MODEL",
        help="local HF model directory or .gguf file (default: embedded SmolLM2-135M-Instruct)",
    )
    group = parser.add_argument_group("server options")
    for name, info in ServerOptions.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_text = with_default(str(info.description), info.default)
        annotation = info.annotation
        if annotation is bool:
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                               help=help_text)  # fmt: skip
        elif name in _LIST_OPTIONS:
            group.add_argument(flag, dest=name, nargs="+", metavar="NAME", help=help_text)
        else:
            group.add_argument(flag, dest=name, type=_scalar(annotation), help=help_text)
    add_engine_arguments(parser)
    # Absent flags leave no attribute: the environment and defaults fill them in.
    for action in parser._actions:
        if action.dest not in ("help", "model_tag"):
            action.default = argparse.SUPPRESS
    # A server says what it loaded and where it listens (kvplane --log-level overrides).
    parser.set_defaults(handler=run, default_log_level="INFO")
    return parser


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from kvplane.server.launcher import run_server
    from kvplane.server.settings import ServerSettings

    given = {
        name: value for name, value in vars(args).items() if name in ServerSettings.model_fields
    }
    if args.model_tag is not None:
        if given.get("model", args.model_tag) != args.model_tag:
            print("kvplane: error: MODEL and --model disagree; give one", file=sys.stderr)
            return 2
        given["model"] = args.model_tag
    try:
        settings = ServerSettings(**given)
        settings.engine_config()
    except ValidationError as error:
        print(f"kvplane: error: {describe_invalid_options(error)}", file=sys.stderr)
        return 2
    except ValueError as error:
        print(f"kvplane: error: {error}", file=sys.stderr)
        return 2
    return run_server(settings)


def describe_invalid_options(error: Any) -> str:
    """A pydantic ``ValidationError`` of the settings as flags and plain messages:
    ``--port: Input should be less than or equal to 65535 (got 80000)``."""
    problems = []
    for item in error.errors():
        flag = "--" + "-".join(str(part) for part in item["loc"]).replace("_", "-")
        message = str(item["msg"]).removeprefix("Value error, ")
        given = f" (got {item['input']!r})" if "input" in item and item["loc"] else ""
        problems.append(f"{flag}: {message}{given}")
    return "; ".join(problems)


def _scalar(annotation: Any) -> type:
    candidates = typing.get_args(annotation) or (annotation,)
    for candidate in (int, float, str):
        if candidate in candidates:
            return candidate
    return str
