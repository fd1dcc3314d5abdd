"""How trainers tell the monitor their loss: one signed DHT record per peer under the key ``<run_id>_metrics``."""

from typing import Dict, List

import pydantic

import hivemind
from hivemind.dht.schema import BytesWithPublicKey, RSASignatureValidator, SchemaValidator

METRICS_EXPIRATION = 60.0  # seconds: a trainer that stops publishing drops out of the monitor's view after this


class LocalMetrics(pydantic.BaseModel):
    """What one trainer reports after each epoch: the mean training loss of the steps it made in that epoch."""

    epoch: pydantic.conint(ge=0, strict=True)
    loss: pydantic.confloat(ge=0.0, allow_inf_nan=False, strict=True)
    samples: pydantic.conint(ge=0, strict=True)  # samples this peer processed in the epoch
    steps: pydantic.conint(ge=0, strict=True)
    time: pydantic.StrictFloat  # get_dht_time() when published


class MetricsSchema(pydantic.BaseModel):
    """Key ``<run_id>_metrics``: a dictionary whose subkeys carry their writer's public key, so each entry is signed
    and only its owner can replace it."""

    metrics: Dict[BytesWithPublicKey, LocalMetrics]


class MetricsPublisher:
    """Publishes this trainer's :class:`LocalMetrics` (signed with this process's key)."""

    def __init__(self, dht: hivemind.DHT, run_id: str):
        self.dht, self.key = dht, f"{run_id}_metrics"
        signer = RSASignatureValidator()
        self.subkey = signer.local_public_key
        dht.add_validators([signer, SchemaValidator(MetricsSchema, prefix=run_id)])
        self._pending = None

    def publish(self, metrics: LocalMetrics) -> None:
        """Store without blocking training; a store still in flight from the last epoch is waited for first."""
        if self._pending is not None:
            self._pending.result()
        self._pending = self.dht.store(
            self.key, subkey=self.subkey, value=metrics.model_dump(),
            expiration_time=hivemind.utils.get_dht_time() + METRICS_EXPIRATION, return_future=True,
        )  # fmt: skip


def fetch_metrics(dht: hivemind.DHT, run_id: str) -> List[LocalMetrics]:
    """Every trainer's latest record (the DHT has already checked signatures and the schema)."""
    found = dht.get(f"{run_id}_metrics", latest=True)
    if found is None or not isinstance(found.value, dict):
        return []
    records = []
    for entry in found.value.values():
        try:
            records.append(LocalMetrics.model_validate(entry.value, strict=True))
        except pydantic.ValidationError:
            continue  # written by a peer with another version of this example: not counted
    return records


def add_metrics_validators(dht: hivemind.DHT, run_id: str) -> None:
    """The monitor checks the same signatures and schema as the trainers (it also stores records for others)."""
    dht.add_validators([RSASignatureValidator(), SchemaValidator(MetricsSchema, prefix=run_id)])
