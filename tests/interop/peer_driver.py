"""A hivemind peer driven by JSON lines on stdin; runs under EITHER implementation (ours or the original 1.1.12).

Started by tests/interop/harness.py as `<python> peer_driver.py` in a neutral working directory. Uses only the public
API that both implementations share, so whichever `hivemind` the interpreter imports is exercised.

Protocol: one JSON object per line. The first line written is {"event": "hello", "version", "file", "python"}.
Requests are {"id": int, "cmd": str, "args": {...}}; each gets {"id", "ok": true, "result": ...} or
{"id", "ok": false, "error_type": str, "error": str}. Python values that JSON cannot carry faithfully (DHT keys,
subkeys, values: bytes, tuples, None) travel as pickle hex strings in fields named "*_pkl"; both ends are the same
CPython, and the harness is the only writer, so this is trusted local data.
"""

import asyncio
import functools
import hashlib
import inspect
import io
import json
import os
import pickle
import random
import sys
import threading
import traceback
from typing import AsyncIterator

# The protocol owns the real stdout; everything else that writes to fd 1 (library prints, child processes) goes to
# stderr, which the harness stores in a log file.
# The protocol's input is read from a raw duplicate of fd 0 without Python's buffered stdin: a thread blocked in
# sys.stdin would hold its lock across the fork of a DHT process, whose multiprocessing bootstrap closes sys.stdin.
_protocol_out = os.fdopen(os.dup(1), "w", buffering=1)
_protocol_in_fd = os.dup(0)
os.dup2(2, 1)
sys.stdout = sys.stderr
_devnull = os.open(os.devnull, os.O_RDONLY)
os.dup2(_devnull, 0)
sys.stdin = open(os.devnull)

import hivemind  # noqa: E402
from hivemind.p2p import P2P, P2PContext, PeerID, ServicerBase  # noqa: E402
from hivemind.proto import runtime_pb2, test_pb2  # noqa: E402
from hivemind.utils import ValueWithExpiration  # noqa: E402

UNARY_NAME = "interop.square"
STREAM_OUT_NAME = "interop.count"
STREAM_INOUT_NAME = "interop.running_sum"
UNARY_DIGEST_NAME = "interop.unary_digest"
STREAM_DIGEST_NAME = "interop.stream_digest"
GENERATE_NAME = "interop.generate"
SERVICER_NAMESPACE = "interop"


async def square(request: test_pb2.TestRequest, context: P2PContext) -> test_pb2.TestResponse:
    if request.number < 0:
        raise ValueError(f"cannot square negative number {request.number}")
    return test_pb2.TestResponse(number=request.number**2)


async def count(request: test_pb2.TestRequest, context: P2PContext) -> AsyncIterator[test_pb2.TestResponse]:
    for i in range(request.number):
        yield test_pb2.TestResponse(number=i)
    if request.number < 0:
        raise ValueError(f"cannot count to negative number {request.number}")


async def running_sum(
    requests: AsyncIterator[test_pb2.TestRequest], context: P2PContext
) -> AsyncIterator[test_pb2.TestResponse]:
    total = 0
    async for request in requests:
        total += request.number
        yield test_pb2.TestResponse(number=total)


def payload(seed: int, size: int) -> bytes:
    """Deterministic test bytes; the test process computes the same with random.Random(seed).randbytes(size)."""
    return random.Random(seed).randbytes(size)


async def unary_digest(request: runtime_pb2.Tensor, context: P2PContext) -> runtime_pb2.Tensor:
    return runtime_pb2.Tensor(buffer=hashlib.sha256(request.buffer).digest(), size=[len(request.buffer)])


async def stream_digest(
    requests: AsyncIterator[runtime_pb2.Tensor], context: P2PContext
) -> AsyncIterator[runtime_pb2.Tensor]:
    digest, total = hashlib.sha256(), 0
    async for request in requests:
        digest.update(request.buffer)
        total += len(request.buffer)
    yield runtime_pb2.Tensor(buffer=digest.digest(), size=[total])


async def generate(request: runtime_pb2.Tensor, context: P2PContext) -> AsyncIterator[runtime_pb2.Tensor]:
    seed, total, chunk = request.size
    data = payload(seed, total)
    for offset in range(0, total, chunk):
        yield runtime_pb2.Tensor(buffer=data[offset : offset + chunk])


