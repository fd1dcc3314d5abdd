"""Logging setup shared by all hivemind modules: one handler, one line format, env-driven levels."""

from __future__ import annotations

import logging
import os
import sys
import threading
from enum import Enum
from typing import Optional, Union

__all__ = [
    "HandlerMode",
    "TextStyle",
    "get_logger",
    "use_hivemind_log_handler",
    "golog_level_to_python",
    "python_level_to_golog",
]

_PACKAGE_LOGGER_NAME = "hivemind"
_TRUE_VALUES = ("1", "true", "yes", "on")
_FALSE_VALUES = ("0", "false", "no", "off")


def _env_flag(name: str) -> Optional[bool]:
    """True/False when the variable is set to a recognised value, None when unset or empty."""
    value = os.environ.get(name, "").strip().lower()
    if value in _TRUE_VALUES:
        return True
    if value in _FALSE_VALUES:
        return False
    return None


def _use_colors() -> bool:
    forced = _env_flag("HIVEMIND_COLORS")
    if forced is not None:
        return forced
    stream = sys.stderr
    return bool(stream is not None and hasattr(stream, "isatty") and stream.isatty())


class TextStyle:
    """ANSI escape codes; every attribute is an empty string when colours are disabled (not a TTY)."""

    BOLD = "\033[1m"
    GREEN = "\033[32m"
    YELLOW = "\033[33m"
    BLUE = "\033[34m"
    PURPLE = "\033[35m"
    ORANGE = "\033[38;5;208m"
    RED = "\033[31m"
    GRAY = "\033[90m"
    RESET = "\033[0m"

    @classmethod
    def _disable(cls) -> None:
        for attr in ("BOLD", "GREEN", "YELLOW", "BLUE", "PURPLE", "ORANGE", "RED", "GRAY", "RESET"):
            setattr(cls, attr, "")


if not _use_colors():
    TextStyle._disable()

_LEVEL_DISPLAY_NAMES = {logging.WARNING: "WARN"}


