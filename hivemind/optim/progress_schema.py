"""The records of training progress that ProgressTracker publishes in the DHT, and the DHT schema that checks them.

The schema goes to the DHT process (DHT.add_validators), which imports this module to unpickle it: neither it nor the
packages above it import torch, so the DHT process stays small (see docs/moe.md).
"""

from typing import Dict, Optional

from pydantic import v1 as pydantic_v1

from hivemind.dht.schema import BytesWithPublicKey

__all__ = ["LocalTrainingProgress", "TrainingProgressSchema"]


class LocalTrainingProgress(pydantic_v1.BaseModel):
    """One peer's progress, as published under ``<prefix>_progress`` (fields in their order on the wire)."""

    peer_id: pydantic_v1.StrictBytes
    epoch: pydantic_v1.conint(ge=0, strict=True)
    samples_accumulated: pydantic_v1.conint(ge=0, strict=True)
    samples_per_second: pydantic_v1.confloat(ge=0.0, strict=True)
    time: pydantic_v1.StrictFloat
    client_mode: pydantic_v1.StrictBool


class TrainingProgressSchema(pydantic_v1.BaseModel):
    """DHT schema: each peer writes its own record under a subkey carrying its public key (so it must sign it)."""

    progress: Dict[BytesWithPublicKey, Optional[LocalTrainingProgress]]
