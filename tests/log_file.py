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
