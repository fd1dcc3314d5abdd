"""DHT: the node in a background process, driven through the future-based API."""

import asyncio
import concurrent.futures
import functools
import multiprocessing
import threading
import time

import psutil
import pydantic
import pytest

from hivemind.dht import DHT, DHTNode
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.process_channel import ChannelClosedError
from hivemind.dht.schema import SchemaValidator
from hivemind.p2p import P2P
from hivemind.utils.mpfuture import MPFuture
from hivemind.utils.timed_storage import ValueWithExpiration, get_dht_time

_cancelled_in_dht_process = []
SIZES = [32 * 2**20, 10, 3 * 2**20 + 1]  # far beyond a socket buffer, small, odd


class CounterSchema(pydantic.BaseModel):
    counter: pydantic.StrictInt  # module state: changed by run_coroutine only inside the DHT process


async def count_routing_table(dht: DHT, node: DHTNode) -> int:
    return len(node.protocol.routing_table)


async def modify_module_state(dht: DHT, node: DHTNode) -> int:
    _cancelled_in_dht_process.append("modified")
    return len(_cancelled_in_dht_process)


async def sleep_until_cancelled(dht: DHT, node: DHTNode) -> None:
    try:
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        _cancelled_in_dht_process.append("cancelled")
        raise


async def was_cancelled(dht: DHT, node: DHTNode) -> bool:
    return "cancelled" in _cancelled_in_dht_process


async def call_dht_from_inside(dht: DHT, node: DHTNode) -> None:
    dht.get("key")


async def raise_value_error(dht: DHT, node: DHTNode) -> None:
    raise ValueError("raised inside the DHT process")


def _refuse_to_load():
    raise ValueError("this object cannot be loaded in the DHT process")


class LoadsOnlyInTheCaller:
    """Pickles fine, but unpickling it fails: stands for e.g. a function defined after the DHT process was forked."""

    def __reduce__(self):
        return _refuse_to_load, ()


@pytest.fixture(scope="module")
def dht_pair():
    first = DHT(start=True)
    second = DHT(initial_peers=first.get_visible_maddrs(), start=True)
    yield first, second
    second.shutdown()
    first.shutdown()


@pytest.mark.timeout(30)
def test_store_in_one_process_get_in_another(dht_pair):
    first, second = dht_pair
    expiration = get_dht_time() + 60
    assert first.store("process_key", ("a", 1), expiration)
    assert second.get("process_key") == ValueWithExpiration(("a", 1), expiration)
    assert first.store("process_dict", 5, expiration, subkey="sub")
    assert second.get("process_dict", latest=True).value == {"sub": ValueWithExpiration(5, expiration)}
    assert second.get("process_missing") is None


@pytest.mark.timeout(30)
def test_return_future_gives_mpfuture_that_can_be_awaited(dht_pair):
    first, second = dht_pair
    expiration = get_dht_time() + 60
    store_future = first.store("future_key", 7, expiration, return_future=True)
    assert isinstance(store_future, MPFuture) and store_future.result(timeout=10) is True
    get_future = second.get("future_key", return_future=True)
    assert isinstance(get_future, MPFuture)

    async def await_it():
        return await get_future

    assert asyncio.run(await_it()) == (7, expiration)


@pytest.mark.timeout(30)
def test_run_coroutine_returns_result_but_state_stays_in_dht_process(dht_pair):
    first, _ = dht_pair
    assert first.run_coroutine(count_routing_table) == 1
    assert first.run_coroutine(modify_module_state) >= 1
    assert _cancelled_in_dht_process == []
    with pytest.raises(ValueError, match="raised inside the DHT process"):
        first.run_coroutine(raise_value_error)


@pytest.mark.timeout(30)
def test_request_the_dht_process_cannot_load_fails_instead_of_hanging(dht_pair):
    first, _ = dht_pair
    with pytest.raises(RuntimeError, match="cannot be loaded in the DHT process"):
        first.store("unloadable", LoadsOnlyInTheCaller(), get_dht_time() + 30)
    assert first.store("loadable", 1, get_dht_time() + 30)  # the channel keeps working


@pytest.mark.timeout(30)
def test_cancelling_run_coroutine_future_cancels_the_task(dht_pair):
    first, _ = dht_pair
    future = first.run_coroutine(sleep_until_cancelled, return_future=True)
    time.sleep(0.2)
    assert future.cancel()
    deadline = time.monotonic() + 5
    while not first.run_coroutine(was_cancelled):
        assert time.monotonic() < deadline, "the coroutine in the DHT process was not cancelled"
        time.sleep(0.05)


@pytest.mark.timeout(30)
def test_calling_dht_from_inside_its_process_is_refused(dht_pair):
    first, _ = dht_pair
    with pytest.raises(AssertionError, match="deadlock"):
        first.run_coroutine(call_dht_from_inside)


@pytest.mark.timeout(30)
def test_peer_id_maddrs_and_client_mode(dht_pair):
    first, second = dht_pair
    assert first.peer_id != second.peer_id
    maddrs = first.get_visible_maddrs()
    assert maddrs and all(str(maddr).endswith(f"/p2p/{first.peer_id}") for maddr in maddrs)
    assert first.client_mode is False