class InteropServicer(ServicerBase):
    """Served under "interop::InteropServicer.rpc_*" by both implementations (handle names are the class name)."""

    async def rpc_square(self, request: test_pb2.TestRequest, context: P2PContext) -> test_pb2.TestResponse:
        return await square(request, context)

    async def rpc_count(
        self, request: test_pb2.TestRequest, context: P2PContext
    ) -> AsyncIterator[test_pb2.TestResponse]:
        async for response in count(request, context):
            yield response


async def _aiter(items):
    for item in items:
        yield item


async def _awaited(call_result):
    """Streaming calls return a coroutine resolving to an async iterator, as in the original; tolerate a bare async
    iterator here so that wire tests do not depend on that API detail (cmd_p2p_streaming_call_shapes checks it)."""
    return await call_result if inspect.isawaitable(call_result) else call_result


def _load(hex_string):
    return pickle.loads(bytes.fromhex(hex_string))


def _dump(obj) -> str:
    return pickle.dumps(obj).hex()


def _plain_get_result(result):
    """Converts a DHT.get result into plain Python data (no hivemind classes) for the harness."""
    if result is None:
        return {"found": False}
    value, expiration = result
    if isinstance(value, dict) and value and all(isinstance(v, ValueWithExpiration) for v in value.values()):
        entries = {subkey: (entry.value, entry.expiration_time) for subkey, entry in value.items()}
        return {"found": True, "kind": "dictionary", "value_pkl": _dump(entries), "expiration": expiration}
    return {"found": True, "kind": "regular", "value_pkl": _dump(value), "expiration": expiration}


def _schema_validator(prefix: str):
    """SchemaValidator over a pydantic.v1 model, the kind of schema written for hivemind 1.1.x."""
    from typing import Dict

    from pydantic import v1 as pydantic_v1

    from hivemind.dht.schema import SchemaValidator

    class InteropSchema(pydantic_v1.BaseModel):
        name: pydantic_v1.StrictStr
        counts: Dict[pydantic_v1.StrictStr, pydantic_v1.StrictInt]

    return SchemaValidator(InteropSchema, allow_extra_keys=True, prefix=prefix)


async def _store_numbered_keys(_dht, node, prefix, count, expiration):
    # the keys are made in the DHT process: the original's DHT process fails on a call too large for one pipe read
    keys = [f"{prefix}_{index}" for index in range(count)]
    results = await node.store_many(keys, list(range(count)), expiration)
    return sum(bool(results[key]) for key in keys)


async def _count_numbered_keys(_dht, node, prefix, count):
    from hivemind.dht.routing import DHTID
    from hivemind.utils.serializer import MSGPackSerializer

    held = 0
    for index in range(count):
        item = node.protocol.storage.get(DHTID.generate(source=f"{prefix}_{index}"))
        held += item is not None and MSGPackSerializer.loads(item.value) == index
    return held