class HivemindFormatter(logging.Formatter):
    """`Mon DD HH:MM:SS.mmm [LEVEL] [logger.function:line] message`; the caller part is omitted for INFO.

    A record may carry a ``caller`` attribute (``logger.debug(msg, extra={"caller": "file.go:42"})``) that replaces
    the computed ``logger.function:line`` location, e.g. for messages forwarded from the p2pd daemon.
    """

    _LEVEL_COLORS = {
        logging.DEBUG: "BLUE",
        logging.INFO: "GREEN",
        logging.WARNING: "YELLOW",
        logging.ERROR: "RED",
        logging.CRITICAL: "RED",
    }

    def __init__(self):
        super().__init__(datefmt="%b %d %H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        asctime = self.formatTime(record, self.datefmt)
        created_ms = int(record.msecs)
        level_name = _LEVEL_DISPLAY_NAMES.get(record.levelno, record.levelname)
        color = getattr(TextStyle, self._LEVEL_COLORS.get(record.levelno, "PURPLE"), "")
        parts = [f"{asctime}.{created_ms:03d}", f"[{TextStyle.BOLD}{color}{level_name}{TextStyle.RESET}]"]

        show_caller = bool(_env_flag("HIVEMIND_ALWAYS_LOG_CALLER")) or record.levelno != logging.INFO
        if show_caller:
            caller = getattr(record, "caller", None)
            if caller is None:
                caller = f"{record.name}.{record.funcName}:{record.lineno}"
            parts.append(f"[{caller}]")

        parts.append(record.getMessage())
        line = " ".join(parts)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line = f"{line}\n{record.exc_text}"
        if record.stack_info:
            line = f"{line}\n{self.formatStack(record.stack_info)}"
        return line


class HandlerMode(Enum):
    """Where hivemind's handler is attached: hivemind loggers only, the root logger, or nowhere."""

    NOWHERE = "nowhere"
    IN_HIVEMIND = "in_hivemind"
    IN_ROOT_LOGGER = "in_root_logger"


def _env_level_name() -> str:
    """HIVEMIND_LOGLEVEL as a level name (upper case; a number becomes its name), "INFO" when unset."""
    raw = os.environ.get("HIVEMIND_LOGLEVEL", "").strip().upper() or "INFO"
    return logging.getLevelName(int(raw)) if raw.isdigit() else raw


# the level name requested by HIVEMIND_LOGLEVEL at import, e.g. "DEBUG" (petals reads it to tune its own loggers)
loglevel: str = _env_level_name()

_lock = threading.RLock()
_handler: Optional[logging.Handler] = None
_current_mode: Optional[HandlerMode] = None


def _env_level() -> int:
    """The level requested by HIVEMIND_LOGLEVEL (name like DEBUG/INFO/WARN or a number), INFO by default."""
    raw = os.environ.get("HIVEMIND_LOGLEVEL", "").strip().upper() or "INFO"
    if raw.isdigit():
        return int(raw)
    resolved = _GOLOG_TO_PYTHON.get(raw, logging.getLevelName(raw))
    if not isinstance(resolved, int):
        raise ValueError(f"HIVEMIND_LOGLEVEL={raw!r} is not a logging level (use DEBUG, INFO, WARNING or ERROR)")
    return resolved


def _get_handler() -> logging.Handler:
    global _handler
    if _handler is None:
        _handler = logging.StreamHandler()  # stderr
        _handler.setFormatter(HivemindFormatter())
        _handler._hivemind_handler = True  # marker for tests / introspection
    return _handler


def _install(mode: HandlerMode) -> None:
    global _current_mode
    handler = _get_handler()
    level = _env_level()
    package_logger = logging.getLogger(_PACKAGE_LOGGER_NAME)
    root_logger = logging.getLogger()

    # undo the previous mode
    if _current_mode == HandlerMode.IN_HIVEMIND:
        package_logger.removeHandler(handler)
        package_logger.propagate = True
    elif _current_mode == HandlerMode.IN_ROOT_LOGGER:
        root_logger.removeHandler(handler)

    package_logger.setLevel(level)
    if mode == HandlerMode.IN_HIVEMIND:
        package_logger.addHandler(handler)
        package_logger.propagate = False
    elif mode == HandlerMode.IN_ROOT_LOGGER:
        root_logger.addHandler(handler)
        root_logger.setLevel(level)
        package_logger.propagate = True
    else:  # NOWHERE: leave formatting to the application's own logging configuration
        package_logger.propagate = True
    _current_mode = mode


def use_hivemind_log_handler(where: Union[HandlerMode, str]) -> None:
    """Choose where hivemind's log handler lives: "in_hivemind" (default), "in_root_logger" or "nowhere"."""
    if isinstance(where, str):
        try:
            where = HandlerMode(where)
        except ValueError:
            options = ", ".join(repr(mode.value) for mode in HandlerMode)
            raise ValueError(f"Unknown log handler mode {where!r}, expected one of {options}") from None
    if not isinstance(where, HandlerMode):
        raise TypeError(f"where must be a HandlerMode or str, got {type(where).__name__}")
    with _lock:
        _install(where)


def get_logger(name: Optional[str] = None) -> logging.Logger:
    """Return a logger (the "hivemind" package logger when name is None); installs hivemind's handler on first use."""
    with _lock:
        if _current_mode is None:
            _install(HandlerMode.IN_HIVEMIND)
    return logging.getLogger(_PACKAGE_LOGGER_NAME if name is None else name)


_GOLOG_TO_PYTHON = {
    "DEBUG": logging.DEBUG,
    "INFO": logging.INFO,
    "WARN": logging.WARNING,
    "WARNING": logging.WARNING,
    "ERROR": logging.ERROR,
    "DPANIC": logging.CRITICAL,
    "PANIC": logging.CRITICAL,
    "FATAL": logging.CRITICAL,
}
_PYTHON_TO_GOLOG = {"WARNING": "WARN", "CRITICAL": "FATAL"}


def golog_level_to_python(level: str) -> int:
    """Map a Go-log level name ("DEBUG", "INFO", "WARN", "ERROR", "DPANIC", "PANIC", "FATAL") to a logging level."""
    try:
        return _GOLOG_TO_PYTHON[level.strip().upper()]
    except KeyError:
        raise ValueError(f"Unknown golog level {level!r}, expected one of {sorted(_GOLOG_TO_PYTHON)}") from None


def python_level_to_golog(level: Union[str, int]) -> str:
    """Map a Python logging level (name or number) to the Go-log level name: WARNING -> WARN, CRITICAL -> FATAL."""
    if isinstance(level, int):
        name = logging.getLevelName(level)
        if not isinstance(name, str) or name.startswith("Level "):
            raise ValueError(f"Unknown python logging level {level!r}")
    else:
        name = level.strip().upper()
        if not isinstance(logging.getLevelName(name), int):
            raise ValueError(f"Unknown python logging level {level!r}")
    return _PYTHON_TO_GOLOG.get(name, name)
