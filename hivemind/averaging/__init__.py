"""hivemind.averaging: decentralized averaging of tensors in small groups of peers found through the DHT."""

from hivemind.averaging.allreduce import AllReduceRunner, AveragingMode
from hivemind.averaging.averager import DecentralizedAverager, compute_schema_hash
from hivemind.averaging.control import AveragingStage, StepControl
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.key_manager import GROUP_PATTERN, GroupKeyManager, is_valid_group
from hivemind.averaging.load_balancing import hagenbach_bishoff, load_balance_peers, optimize_parts_lp
from hivemind.averaging.matchmaking import Matchmaking, MatchmakingException, PotentialLeaders
from hivemind.averaging.partition import (
    DEFAULT_PART_SIZE_BYTES,
    AllreduceException,
    BannedException,
    TensorPartContainer,
    TensorPartReducer,
)

__all__ = [
    "DecentralizedAverager",
    "compute_schema_hash",
    "StepControl",
    "AveragingStage",
    "AveragingMode",
    "AllReduceRunner",
    "AllreduceException",
    "BannedException",
    "TensorPartContainer",
    "TensorPartReducer",
    "DEFAULT_PART_SIZE_BYTES",
    "GroupInfo",
    "GroupKeyManager",
    "GROUP_PATTERN",
    "is_valid_group",
    "Matchmaking",
    "MatchmakingException",
    "PotentialLeaders",
    "load_balance_peers",
    "optimize_parts_lp",
    "hagenbach_bishoff",
]
