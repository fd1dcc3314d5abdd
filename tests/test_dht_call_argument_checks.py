"""DHT.store and DHT.run_coroutine refuse arguments that cannot work, instead of a silent False or a pickling error."""

import math

import numpy as np
import pytest

from hivemind.dht import DHT
from hivemind.utils.timed_storage import get_dht_time


@pytest.fixture(scope="module")
def lone_dht():
    with DHT(start=True) as dht:
        yield dht


async def _answer(dht, node):
    return 42


async def store_without_time(dht, node):
    await node.store_many(["a", "b"], [1, 2], expiration_time=None)


@pytest.mark.parametrize(
    "expiration_time, error",
    [(None, TypeError), ("60", TypeError), (True, TypeError), (math.nan, ValueError)],
    ids=["None", "str", "bool", "nan"],
)
def test_store_refuses_an_expiration_time_that_is_not_a_time(lone_dht, expiration_time, error):
    # before: store() returned False, as for a record that was merely outdated, and said nothing
    with pytest.raises(error, match=r"expiration_time must be an absolute DHT time.*get_dht_time\(\) \+"):
        lone_dht.store("key", "value", expiration_time)
    with pytest.raises(error, match="expiration_time must be an absolute DHT time"):
        lone_dht.store("key", "value", expiration_time, subkey="subkey")


def test_store_accepts_times_of_any_real_type(lone_dht):
    times = [get_dht_time() + 30, np.float64(get_dht_time() + 30), int(get_dht_time() + 30), math.inf]
    for index, expiration_time in enumerate(times):
        assert lone_dht.store(f"real-{index}", index, expiration_time)
        assert lone_dht.get(f"real-{index}").value == index


def test_run_coroutine_refuses_a_coroutine_object_and_non_callables(lone_dht):
    coroutine = _answer(lone_dht, None)
    try:
        with pytest.raises(TypeError, match=r"pass the async function itself.*coro\(dht, node\)"):
            lone_dht.run_coroutine(coroutine)
    finally:
        coroutine.close()
    with pytest.raises(TypeError, match="coro must be an async function"):
        lone_dht.run_coroutine(None)
    assert lone_dht.run_coroutine(_answer) == 42


def test_a_none_key_is_refused(lone_dht):
    # None hashed to a random DHT id: store() said True, and no get() could ever find the value
    with pytest.raises(TypeError, match="a DHT key cannot be None"):
        lone_dht.store(None, "value", get_dht_time() + 30)
    with pytest.raises(TypeError, match="a DHT key cannot be None"):
        lone_dht.get(None)


def test_store_many_refuses_a_none_expiration_time_for_all_keys(lone_dht):
    # declare_experts(dht, uids, None) and the like failed with "object of type 'NoneType' has no len()"
    with pytest.raises(TypeError, match=r"expiration_time must be an absolute DHT time.*get_dht_time\(\) \+"):
        lone_dht.run_coroutine(store_without_time)


def test_a_single_validator_or_a_validator_class_is_refused_with_what_to_pass(lone_dht):
    from hivemind.dht.crypto import RSASignatureValidator

    # before: "'RSASignatureValidator' object is not iterable" and "expected a RecordValidatorBase, got ABCMeta"
    with pytest.raises(TypeError, match=r"record_validators must be a list of validators.*\[validator\]"):
        DHT(start=False, record_validators=RSASignatureValidator())
    with pytest.raises(TypeError, match=r"record_validators must be a list of validators.*\[validator\]"):
        lone_dht.add_validators(RSASignatureValidator())
    with pytest.raises(TypeError, match=r"class RSASignatureValidator: pass an instance, RSASignatureValidator\(\)"):
        DHT(start=False, record_validators=[RSASignatureValidator])
