"""The ``kvplane`` command: a thin argparse front end over subcommand modules.

Each subcommand is a module ``kvplane.cli.<name>`` listed in :data:`SUBCOMMANDS` that
exposes ``add_parser(subparsers) -> argparse.ArgumentParser``; it registers its parser
and sets its handler with ``parser.set_defaults(handler=...)``, a function
``(argparse.Namespace) -> int`` returning the exit status. ``add_parser`` runs on every
invocation, so it must stay cheap: import heavy dependencies (torch, the engine, the
server) inside the handler. A listed module that does not exist yet is left out.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from kvplane.log import configure_logging
from kvplane.version import __version__

#: Subcommand modules, in the order ``kvplane --help`` lists them.
SUBCOMMANDS: tuple[str, ...] = ("serve", "generate", "bench", "platforms", "quantize")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
#: Environment variable with the default of ``--log-level``.
LOG_LEVEL_ENV = "KVPLANE_LOG_LEVEL"


class ExactParser(argparse.ArgumentParser):
    """An argument parser that takes no abbreviations: ``--devic cpu`` is an error, not a
    silent ``--device cpu``. Subcommand parsers inherit the class."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every available subcommand registered."""
    parser = ExactParser(
        prog="kvplane",
        description="kvplane: LLM inference and serving on pluggable hardware platforms.",
    )
    parser.add_argument("--version", action="version", version=f"kvplane {__version__}")
    parser.add_argument(
        "--log-level",
        default=os.environ.get(LOG_LEVEL_ENV, "").upper() or None,
        type=str.upper,
        choices=LOG_LEVELS,
        help=f"logging level (default: {LOG_LEVEL_ENV}, else INFO for serve and WARNING for "
        "the other commands); DEBUG also prints the traceback of an error",
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help="log at DEBUG and print the traceback of an error (same as --log-level DEBUG)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        module = _load_subcommand(name)
        if module is not None:
            module.add_parser(subparsers)
    return parser


def _load_subcommand(name: str) -> ModuleType | None:
    module_name = f"{__package__}.{name}"
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name == module_name:
            return None  # not written yet; any other missing module is a real error
        raise


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``kvplane`` with ``argv`` (default: ``sys.argv[1:]``); return the exit status.

    Usage errors and ``--help`` / ``--version`` exit through ``SystemExit`` as argparse
    does; without a subcommand the help is printed and 2 returned.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.debug:
        args.log_level = "DEBUG"
    args.log_level = args.log_level or getattr(args, "default_log_level", "WARNING")
    configure_logging(args.log_level)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return int(handler(args))
    except Exception as error:
        if args.log_level == "DEBUG" or not is_user_error(error):
            raise
        print(f"kvplane: error: {error} (--debug shows the traceback)", file=sys.stderr)
        return 2


def is_user_error(error: BaseException) -> bool:
    """Whether ``error`` reports something the user asked for that cannot be done (a bad
    value, a missing file, a platform that is not there), as opposed to a bug: those get
    one line, a bug its traceback."""
    if isinstance(error, ValueError | FileNotFoundError | NotADirectoryError | PermissionError):
        return True
    # Imported only if selection ran, so that the CLI starts without torch.
    selection = sys.modules.get("kvplane.plugins.selection")
    return selection is not None and isinstance(error, selection.PlatformSelectionError)


if __name__ == "__main__":
    raise SystemExit(main())
