"""Locating the p2pd daemon binary and reporting its version (standard library only)."""

import functools
import os
import subprocess

__all__ = ["P2PD_PATH_ENV_VAR", "get_p2pd_path", "get_p2pd_version"]

P2PD_PATH_ENV_VAR = "HIVEMIND_P2PD_PATH"
_PACKAGED_P2PD = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "hivemind_cli", "p2pd")


def _check_executable(path: str, origin: str) -> str:
    if not os.path.exists(path):
        raise FileNotFoundError(f"p2pd daemon binary not found at {path} ({origin}). {_HOW_TO_FIX}")
    if not os.path.isfile(path) or not os.access(path, os.X_OK):
        raise RuntimeError(f"p2pd daemon at {path} ({origin}) is not an executable file. {_HOW_TO_FIX}")
    return path


_HOW_TO_FIX = (
    "Reinstall hivemind with Go 1.20+ on PATH so that the daemon is compiled (`pip install -e .` in the source "
    f"tree), or set {P2PD_PATH_ENV_VAR}=/path/to/p2pd to use a daemon binary you already have."
)


def get_p2pd_path() -> str:
    """Path of the p2pd binary: ``$HIVEMIND_P2PD_PATH`` if set, else the one built into the package."""
    user_path = os.environ.get(P2PD_PATH_ENV_VAR)
    if user_path:
        return _check_executable(os.path.abspath(os.path.expanduser(user_path)), f"from ${P2PD_PATH_ENV_VAR}")
    return _check_executable(_PACKAGED_P2PD, "packaged with hivemind")


@functools.cache
def _version_of(path: str) -> str:
    try:
        result = subprocess.run([path, "-version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(f"cannot run `{path} -version`: {e}") from e
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        raise RuntimeError(
            f"`{path} -version` failed with exit code {result.returncode}: {result.stderr.strip() or 'no output'}"
        )
    return lines[0].strip()


def get_p2pd_version() -> str:
    """The single line printed by ``p2pd -version``, e.g. ``p2pd 0.5.0-hivemind-compatible`` (cached per path)."""
    return _version_of(get_p2pd_path())
