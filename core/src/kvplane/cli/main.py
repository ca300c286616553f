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
import logging
from collections.abc import Sequence
from types import ModuleType

from kvplane.version import __version__

#: Subcommand modules, in the order ``kvplane --help`` lists them.
SUBCOMMANDS: tuple[str, ...] = ("serve", "generate", "bench", "platforms")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every available subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="kvplane",
        description="kvplane: LLM inference and serving on pluggable hardware platforms.",
    )
    parser.add_argument("--version", action="version", version=f"kvplane {__version__}")
    parser.add_argument(
        "--log-level",
        default="WARNING",
        type=str.upper,
        choices=LOG_LEVELS,
        help="logging level (default: WARNING)",
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
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    return int(handler(args))


if __name__ == "__main__":
    raise SystemExit(main())
