"""Announcing hosted experts in the DHT (declare_experts, DHTHandlerThread) and looking them up (get_experts).

What runs in the DHT process for them is in hivemind.moe.server.dht_declarations, which does not import torch.
"""

from __future__ import annotations

import threading
from functools import partial
from typing import Dict, List, Optional, Sequence, Union

from hivemind.dht import DHT
from hivemind.moe.client.expert import RemoteExpert, create_remote_experts
from hivemind.moe.expert_uid import ExpertUID, is_valid_uid
from hivemind.moe.server.dht_declarations import (  # (they run in the DHT process: that module is free of torch)
    _find_declared_peers,
    _store_declarations,
    declaration_entries,
    parse_declared_peer,
)
from hivemind.utils.logging import get_logger
from hivemind.utils.mpfuture import MPFuture
from hivemind.utils.timed_storage import DHTExpiration, get_dht_time

__all__ = ["declare_experts", "get_experts", "DHTHandlerThread", "declaration_entries", "parse_declared_peer"]

logger = get_logger(__name__)


class DHTHandlerThread(threading.Thread):
    """Declares the experts of ``module_backends`` at start and then every ``update_period`` seconds.

    :param expiration: lifetime of each declaration, in seconds (default: ``max(2 * update_period, 3)``)
    Stop it with :meth:`shutdown`, which wakes the thread at once and joins it.
    """

    def __init__(
        self, module_backends, dht: DHT, update_period: float = 30, expiration: Optional[float] = None, **thread_kwargs
    ):
        thread_kwargs.setdefault("daemon", True)
        thread_kwargs.setdefault("name", "DHTHandlerThread")
        super().__init__(**thread_kwargs)
        if expiration is None:
            expiration = max(2 * update_period, 3)
        self.module_backends, self.dht = module_backends, dht
        self.update_period, self.expiration = update_period, expiration
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                stored = declare_experts(self.dht, list(self.module_backends.keys()), get_dht_time() + self.expiration)
                _warn_if_refused(stored, self.update_period)
            except Exception as e:  # a failed round is retried at the next period; the server keeps serving
                if self.stop.is_set():
                    break
                logger.warning(f"Declaring experts in the DHT failed (will retry in {self.update_period} s): {e!r}")
            self.stop.wait(self.update_period)

    def shutdown(self, timeout: Optional[float] = None) -> None:
        """Stop declaring (entries already stored expire on their own) and wait for the thread to end."""
        self.stop.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout)


def _warn_if_refused(stored: Dict, update_period: float) -> None:
    """Log the announcements that the DHT did not store: clients cannot find those experts (or not by beam search)."""
    refused = [key for key, ok in stored.items() if not ok]
    if refused:
        example = refused[0][0] if isinstance(refused[0], tuple) else refused[0]
        logger.warning(
            f"The DHT refused {len(refused)} of {len(stored)} announcements of this server's experts (e.g. under "
            f"{example!r}: no peer stored it, or that key holds as many entries as a DHT node keeps); clients may "
            f"not find those experts. Retrying in {update_period} s"
        )


def declare_experts(
    dht: DHT, uids: Sequence[ExpertUID], expiration_time: float, wait: bool = True
) -> Union[Dict, MPFuture]:
    """Announce that this DHT's peer hosts ``uids`` until ``expiration_time`` (absolute DHT time, seconds).

    :returns: {key or (key, subkey): stored} (with ``wait=False``, an MPFuture of it)
    """
    assert not isinstance(uids, str), "declare_experts expects a list of uids, not a single string"
    uids = list(uids)
    for uid in uids:
        assert is_valid_uid(uid), f"{uid!r} is not a valid expert uid (expected e.g. 'ffn.3' or 'ffn.3.14')"
    return dht.run_coroutine(
        partial(_store_declarations, uids=uids, expires_at=expiration_time), return_future=not wait
    )


def get_experts(
    dht: DHT, uids: Sequence[ExpertUID], expiration_time: Optional[DHTExpiration] = None, return_future: bool = False
) -> Union[List[Optional[RemoteExpert]], MPFuture]:
    """RemoteExperts for ``uids`` (None where a uid is not announced); aligned with ``uids``.

    :param expiration_time: only accept announcements that live at least until then (default: now)
    """
    assert not isinstance(uids, str), "get_experts expects a list of uids, not a single string"
    infos = dht.run_coroutine(
        partial(_find_declared_peers, uids=list(uids), valid_until=expiration_time), return_future=return_future
    )
    return create_remote_experts(infos, dht, return_future=return_future)
