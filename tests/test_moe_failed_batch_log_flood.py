"""A client can make its own requests fail inside the expert's module (an input of a dtype the module cannot take,
where the schema leaves the dtype open, as ``BatchTensorDescriptor(16)`` does): such a batch runs apart from the
others and only its caller gets the error, but the Runtime logged a WARNING line for every failed batch, so that one
peer wrote about 1200 lines (~200 KB) per second into the server's log (5287 requests in 5 s, 5791 lines). The
warning now comes at most once per interval per pool, saying how many more batches failed meanwhile; the others go
to DEBUG."""

import asyncio
import logging
import math

import pytest
import torch
from moe_hostile_helpers import HIDDEN, UID, attacker, good_forward, hostile_server, make_request

from hivemind.moe.server import runtime
from hivemind.p2p import P2PHandlerError

__all__ = ["attacker", "hostile_server"]  # the fixtures, used by the tests below


@pytest.mark.timeout(60)
async def test_batches_failing_in_the_module_are_logged_at_most_once_per_interval(
    hostile_server, attacker, caplog, monkeypatch
):
    _, stub = attacker
    monkeypatch.setattr(runtime, "FAILED_BATCH_LOG_INTERVAL", 3600.0, raising=False)  # (however slowly the flood goes)
    wrong_dtype = make_request(UID, torch.randn(2, HIDDEN, dtype=torch.float64))  # the module takes float32

    async def flood(requests: int):
        errors = await asyncio.gather(
            *(stub.rpc_forward(wrong_dtype, timeout=30) for _ in range(requests)), return_exceptions=True
        )
        assert all(isinstance(error, P2PHandlerError) and "dtype" in str(error) for error in errors), errors

    with caplog.at_level(logging.WARNING, logger=runtime.__name__):
        for _ in range(10):
            await flood(20)
        await good_forward(stub)  # the others are served meanwhile
        warnings = [record.getMessage() for record in caplog.records if "failed in" in record.getMessage()]
        assert len(warnings) == 1, len(warnings)  # (200 before: one per failed batch)
        assert f"failed in {UID}_forward" in warnings[0] and "mat1 and mat2" in warnings[0]
        monkeypatch.setattr(hostile_server.runtime._failed_batch_logs[f"{UID}_forward"], "last_logged", -math.inf)
        caplog.clear()
        await flood(1)  # (the interval has passed)
    (warning,) = [record.getMessage() for record in caplog.records if "failed in" in record.getMessage()]
    assert "more since the last such message" in warning
