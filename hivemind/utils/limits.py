"""Process resource limits."""

from hivemind.utils.logging import get_logger

__all__ = ["increase_file_limit"]

logger = get_logger(__name__)


def increase_file_limit(new_soft: int = 2**15, new_hard: int = 2**15) -> None:
    """Raise the limit on open files (every connection and stream needs descriptors) towards the given values.

    Limits are only ever raised, never lowered. If the hard limit cannot be raised (no privileges), the soft limit
    is raised up to the current hard limit. Failures are logged, not raised; no-op where ``resource`` is missing.
    """
    try:
        import resource
    except ImportError:
        logger.debug("resource module is not available, open file limit unchanged")
        return

    def as_number(limit: int) -> float:
        return float("inf") if limit == resource.RLIM_INFINITY else limit

    def as_limit(number: float) -> int:
        return resource.RLIM_INFINITY if number == float("inf") else int(number)

    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted_hard = max(as_number(hard), new_hard)
        wanted_soft = min(max(as_number(soft), new_soft), wanted_hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (as_limit(wanted_soft), as_limit(wanted_hard)))
        except (ValueError, OSError):
            wanted_soft = min(max(as_number(soft), new_soft), as_number(hard))
            resource.setrlimit(resource.RLIMIT_NOFILE, (as_limit(wanted_soft), hard))
        new_soft_limit, new_hard_limit = resource.getrlimit(resource.RLIMIT_NOFILE)
        logger.info(f"Increasing file limit: soft {soft}=>{new_soft_limit}, hard {hard}=>{new_hard_limit}")
        if as_number(new_soft_limit) < new_soft:
            logger.warning(
                f"The open file limit stays at {new_soft_limit}, below {new_soft}: the hard limit {new_hard_limit} "
                f"cannot be raised by this process; raise it (ulimit -Hn, or LimitNOFILE= for a systemd service) if "
                f"this peer serves many connections"
            )
    except (ValueError, OSError) as e:
        logger.warning(f"Could not increase the open file limit: {e!r}")