@pytest.mark.timeout(30)
def test_concurrent_calls_from_threads(dht_pair):
    first, second = dht_pair
    expiration = get_dht_time() + 60
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        stored = list(pool.map(lambda i: first.store(f"threaded_{i}", i, expiration), range(40)))
        found = list(pool.map(lambda i: second.get(f"threaded_{i}"), range(40)))
    assert all(stored) and [item.value for item in found] == list(range(40))


@pytest.mark.timeout(30)
def test_replicate_p2p_binds_to_the_dht_daemon(dht_pair):
    first, _ = dht_pair

    async def replicate():
        p2p = await first.replicate_p2p()
        return p2p.peer_id, await first.replicate_p2p() is p2p

    peer_id, cached = asyncio.run(replicate())
    assert peer_id == first.peer_id and cached


@pytest.mark.timeout(60)
@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_context_manager_works_with_both_start_methods_and_leaves_no_process(start_method):
    with DHT(start=True, start_method=start_method, record_validators=[RSASignatureValidator()]) as dht:
        assert dht.store("key", "value", get_dht_time() + 60)
        assert dht.get("key").value == "value"
        children = psutil.Process(dht.pid).children(recursive=True)
        assert any("p2pd" in child.name() for child in children)
    assert not dht.is_alive()
    psutil.wait_procs(children, timeout=5)
    assert not any(child.is_running() and child.status() != psutil.STATUS_ZOMBIE for child in children)


@pytest.mark.timeout(30)
def test_startup_error_is_raised_in_the_creating_process():
    with pytest.raises(ValueError, match="/p2p/"):
        DHT(start=True, initial_peers=["/ip4/127.0.0.1/tcp/1"])


@pytest.mark.timeout(30)
def test_initial_peers_of_wrong_type_raise_type_error():
    with pytest.raises(TypeError):
        DHT(start=False, initial_peers=[1, 2])


@pytest.mark.timeout(30)
def test_add_validators_before_start_raises():
    dht = DHT(start=False)
    with pytest.raises(RuntimeError):
        dht.add_validators([RSASignatureValidator()])


@pytest.mark.timeout(30)
def test_shutdown_fails_pending_calls_and_is_idempotent():
    dht = DHT(start=True)
    pid = dht.pid
    dht.shutdown()
    dht.shutdown()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    with pytest.raises(ChannelClosedError):
        dht.get("anything")


@pytest.mark.timeout(30)
def test_validators_added_after_start_reject_wrong_types(dht_pair):
    first, second = dht_pair
    for dht in (first, second):
        dht.add_validators([SchemaValidator(CounterSchema, prefix="process")])
    expiration = get_dht_time() + 60
    assert not first.store("process_counter", 3.0, expiration)  # a float is not coerced to a strict int
    assert first.store("process_counter", 3, expiration)
    assert second.get("process_counter") == (3, expiration)
    assert first.store("process_unrelated", 3.0, expiration)  # keys outside the schema are allowed


@pytest.mark.timeout(30)
def test_dht_attaches_to_an_existing_p2p_and_leaves_it_running():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    p2p = asyncio.run_coroutine_threadsafe(P2P.create(), loop).result(timeout=20)
    try:
        with DHT(start=True, p2p=p2p) as dht:
            assert dht.peer_id == p2p.peer_id
            assert dht.store("attached", 1, get_dht_time() + 60) and dht.get("attached").value == 1
        assert p2p.is_alive  # the DHT did not own the daemon
    finally:
        asyncio.run_coroutine_threadsafe(p2p.shutdown(), loop).result(timeout=20)
        loop.call_soon_threadsafe(loop.stop)
        thread.join()


def use_dht_from_worker(dht: DHT, key: str, results) -> None:
    """Runs in a worker process that received a copy of the DHT object (by fork or by pickling for spawn)."""

    async def replicate_peer_id():
        return (await dht.replicate_p2p()).peer_id

    try:
        stored = dht.store(key, "from worker", get_dht_time() + 60)
        found = dht.get(key)
        results.put((stored, found.value, asyncio.run(replicate_peer_id()) == dht.peer_id))
    except BaseException as e:
        results.put(repr(e))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_worker_processes_can_use_the_dht(dht_pair, start_method):
    first, second = dht_pair
    context = multiprocessing.get_context(start_method)
    results = context.Queue()
    worker = context.Process(target=use_dht_from_worker, args=(first, f"worker_{start_method}", results))
    worker.start()
    assert results.get(timeout=30) == (True, "from worker", True)
    worker.join(timeout=10)
    assert worker.exitcode == 0
    assert second.get(f"worker_{start_method}").value == "from worker"


@pytest.mark.timeout(30)
def test_start_then_wait_until_ready():
    dht = DHT(start=False)
    dht.start()
    dht.wait_until_ready(timeout=20)
    assert dht.store("started", True, get_dht_time() + 60) and dht.get("started").value is True
    dht.shutdown()
    assert not dht.is_alive()


async def large_result(dht: DHT, node: DHTNode, size: int) -> bytes:
    return b"x" * size


@pytest.mark.timeout(60)
def test_results_larger_than_the_pipe_buffer_arrive_and_the_channel_keeps_working(dht_pair):
    first, _ = dht_pair
    futures = [first.run_coroutine(functools.partial(large_result, size=size), return_future=True) for size in SIZES]
    for size, future in zip(SIZES, futures):
        assert future.result(timeout=30) == b"x" * size
    assert first.run_coroutine(count_routing_table) >= 1
