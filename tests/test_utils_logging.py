import logging
import os
import re
import subprocess
import sys

import pytest

from hivemind.utils.logging import (
    HandlerMode,
    HivemindFormatter,
    get_logger,
    golog_level_to_python,
    python_level_to_golog,
    use_hivemind_log_handler,
)

LINE_PREFIX = r"[A-Z][a-z]{2} \d{2} \d{2}:\d{2}:\d{2}\.\d{3}"


def _format(level: int, msg: str, name: str = "hivemind.test", func: str = "my_func", lineno: int = 42) -> str:
    record = logging.LogRecord(name, level, "/some/path.py", lineno, msg, None, None, func=func)
    return HivemindFormatter().format(record)


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("HIVEMIND_")}
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=60, check=True
    )


def test_info_line_has_no_caller(monkeypatch):
    monkeypatch.delenv("HIVEMIND_ALWAYS_LOG_CALLER", raising=False)
    line = _format(logging.INFO, "Running a DHT instance")
    assert re.fullmatch(LINE_PREFIX + r" \[INFO\] Running a DHT instance", line), line


def test_warning_is_printed_as_warn_with_caller(monkeypatch):
    monkeypatch.delenv("HIVEMIND_ALWAYS_LOG_CALLER", raising=False)
    line = _format(logging.WARNING, "careful")
    assert re.fullmatch(LINE_PREFIX + r" \[WARN\] \[hivemind\.test\.my_func:42\] careful", line), line


def test_debug_and_error_lines_have_caller():
    assert re.fullmatch(LINE_PREFIX + r" \[DEBUG\] \[a\.b\.f:7\] x", _format(logging.DEBUG, "x", "a.b", "f", 7))
    assert re.fullmatch(LINE_PREFIX + r" \[ERROR\] \[a\.b\.f:7\] x", _format(logging.ERROR, "x", "a.b", "f", 7))


def test_always_log_caller_env_adds_caller_to_info(monkeypatch):
    monkeypatch.setenv("HIVEMIND_ALWAYS_LOG_CALLER", "1")
    line = _format(logging.INFO, "hello")
    assert re.fullmatch(LINE_PREFIX + r" \[INFO\] \[hivemind\.test\.my_func:42\] hello", line), line


def test_caller_override_from_record_attribute():
    record = logging.LogRecord("hivemind.p2p", logging.ERROR, "p.py", 1, "boom", None, None, func="f")
    record.caller = "host/basic.go:123"
    assert HivemindFormatter().format(record).endswith("[ERROR] [host/basic.go:123] boom")


def test_no_colors_when_not_a_tty():
    result = _run_python("from hivemind.utils.logging import get_logger; get_logger('hivemind.x').warning('hi')")
    assert "\033[" not in result.stderr
    assert re.fullmatch(LINE_PREFIX + r" \[WARN\] \[hivemind\.x\.<module>:1\] hi\n", result.stderr), result.stderr


def test_colors_forced_by_env():
    result = _run_python("from hivemind.utils.logging import get_logger; get_logger().info('hi')", HIVEMIND_COLORS="1")
    assert "\033[" in result.stderr and "INFO" in result.stderr


def test_loglevel_env_filters_messages():
    code = "from hivemind.utils.logging import get_logger; l = get_logger('hivemind.x'); l.debug('d'); l.info('i')"
    assert "[DEBUG]" in _run_python(code, HIVEMIND_LOGLEVEL="DEBUG").stderr
    quiet = _run_python(code, HIVEMIND_LOGLEVEL="WARNING").stderr
    assert quiet == ""


def test_nothing_goes_to_stdout():
    result = _run_python("from hivemind.utils.logging import get_logger; get_logger('hivemind.x').info('i')")
    assert result.stdout == "" and "[INFO] i" in result.stderr


def test_handler_modes_move_the_handler():
    package_logger, root_logger = logging.getLogger("hivemind"), logging.getLogger()

    def hivemind_handlers(logger):
        return [h for h in logger.handlers if getattr(h, "_hivemind_handler", False)]

    try:
        use_hivemind_log_handler("in_root_logger")
        assert hivemind_handlers(root_logger) and not hivemind_handlers(package_logger)
        assert package_logger.propagate
        use_hivemind_log_handler(HandlerMode.NOWHERE)
        assert not hivemind_handlers(root_logger) and not hivemind_handlers(package_logger)
        use_hivemind_log_handler("in_hivemind")
        assert hivemind_handlers(package_logger) and not hivemind_handlers(root_logger)
        assert not package_logger.propagate
    finally:
        use_hivemind_log_handler("in_hivemind")


def test_unknown_handler_mode_is_rejected():
    with pytest.raises(ValueError, match="in_root_logger"):
        use_hivemind_log_handler("somewhere")


def test_get_logger_returns_named_logger():
    assert get_logger("hivemind.dht.node").name == "hivemind.dht.node"
    assert get_logger().name == "hivemind"


@pytest.mark.parametrize(
    "golog, python",
    [("DEBUG", "DEBUG"), ("INFO", "INFO"), ("WARN", "WARNING"), ("ERROR", "ERROR"), ("FATAL", "CRITICAL")],
)
def test_golog_level_mapping_round_trips(golog, python):
    assert python_level_to_golog(python) == golog
    assert python_level_to_golog(logging.getLevelName(python)) == golog
    assert golog_level_to_python(golog) == logging.getLevelName(python)


def test_unknown_levels_are_rejected():
    with pytest.raises(ValueError):
        golog_level_to_python("LOUD")
    with pytest.raises(ValueError):
        python_level_to_golog("LOUD")