class Driver:
    def __init__(self):
        self.p2ps = []
        self.dhts = []
        self.validator = None

    # --- p2p ---
    async def cmd_p2p_create(self, initial_peers=(), host_maddrs=("/ip4/127.0.0.1/tcp/0",), **options):
        p2p = await P2P.create(initial_peers=list(initial_peers) or None, host_maddrs=list(host_maddrs), **options)
        self.p2ps.append(p2p)
        handle = len(self.p2ps) - 1
        maddrs = await self.cmd_p2p_visible_maddrs(handle)
        return {"handle": handle, "peer_id": p2p.peer_id.to_base58(), "maddrs": maddrs}

    async def cmd_p2p_visible_maddrs(self, handle=0, latest=False):
        """The peer's visible maddrs; [] for a peer with none (no_listen=True before it holds a relay slot)."""
        try:
            return [str(m) for m in await self.p2ps[handle].get_visible_maddrs(latest=latest)]
        except ValueError:
            return []

    async def cmd_p2p_identity(self, path, generate=False, start=False):
        """Peer id of an identity file (generated first if `generate`); with `start`, also of a P2P started with it."""
        if generate:
            P2P.generate_identity(path)
        with open(path, "rb") as f:
            result = {"file_peer_id": PeerID.from_identity(f.read()).to_base58()}
        if start:
            p2p = await P2P.create(identity_path=path)
            try:
                result["p2p_peer_id"] = p2p.peer_id.to_base58()
            finally:
                await p2p.shutdown()
        return result

    async def cmd_p2p_serve(self, handle=0):
        p2p = self.p2ps[handle]
        await p2p.add_protobuf_handler(UNARY_NAME, square, test_pb2.TestRequest)
        await p2p.add_protobuf_handler(STREAM_OUT_NAME, count, test_pb2.TestRequest, stream_output=True)
        await p2p.add_protobuf_handler(
            STREAM_INOUT_NAME, running_sum, test_pb2.TestRequest, stream_input=True, stream_output=True
        )
        await p2p.add_protobuf_handler(UNARY_DIGEST_NAME, unary_digest, runtime_pb2.Tensor)
        await p2p.add_protobuf_handler(
            STREAM_DIGEST_NAME, stream_digest, runtime_pb2.Tensor, stream_input=True, stream_output=True
        )
        await p2p.add_protobuf_handler(GENERATE_NAME, generate, runtime_pb2.Tensor, stream_output=True)
        await InteropServicer().add_p2p_handlers(p2p, namespace=SERVICER_NAMESPACE)
        return True

    async def cmd_p2p_call_bytes(self, peer_id, kind, seed, total, chunk=1024**2, handle=0):
        """Moves `total` deterministic bytes to or from peer_id; returns {"digest": sha256 hex, "size", "messages"}."""
        p2p, peer = self.p2ps[handle], PeerID.from_base58(peer_id)
        if kind == "unary":
            request = runtime_pb2.Tensor(buffer=payload(seed, total))
            response = await p2p.call_protobuf_handler(peer, UNARY_DIGEST_NAME, request, runtime_pb2.Tensor)
            return {"digest": response.buffer.hex(), "size": response.size[0], "messages": 1}
        if kind == "stream_in":
            data = payload(seed, total)
            chunks = [runtime_pb2.Tensor(buffer=data[i : i + chunk]) for i in range(0, total, chunk)]
            responses = p2p.iterate_protobuf_handler(peer, STREAM_DIGEST_NAME, _aiter(chunks), runtime_pb2.Tensor)
            (response,) = [response async for response in await _awaited(responses)]
            return {"digest": response.buffer.hex(), "size": response.size[0], "messages": len(chunks)}
        if kind == "stream_out":
            request = runtime_pb2.Tensor(size=[seed, total, chunk])
            responses = p2p.iterate_protobuf_handler(peer, GENERATE_NAME, request, runtime_pb2.Tensor)
            digest, size, messages = hashlib.sha256(), 0, 0
            async for response in await _awaited(responses):
                digest.update(response.buffer)
                size, messages = size + len(response.buffer), messages + 1
            return {"digest": digest.hexdigest(), "size": size, "messages": messages}
        raise ValueError(f"unknown transfer kind {kind!r}")

    async def cmd_p2p_wait_for_peers(self, handle=0, n_peers=1):
        await self.p2ps[handle].wait_for_at_least_n_peers(n_peers)
        return [str(info.peer_id) for info in await self.p2ps[handle].list_peers()]

    async def cmd_p2p_call(self, peer_id, kind, numbers, handle=0, timeout=None):
        """Calls a handler served by cmd_p2p_serve on peer_id; returns the response number(s)."""
        p2p, peer = self.p2ps[handle], PeerID.from_base58(peer_id)
        requests = [test_pb2.TestRequest(number=n) for n in numbers]
        if kind == "unary":
            response = await p2p.call_protobuf_handler(peer, UNARY_NAME, requests[0], test_pb2.TestResponse)
            return response.number
        if kind == "stream_out":
            responses = p2p.iterate_protobuf_handler(peer, STREAM_OUT_NAME, requests[0], test_pb2.TestResponse)
            return [response.number async for response in await _awaited(responses)]
        if kind == "stream_inout":
            responses = p2p.iterate_protobuf_handler(peer, STREAM_INOUT_NAME, _aiter(requests), test_pb2.TestResponse)
            return [response.number async for response in await _awaited(responses)]
        stub = InteropServicer.get_stub(p2p, peer, namespace=SERVICER_NAMESPACE)
        if kind == "stub_unary":
            return (await stub.rpc_square(requests[0], timeout=timeout)).number
        if kind == "stub_stream":
            return [response.number async for response in await _awaited(stub.rpc_count(requests[0]))]
        raise ValueError(f"unknown call kind {kind!r}")

    async def cmd_p2p_streaming_call_shapes(self, peer_id, handle=0):
        """What calling a streaming-output RPC returns, before awaiting: in the original, both are coroutines."""
        p2p, peer = self.p2ps[handle], PeerID.from_base58(peer_id)
        calls = {
            "P2P.iterate_protobuf_handler": p2p.iterate_protobuf_handler(
                peer, STREAM_OUT_NAME, test_pb2.TestRequest(number=1), test_pb2.TestResponse
            ),
            "stub.rpc_count": InteropServicer.get_stub(p2p, peer, namespace=SERVICER_NAMESPACE).rpc_count(
                test_pb2.TestRequest(number=1)
            ),
        }
        shapes = {}
        for name, returned in calls.items():
            shapes[name] = "coroutine" if inspect.iscoroutine(returned) else type(returned).__name__
            async for _ in await _awaited(returned):
                pass
        return shapes

    # --- tensors ---
    async def cmd_tensor_serialize(self, tensor_hex, compression):
        """runtime_pb2.Tensor bytes (hex) of a torch.save-d tensor serialized with CompressionType `compression`."""
        import torch

        from hivemind.compression import serialize_torch_tensor
        from hivemind.proto import runtime_pb2

        tensor = torch.load(io.BytesIO(bytes.fromhex(tensor_hex)))
        message = serialize_torch_tensor(tensor, runtime_pb2.CompressionType.Value(compression))
        return message.SerializeToString().hex()

    async def cmd_tensor_deserialize(self, message_hex):
        """The tensor (torch.save bytes, hex) decoded from runtime_pb2.Tensor bytes."""
        import torch

        from hivemind.compression import deserialize_torch_tensor
        from hivemind.proto import runtime_pb2

        tensor = deserialize_torch_tensor(runtime_pb2.Tensor.FromString(bytes.fromhex(message_hex)))
        buffer = io.BytesIO()
        torch.save(tensor.detach().clone().requires_grad_(tensor.requires_grad), buffer)
        return buffer.getvalue().hex()

    async def cmd_tensor_split(self, message_hex, chunk_size):
        """split_for_streaming of runtime_pb2.Tensor bytes: the parts' bytes, hex."""
        from hivemind.proto import runtime_pb2
        from hivemind.utils.streaming import split_for_streaming

        message = runtime_pb2.Tensor.FromString(bytes.fromhex(message_hex))
        return [part.SerializeToString().hex() for part in split_for_streaming(message, chunk_size)]

    async def cmd_tensor_combine(self, parts_hex):
        """combine_from_streaming of parts (runtime_pb2.Tensor bytes, hex): the whole message, hex."""
        from hivemind.proto import runtime_pb2
        from hivemind.utils.streaming import combine_from_streaming

        parts = [runtime_pb2.Tensor.FromString(bytes.fromhex(part)) for part in parts_hex]
        return combine_from_streaming(parts).SerializeToString().hex()

    # --- dht ---
    def _owner_validator(self):
        from hivemind.dht.crypto import RSASignatureValidator  # DHT names are imported only by DHT commands

        self.validator = self.validator or RSASignatureValidator()
        return self.validator

    async def cmd_dht_create(self, initial_peers=(), client_mode=False, signed=False, schema_prefixes=(), **kwargs):
        from hivemind.dht import DHT

        validators = [self._owner_validator()] if signed else []
        validators += [_schema_validator(prefix) for prefix in schema_prefixes]

        # the DHT process is forked from the main thread; readiness is awaited in a worker thread
        dht = DHT(
            initial_peers=list(initial_peers) or None,
            start=True,
            await_ready=False,
            client_mode=client_mode,
            record_validators=validators,
            host_maddrs=["/ip4/127.0.0.1/tcp/0"],
            **kwargs,
        )
        try:
            await asyncio.get_running_loop().run_in_executor(None, dht.wait_until_ready)
        except BaseException:
            dht.shutdown()
            raise
        self.dhts.append(dht)
        handle = len(self.dhts) - 1
        maddrs = [str(m) for m in await asyncio.get_running_loop().run_in_executor(None, dht.get_visible_maddrs)]
        return {"handle": handle, "peer_id": dht.peer_id.to_base58(), "maddrs": maddrs}

    async def cmd_dht_owner_tag(self):
        """The `[owner:...]` tag of this process's RSASignatureValidator key, as hex bytes."""
        return self._owner_validator().local_public_key.hex()

    async def cmd_dht_store(self, handle, key_pkl, value_pkl, expiration, subkey_pkl=None):
        dht, key, value = self.dhts[handle], _load(key_pkl), _load(value_pkl)
        subkey = None if subkey_pkl is None else _load(subkey_pkl)
        return bool(await dht.store(key, value, expiration, subkey=subkey, return_future=True))

    async def cmd_dht_declare_experts(self, handle, uids, expiration):
        """hivemind.moe.declare_experts of ``uids`` (a list of str) from this DHT; whether every key was stored."""
        from hivemind.moe import declare_experts

        declare = functools.partial(declare_experts, self.dhts[handle], list(uids), expiration, wait=True)
        return all((await asyncio.get_running_loop().run_in_executor(None, declare)).values())

    async def cmd_dht_get(self, handle, key_pkl, latest=False):
        dht, key = self.dhts[handle], _load(key_pkl)
        return _plain_get_result(await dht.get(key, latest=latest, return_future=True))

    async def cmd_dht_store_many(self, handle, prefix, count, expiration):
        """store_many of keys f"{prefix}_{i}" (value i) for i < count in the DHT process; how many were True."""
        call = functools.partial(_store_numbered_keys, prefix=prefix, count=count, expiration=expiration)
        return await self.dhts[handle].run_coroutine(call, return_future=True)

    async def cmd_dht_count_stored(self, handle, prefix, count):
        """How many of the keys f"{prefix}_{i}", i < count, this DHT's own storage holds with value i."""
        call = functools.partial(_count_numbered_keys, prefix=prefix, count=count)
        return await self.dhts[handle].run_coroutine(call, return_future=True)

    async def cmd_dht_shutdown(self, handle):
        await asyncio.get_running_loop().run_in_executor(None, self.dhts[handle].shutdown)
        return True

    async def shutdown(self):
        for dht in self.dhts:
            try:
                await asyncio.get_running_loop().run_in_executor(None, dht.shutdown)
            except Exception as e:
                _log_exception("DHT.shutdown", e)
        for p2p in self.p2ps:
            try:
                await p2p.shutdown()
            except Exception as e:
                _log_exception("P2P.shutdown", e)


