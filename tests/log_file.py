"""Log lines of a test written to a file, so that lines of forked processes (an averager's matchmaking) count too."""

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def logged_to_file(logger: logging.Logger, path: Path) -> Iterator[None]:
    """Write what ``logger`` logs inside the block (here and in processes forked meanwhile) to ``path``."""
    handler = logging.FileHandler(path)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()


@contextmanager
def debug_level(logger: logging.Logger) -> Iterator[None]:
    """``logger`` logs DEBUG lines inside the block (here and in processes forked meanwhile).

    Through ``setLevel``: it also clears the loggers' cached ``isEnabledFor`` answers, which assigning ``level``
    leaves as they were (a DEBUG line logged earlier in the same process then stays disabled).
    """
    previous = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        logger.setLevel(previous)
