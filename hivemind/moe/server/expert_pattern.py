"""Expert uid patterns such as ``ffn.[0:256].[0:1024]``: parsing, sampling, and picking uids not yet in the DHT."""

from __future__ import annotations

import random
import re
from typing import Callable, List, Optional, Sequence, Set, Tuple, Union

from hivemind.moe.expert_uid import UID_DELIMITER, is_valid_uid
from hivemind.utils.logging import get_logger

__all__ = ["parse_expert_pattern", "sample_uid", "generate_uids_from_pattern", "MAX_ATTEMPTS_PER_EXPERT"]

logger = get_logger(__name__)

MAX_ATTEMPTS_PER_EXPERT = 10
_RANGE_BLOCK = re.compile(r"\[\s*(\d+)\s*:\s*(\d+)\s*\]")  # (spaces inside, as hivemind 1.1.12 allows)

Block = Union[str, Tuple[int, int]]  # a literal, or a half-open range [low, high) of integers


def parse_expert_pattern(pattern: str) -> List[Block]:
    """Split ``pattern`` into blocks: literals and ``(low, high)`` ranges; ValueError names what is wrong."""
    blocks: List[Block] = []
    for text in pattern.split(UID_DELIMITER):
        match = _RANGE_BLOCK.fullmatch(text)
        if match is not None:
            low, high = int(match.group(1)), int(match.group(2))
            if low >= high:
                raise ValueError(f"expert pattern {pattern!r}: range [{low}:{high}] is empty (need low < high)")
            blocks.append((low, high))
        elif "[" in text or "]" in text or not text:
            raise ValueError(f"expert pattern {pattern!r}: block {text!r} is neither a literal nor a [low:high] range")
        else:
            blocks.append(text)
    if len(blocks) < 2 or not isinstance(blocks[0], str):
        raise ValueError(f"expert pattern {pattern!r} must be <type>.<block>[.<block>...], e.g. 'ffn.[0:32].[0:32]'")
    return blocks


def sample_uid(blocks: Sequence[Block], rng: random.Random) -> str:
    """One uid from the parsed pattern: each range replaced by a uniformly random integer in it."""
    parts = [block if isinstance(block, str) else str(rng.randrange(*block)) for block in blocks]
    return UID_DELIMITER.join(parts)


def generate_uids_from_pattern(
    num_experts: int,
    pattern: Optional[str],
    is_taken: Callable[[List[str]], List[bool]],
    exclude: Sequence[str] = (),
    rng: Optional[random.Random] = None,
) -> List[str]:
    """
    ``num_experts`` distinct uids that match ``pattern`` and that ``is_taken`` (e.g. "already announced in the DHT")
    reports free. Without a pattern the uids are ``expert.0``, ``expert.1``, ... (skipping ``exclude``).

    :param is_taken: checks a list of candidate uids at once, returns one bool per candidate
    :param exclude: uids that are already used by this server (e.g. loaded from checkpoints)
    :raises ValueError: bad pattern, or fewer free uids than requested after MAX_ATTEMPTS_PER_EXPERT rounds
    """
    chosen: List[str] = []
    used: Set[str] = set(exclude)
    if pattern is None:
        index = 0
        while len(chosen) < num_experts:
            uid = f"expert{UID_DELIMITER}{index}"
            if uid not in used:
                chosen.append(uid)
            index += 1
        return chosen

    blocks = parse_expert_pattern(pattern)
    rng = rng or random.Random()
    for _ in range(MAX_ATTEMPTS_PER_EXPERT):
        missing = num_experts - len(chosen)
        if missing == 0:
            break
        candidates: List[str] = []
        for _ in range(missing * MAX_ATTEMPTS_PER_EXPERT):  # distinct candidates not used yet, if the space allows
            uid = sample_uid(blocks, rng)
            if uid not in used and uid not in candidates:
                candidates.append(uid)
                if len(candidates) == missing:
                    break
        if not candidates:
            continue
        for uid in candidates:
            if not is_valid_uid(uid):
                raise ValueError(f"expert pattern {pattern!r} gives {uid!r}, which is not a valid expert uid")
        for uid, taken in zip(candidates, is_taken(candidates)):
            used.add(uid)
            if not taken:
                chosen.append(uid)
    if len(chosen) < num_experts:
        raise ValueError(
            f"found only {len(chosen)} of {num_experts} free expert uids for pattern {pattern!r} after "
            f"{MAX_ATTEMPTS_PER_EXPERT} attempts per expert; widen the pattern's ranges or host fewer experts"
        )
    return chosen