def _log_exception(where: str, e: BaseException):
    # tracebacks only for our implementation: the original is a black box whose source we do not read
    if hivemind.__version__ == "1.1.12":
        print(f"driver: {where} failed: {e!r}", file=sys.stderr, flush=True)
    else:
        traceback.print_exc()


def _write(message: dict):
    _protocol_out.write(json.dumps(message) + "\n")
    _protocol_out.flush()


async def _serve_request(driver: Driver, request: dict):
    try:
        method = getattr(driver, "cmd_" + request["cmd"], None)
        if method is None:
            raise ValueError(f"unknown command {request['cmd']!r}")
        result = await method(**request.get("args", {}))
        _write({"id": request["id"], "ok": True, "result": result})
    except BaseException as e:  # noqa: B036 - every failure, incl. cancellation, is reported to the harness
        _log_exception(request["cmd"], e)
        _write({"id": request["id"], "ok": False, "error_type": type(e).__name__, "error": str(e)})


async def main():
    loop = asyncio.get_running_loop()
    lines = asyncio.Queue()

    def read_stdin():
        buffer = b""
        while True:
            chunk = os.read(_protocol_in_fd, 65536)
            if not chunk:
                break
            *complete, buffer = (buffer + chunk).split(b"\n")
            for line in complete:
                loop.call_soon_threadsafe(lines.put_nowait, line.decode())
        loop.call_soon_threadsafe(lines.put_nowait, None)  # EOF: the harness went away

    threading.Thread(target=read_stdin, daemon=True).start()
    _write(
        {
            "event": "hello",
            "version": hivemind.__version__,
            "file": os.path.realpath(hivemind.__file__),
            "python": sys.executable,
            "pid": os.getpid(),
        }
    )
    driver, tasks, shutdown_id = Driver(), set(), None
    while True:
        line = await lines.get()
        if line is None:  # EOF: the harness went away, clean up all the same
            break
        if not line.strip():
            continue
        request = json.loads(line)
        if request["cmd"] == "shutdown":
            shutdown_id = request["id"]
            break
        task = asyncio.ensure_future(_serve_request(driver, request))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    for task in list(tasks):
        task.cancel()
    await driver.shutdown()
    if shutdown_id is not None:
        _write({"id": shutdown_id, "ok": True, "result": True})


if __name__ == "__main__":
    asyncio.run(main())
    sys.stderr.flush()
    os._exit(0)  # do not wait for non-daemon threads or atexit hooks of either library
