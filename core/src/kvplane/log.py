"""The one log format of every kvplane process (the CLI's, the engine process's)."""

from __future__ import annotations

import logging


def configure_logging(level: int | str) -> None:
    """Log records at ``level`` and above to stderr, with timestamps (once per process)."""
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
