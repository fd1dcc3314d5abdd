"""ProgressTracker: publishes this peer's training progress to the DHT and follows the progress of the whole swarm."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import threading
import time
from typing import AbstractSet, Any, Dict, List, Optional

from pydantic import v1 as pydantic_v1

from hivemind.dht import DHT
from hivemind.dht.schema import RSASignatureValidator, SchemaValidator
from hivemind.optim.epoch_rule import (
    MAX_EPOCH,
    GlobalTrainingProgress,
    RefreshPolicy,
    count_expected_peers,
    is_synchronized,
    is_time_for_global_step,
    next_epoch,
    summarize_swarm,
)
from hivemind.optim.progress_schema import LocalTrainingProgress, TrainingProgressSchema
from hivemind.optim.progress_tracker_compat import ProgressTrackerPublicNames, StopRequest
from hivemind.utils.asyncio import await_with_timeout
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.logging import get_logger
from hivemind.utils.performance_ema import PerformanceEMA
from hivemind.utils.timed_storage import get_dht_time

__all__ = ["ProgressTracker", "LocalTrainingProgress", "GlobalTrainingProgress", "TrainingProgressSchema"]

logger = get_logger(__name__)

# seconds that pause_updates waits for the record it starts with to be published
FLUSH_TIMEOUT = 5.0
DHT_CALL_TIMEOUT = 30.0  # seconds: one store or get of progress records; the DHT itself bounds each RPC much tighter
FORCED_REFRESH_PERIOD = 30.0  # seconds: republish an unchanged record this often so that it never expires


class _RefreshSetting:
    """One of the tracker's refresh options (see RefreshPolicy): read from its policy, and settable on a running
    tracker as in hivemind 1.1.12 (the policy is replaced by a checked copy; the next refresh uses it)."""

    def __set_name__(self, owner, name: str):
        self.name = name

    def __get__(self, tracker: Optional[ProgressTracker], owner=None):
        return self if tracker is None else getattr(tracker.refresh_policy, self.name)

    def __set__(self, tracker: ProgressTracker, value: float) -> None:
        tracker.refresh_policy = dataclasses.replace(tracker.refresh_policy, **{self.name: value})


class ProgressTracker(ProgressTrackerPublicNames, threading.Thread):
    """
    A background thread that publishes this peer's progress (epoch, samples accumulated in it, speed) to the DHT and
    periodically reads everyone's progress to tell when the swarm's epoch ends (see :mod:`hivemind.optim.epoch_rule`).

    Records are stored under the key ``f"{prefix}_progress"`` with a subkey that carries this tracker's public key,
    signed, so that nobody else can overwrite them. Each record lives ``metadata_expiration`` seconds; it is
    re-published whenever local progress changes and at least every 30 s, and replaced by ``None`` on shutdown so
    that others stop counting this peer at once.

    :param dht: a running DHT
    :param prefix: namespace of the run (hivemind.Optimizer uses its ``run_id``)
    :param target_batch_size: samples that the swarm accumulates in one epoch
    :param client_mode: published so that others can count client-mode peers; default: the DHT's mode
    :param min_refresh_period: never re-read the swarm's progress more often than this (seconds)
    :param max_refresh_period: re-read at least this often (seconds)
    :param default_refresh_period: period while this peer sees nobody else (seconds)
    :param expected_drift_peers: refresh slower when more peers than this take part (each moves the total less)
    :param expected_drift_rate: refresh after this fraction of the time left until the estimated end of the epoch
    :param performance_ema_alpha: smoothing of this peer's samples-per-second estimate
    :param metadata_expiration: lifetime of a published record (seconds)
    :param status_loglevel: log level of the periodic status line
    :param private_key: signs this peer's records; default: a new key for this tracker
    :param daemon: make the thread a daemon thread
    :param start: start the thread right away
    """

    # fmt: off
    def __init__(self, dht: DHT, prefix: str, target_batch_size: int, *, start: bool,
                 client_mode: Optional[bool] = None, private_key: Optional[RSAPrivateKey] = None,
                 min_refresh_period: float = 0.5, max_refresh_period: float = 10, default_refresh_period: float = 3,
                 expected_drift_peers: float = 3, expected_drift_rate: float = 0.2,
                 performance_ema_alpha: float = 0.1, metadata_expiration: float = 60.0,
                 status_loglevel: int = logging.DEBUG, daemon: bool = True):
        # fmt: on
        super().__init__(name=f"{type(self).__name__}({prefix})", daemon=daemon)
        if target_batch_size <= 0:
            raise ValueError(f"target_batch_size must be a positive number of samples, got {target_batch_size}")
        if metadata_expiration <= 0:
            raise ValueError(f"metadata_expiration must be positive (seconds), got {metadata_expiration}")
        self.dht, self.prefix, self.target_batch_size = dht, prefix, target_batch_size
        self.client_mode = dht.client_mode if client_mode is None else client_mode
        self.training_progress_key = f"{prefix}_progress"
        self.refresh_policy = RefreshPolicy(
            min_refresh_period, max_refresh_period, default_refresh_period, expected_drift_peers, expected_drift_rate
        )
        self.metadata_expiration, self.status_loglevel = metadata_expiration, status_loglevel
        self.performance_ema = PerformanceEMA(performance_ema_alpha)  # this peer's samples per second
        self._speed_clock_started = False  # the first report with samples starts the speed measurement

        signer = RSASignatureValidator(private_key if private_key is not None else RSAPrivateKey())
        self._local_public_key = signer.local_public_key  # the subkey of this peer's record: only we can sign it
        dht.add_validators([signer, SchemaValidator(TrainingProgressSchema, prefix=prefix)])

        self._lock = threading.RLock()  # guards the progress fields below; held only briefly
        self._updates_paused = False
        self._generation = 0  # bumped by every epoch update: fetches started earlier do not count for the new epoch
        self._others: List[LocalTrainingProgress] = []  # other peers' records from the latest fetch
        self._last_metadata: Dict[Any, Any] = {}  # the raw records of the latest fetch (parsed into _others)
        self._parse_failure_logged = False
        self.local_progress = self._make_record(epoch=0, samples_accumulated=0)
        self.epoch_started_at = self.local_progress.time  # DHT time at which this peer entered its current epoch
        self.global_progress = summarize_swarm(
            [], target_batch_size=target_batch_size, now=get_dht_time(), local_record=self.local_progress,
            refresh_policy=self.refresh_policy,
        )  # fmt: skip
        self.fetched_global_progress_this_epoch = threading.Event()
        self._fetch_finished = threading.Condition()
        self._last_fetch_started = -math.inf  # time.monotonic() at which the latest completed fetch began
        self._stop_requested = StopRequest(lambda: self._wake(lambda: self._stop_event))
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._last_reported: Optional[LocalTrainingProgress] = None
        self._last_report_time = -math.inf
        self._wake_reporter: Optional[asyncio.Event] = None
        self._wake_fetcher: Optional[asyncio.Event] = None
        self._stop_event: Optional[asyncio.Event] = None
        if start:
            self.start()

    # ------------------------------------------------------------------ user-facing state

    min_refresh_period = _RefreshSetting()
    max_refresh_period = _RefreshSetting()
    default_refresh_period = _RefreshSetting()
    expected_drift_peers = _RefreshSetting()
    expected_drift_rate = _RefreshSetting()

    @property
    def global_epoch(self) -> int:
        return self.global_progress.epoch

    @property
    def ready_to_update_epoch(self) -> bool:
        """Whether the swarm's epoch has ended (or is estimated to have ended) for this peer's local epoch."""
        return is_time_for_global_step(self.local_progress.epoch, self.global_progress, get_dht_time())

    @property
    def estimated_next_update_time(self) -> float:
        """DHT time (seconds) at which the current epoch is expected to end; inf if nobody makes progress."""
        return self.global_progress.eta_next_epoch

    def records(self) -> List[LocalTrainingProgress]:
        """The latest progress record of every peer seen (other peers' from the last fetch, this peer's current)."""
        with self._lock:
            own = self.local_progress
            return [record for record in self._others if record.peer_id != own.peer_id] + [own]

    def count_expected_peers(self, local_epoch: int, last_round_peers: Optional[AbstractSet[bytes]]) -> int:
        """Peers (this one included) expected to average at the end of ``local_epoch``, from the latest records and
        the time this peer entered its epoch (see ``epoch_rule.count_expected_peers``)."""
        with self._lock:
            return count_expected_peers(self.records(), local_epoch, last_round_peers, self.epoch_started_at)

    def report_local_progress(self, local_epoch: int, samples_accumulated: int, update_global_samples: bool = True):
        """
        Record that this peer accumulated ``samples_accumulated`` samples in total for ``local_epoch``; the record is
        published in the background.

        :param update_global_samples: also count the new samples in the swarm's total right away (without waiting for
          the next fetch)
        """
        with self._lock:
            new_samples = samples_accumulated - self.local_progress.samples_accumulated
            if local_epoch == self.local_progress.epoch and new_samples > 0:
                if self._speed_clock_started:
                    self.performance_ema.update(new_samples)
                else:  # the time since creation was setup, not training: measure from this first report on
                    self.performance_ema.reset_timer()
                    self._speed_clock_started = True
            self.local_progress = self._make_record(local_epoch, samples_accumulated)
            if update_global_samples:
                self._recompute_global_progress(next_fetch_time=self.global_progress.next_fetch_time)
        self._wake(lambda: self._wake_reporter)

    @contextlib.contextmanager
    def pause_updates(self):
        """Within this context, no progress is published or applied from the DHT, and the speed is not measured.

        The record as it is on entry (usually the last samples of an epoch) is published first: the others learn
        from it that the epoch is complete, and the pause may last as long as an averaging round. The lock is not
        held meanwhile (the background thread's loops would block on it, and shutdown() with them): they see the
        flag and leave the progress alone."""
        self._publish_now(FLUSH_TIMEOUT)
        with self.performance_ema.pause():
            with self._lock:
                was_paused, self._updates_paused = self._updates_paused, True
            try:
                yield
            finally:
                with self._lock:
                    self._updates_paused = was_paused
        self._wake(lambda: self._wake_reporter)
        self._wake(lambda: self._wake_fetcher)

    def update_epoch(self, new_epoch: Optional[int] = None) -> int:
        """
        Move this peer to ``new_epoch`` (default: one past the local epoch, or the swarm's epoch if further ahead)
        with no samples accumulated. Call inside :meth:`pause_updates`. Returns the new epoch.
        """
        with self._lock:
            if not self._updates_paused:
                raise RuntimeError(
                    "ProgressTracker.update_epoch must be called inside 'with tracker.pause_updates():'"
                )
            if new_epoch is None:
                new_epoch = next_epoch(self.local_progress.epoch, self.global_progress.epoch)
            self._generation += 1
            self.fetched_global_progress_this_epoch.clear()
            self.local_progress = self._make_record(new_epoch, 0)
            self.epoch_started_at = self.local_progress.time
            self._recompute_global_progress(next_fetch_time=get_dht_time())
        return new_epoch

    def refresh_global_progress(self, timeout: float) -> bool:
        """Fetch the swarm's progress now and wait (at most ``timeout`` s) for a fetch begun after this call."""
        requested = time.monotonic()
        self._wake(lambda: self._wake_fetcher)
        with self._fetch_finished:
            return self._fetch_finished.wait_for(lambda: self._last_fetch_started >= requested, timeout)

    def others_alive(self, timeout: float) -> Optional[bool]:
        """Whether another peer of the run has a live progress record, read from the DHT now (also while updates are
        paused); None if the DHT could not be read within ``timeout`` s."""
        try:
            response = self.dht.get(self.training_progress_key, latest=True, return_future=True).result(timeout)
        except Exception as e:
            logger.debug(f"{self.name} could not read the swarm's progress: {e!r}")
            return None
        return bool(self._parse_records(response.value if response is not None else {}))

    def shutdown(self, timeout: Optional[float] = None) -> None:
        """Stop the thread; it publishes a ``None`` record first so that peers stop counting this one."""
        self._stop_requested.set()  # (wakes the loop)
        if self.is_alive():
            self.join(timeout)
            if self.is_alive():
                logger.warning(f"{self.name} did not stop within {timeout} s; it keeps running as a daemon thread")

    # ------------------------------------------------------------------ helpers (any thread)

    def _make_record(self, epoch: int, samples_accumulated: int) -> LocalTrainingProgress:
        ema = self.performance_ema
        speed = ema.samples_per_second if ema.num_updates > 0 else ema.eps
        return LocalTrainingProgress(
            peer_id=self.dht.peer_id.to_bytes(),
            epoch=epoch,
            samples_accumulated=samples_accumulated,
            # not measured yet: a tiny positive speed (as the original publishes), never 0, which code that divides by
            # peers' speeds (OpenDiLoCo's tracker) cannot take
            samples_per_second=float(speed),
            time=float(get_dht_time()),
            client_mode=bool(self.client_mode),
        )

    def _parse_swarm_progress_data(self, metadata: Dict[Any, Any]) -> GlobalTrainingProgress:
        """
        The swarm's progress from the records of the latest fetch and this peer's current record. Called after each
        fetch and whenever local progress changes; a subclass may override it to aggregate differently.

        :param metadata: the raw DHT value under ``f"{prefix}_progress"``: ``{subkey: ValueWithExpiration}`` with
          each peer's record as a dict (this peer's own published record included), or ``{}`` if there is none
        """
        records = self._others if metadata is self._last_metadata else self._parse_records(metadata)
        return summarize_swarm(
            records,
            target_batch_size=self.target_batch_size,
            now=get_dht_time(),
            local_record=self.local_progress,
            refresh_policy=self.refresh_policy,
        )

    def _recompute_global_progress(self, next_fetch_time: Optional[float]) -> bool:
        """Re-aggregate the swarm's progress; ``next_fetch_time=None``: the refresh policy picks the next fetch.
        Returns False if ``_parse_swarm_progress_data`` failed (the last progress is kept)."""
        try:
            progress = self._parse_swarm_progress_data(self._last_metadata)
        except Exception as e:  # (an override's bug): keep the last progress rather than fail the training step
            log_level = logging.DEBUG if self._parse_failure_logged else logging.WARNING
            self._parse_failure_logged = True
            logger.log(log_level, f"{self.name}: _parse_swarm_progress_data failed, progress not updated: {e!r}")
            return False
        if next_fetch_time is not None:
            progress.next_fetch_time = next_fetch_time
        self.global_progress = progress
        return True

    def _wake(self, get_event) -> None:
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop just closed: nothing left to wake
                loop.call_soon_threadsafe(lambda: get_event() is not None and get_event().set())

    # ------------------------------------------------------------------ background thread

    def run(self) -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._main())
        finally:
            loop.close()

    async def _main(self) -> None:
        self._wake_reporter, self._wake_fetcher, self._stop_event = asyncio.Event(), asyncio.Event(), asyncio.Event()
        self._loop = asyncio.get_running_loop()
        if self._stop_requested.is_set():  # shutdown() came before the loop existed
            self._stop_event.set()
        tasks = [asyncio.create_task(self._report_loop()), asyncio.create_task(self._fetch_loop())]
        try:
            await self._stop_event.wait()
        finally:
            self._loop = None
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._publish(None)

    @staticmethod
    async def _wait_event(event: asyncio.Event, timeout: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await await_with_timeout(event.wait(), max(0.0, timeout))
        event.clear()

    def _publish_now(self, timeout: float) -> None:
        """Publish the current record from the caller's thread unless it was already published (bounded wait)."""
        loop = self._loop
        with self._lock:
            record = self.local_progress
        if loop is None or record == self._last_reported:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._report(record), loop).result(timeout)
        except Exception as e:  # a slow DHT or a closing loop: the report loop publishes it later
            logger.debug(f"{self.name} could not publish its progress before pausing: {e!r}")

    async def _report(self, record: LocalTrainingProgress) -> None:
        if await self._publish(record):
            self._last_reported, self._last_report_time = record, get_dht_time()

    async def _report_loop(self) -> None:
        while True:
            with self._lock:
                record, paused = self.local_progress, self._updates_paused
                synchronized = is_synchronized(record.epoch, self.global_progress.epoch)
            refresh_period = min(FORCED_REFRESH_PERIOD, self.metadata_expiration / 2)
            overdue = get_dht_time() - self._last_report_time >= refresh_period and synchronized
            # while paused (e.g. a long averaging round) the record published on entry is still refreshed: a peer
            # waiting for its group must not look gone to the others (a round with no time limit ends when they are)
            changed = record != self._last_reported
            if (changed and not paused) or (overdue and not (changed and paused)):
                await self._report(record)
            await self._wait_event(self._wake_reporter, timeout=refresh_period)

    async def _publish(self, record: Optional[LocalTrainingProgress]) -> bool:
        try:
            stored = await await_with_timeout(
                self.dht.store(
                    self.training_progress_key,
                    subkey=self._local_public_key,
                    value=None if record is None else record.dict(),
                    expiration_time=self.metadata_expiration + get_dht_time(),
                    return_future=True,
                ),
                DHT_CALL_TIMEOUT,
            )
        except Exception as e:
            logger.debug(f"{self.name} could not publish its progress: {e!r}")
            return False
        if not stored:
            logger.debug(f"{self.name}: no DHT peer accepted the progress record {record}")
        return bool(stored)

    async def _fetch_loop(self) -> None:
        while True:
            with self._lock:
                generation = self._generation
            fetch_started = time.monotonic()
            metadata = await self._fetch_metadata()
            records = None if metadata is None else self._parse_records(metadata)
            with self._fetch_finished:
                self._last_fetch_started = fetch_started
                self._fetch_finished.notify_all()
            with self._lock:
                parse_failed = False
                if records is not None and not self._updates_paused and generation == self._generation:
                    self._others, self._last_metadata = records, metadata
                    parse_failed = not self._recompute_global_progress(next_fetch_time=None)
                    if not parse_failed:
                        self.fetched_global_progress_this_epoch.set()
                        self._log_status()
                next_fetch_time = self.global_progress.next_fetch_time
                if records is None:  # the DHT failed: retry soon
                    next_fetch_time = get_dht_time() + self.refresh_policy.min_refresh_period
                elif parse_failed:  # the progress kept may be old, with a next fetch far off: fetch again soon
                    next_fetch_time = get_dht_time() + self.refresh_policy.delay(0.0, num_peers=1)
            await self._wait_event(self._wake_fetcher, timeout=next_fetch_time - get_dht_time())

    async def _fetch_metadata(self) -> Optional[Dict[Any, Any]]:
        """The raw records under the progress key, ``{}`` if there are none (None if the DHT could not be read)."""
        try:
            response = await await_with_timeout(
                self.dht.get(self.training_progress_key, latest=True, return_future=True), DHT_CALL_TIMEOUT
            )
        except Exception as e:
            logger.debug(f"{self.name} could not fetch the swarm's progress: {e!r}")
            return None
        if response is None or not isinstance(response.value, dict):
            return {}
        return response.value

    def _parse_records(self, metadata: Any) -> List[LocalTrainingProgress]:
        """Other peers' valid records in the raw ``metadata`` (malformed ones are skipped)."""
        if not isinstance(metadata, dict):
            return []
        records = []
        for subkey, entry in metadata.items():
            value = getattr(entry, "value", None)
            if subkey == self._local_public_key or value is None:
                continue  # our own record is kept locally; None marks a peer that left
            try:
                record = LocalTrainingProgress.parse_obj(value)
            except (pydantic_v1.ValidationError, TypeError) as e:
                logger.debug(f"{self.name} ignores a malformed progress record: {e!r}")
                continue
            if record.epoch > MAX_EPOCH:  # following it, this peer's own epoch could no longer be published
                logger.debug(f"{self.name} ignores a progress record at an absurd epoch {record.epoch}")
                continue
            records.append(record)
        return records

    def _log_status(self) -> None:
        progress = self.global_progress
        eta = progress.eta_next_epoch - get_dht_time()
        logger.log(
            self.status_loglevel,
            f"{self.prefix}: {progress.samples_accumulated}/{progress.target_batch_size} samples in epoch "
            f"{progress.epoch} from {progress.num_peers} peer(s)"
            + ((", ETA now" if eta <= 0 else f", ETA {eta:.1f} s") if math.isfinite(eta) else ""),
        )
