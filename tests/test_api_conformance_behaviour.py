"""Documented behaviours of the public API that need no peer: values, shapes and errors, as the reference states
them (the signatures themselves are checked in test_api_conformance_signatures.py)."""

import asyncio
import collections
import concurrent.futures
import dataclasses
import hashlib
import logging

import pydantic.v1 as pydantic_v1
import pytest
import torch

import hivemind
from hivemind.compression import (
    BlockwiseQuantization,
    CompressionInfo,
    Float16Compression,
    NoCompression,
    PerTensorCompression,
    Quantile8BitQuantization,
    RoleAdaptiveCompression,
    ScaledFloat16Compression,
    SizeAdaptiveCompression,
    TensorRole,
    Uniform8BitQuantization,
    deserialize_tensor_stream,
    deserialize_torch_tensor,
    serialize_torch_tensor,
)
from hivemind.dht import DHT, DHTID
from hivemind.moe import ModuleBackend
from hivemind.moe import expert_uid as uids
from hivemind.p2p import PeerID, PeerInfo
from hivemind.proto.runtime_pb2 import CompressionType
from hivemind.utils import MPFuture, MSGPackSerializer, ValueWithExpiration, nested_flatten, nested_map, nested_pack
from hivemind.utils.multiaddr import Multiaddr
from hivemind.utils.streaming import combine_from_streaming, split_for_streaming
from hivemind.utils.tensor_descr import BatchTensorDescriptor

PEER_A = "QmSoLnSGccFuZQJzRadHn95W2CrSFmZuTdDWP8HXaHca9z"
PEER_B = "QmNnooDu7bfjPFoTZYxMNLWUQJyrVwtbZg5gBMjTezGAJN"


def test_version_and_legacy_top_level_aliases():
    assert hivemind.__version__ == "1.2.0.dev0"
    for name in ["get_dht_time", "P2P", "PeerID", "Float16Compression", "MPFuture", "use_hivemind_log_handler"]:
        assert hasattr(hivemind, name), name


@pytest.mark.parametrize("initial_peers", [5, [5]])
def test_dht_refuses_initial_peers_that_are_not_a_sequence_of_addresses(initial_peers):
    with pytest.raises(TypeError):
        DHT(initial_peers=initial_peers, start=False)


def test_dhtid_is_sha1_of_msgpack_or_of_raw_bytes_and_round_trips_through_20_bytes():
    digest = hashlib.sha1(MSGPackSerializer.dumps("abc")).digest()
    assert DHTID.generate("abc") == int.from_bytes(digest, "big")
    assert DHTID.generate(b"abc") == int.from_bytes(hashlib.sha1(b"abc").digest(), "big")
    first, second = DHTID.generate(), DHTID.generate()
    assert first.xor_distance([first, second]) == [0, int(first) ^ int(second)]
    assert DHTID.longest_common_prefix_length(DHTID(0), DHTID(1)) == 159
    raw = first.to_bytes()
    assert len(raw) == 20 and DHTID.from_bytes(raw) == first and isinstance(DHTID.from_bytes(raw), DHTID)


def test_value_with_expiration_behaves_as_a_frozen_pair():
    value = ValueWithExpiration("v", 2.0)
    assert value == ("v", 2.0) and tuple(value) == ("v", 2.0) and value[0] == "v" and value[1] == 2.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        value.value = "other"


def test_peer_id_compares_with_base58_and_bytes_and_orders_by_base58():
    peer = PeerID.from_base58(PEER_A)
    assert peer == PEER_A and peer == peer.to_bytes() and str(peer) == peer.pretty() == peer.to_string() == PEER_A
    assert hash(peer) == hash(PeerID(peer.to_bytes()))
    assert (peer < PeerID.from_base58(PEER_B)) == (PEER_A < PEER_B)
    addrs = [Multiaddr("/ip4/1.2.3.4/tcp/1"), Multiaddr("/ip4/1.2.3.4/tcp/2")]
    assert str(PeerInfo(peer, addrs)) == f"{PEER_A} /ip4/1.2.3.4/tcp/1,/ip4/1.2.3.4/tcp/2"


def test_expert_uid_patterns_and_split():
    assert uids.is_valid_uid("ffn.3.14") and not uids.is_valid_uid("ffn.03") and not uids.is_valid_uid("ffn")
    assert uids.is_valid_prefix("ffn.") and uids.is_valid_prefix("ffn.3.") and not uids.is_valid_prefix("ffn.3")
    assert uids.split_uid("ffn.3.14") == ("ffn.3.", 14) == uids.split_uid("ffn.3.14.")
    assert uids.ExpertInfo._fields == ("uid", "peer_id")


def test_builtin_expert_classes_and_schedulers_are_registered():
    from hivemind.moe.server.layers import name_to_block, name_to_input, schedule_name_to_scheduler

    assert {"ffn", "transformer", "nop", "nop_delay", "det_dropout"} <= set(name_to_block) == set(name_to_input)
    assert set(schedule_name_to_scheduler) == {"linear", "none"} and schedule_name_to_scheduler["none"] is None
    register_as_ffn = hivemind.register_expert_class("ffn", lambda batch_size, hidden: torch.empty(batch_size, hidden))
    with pytest.raises(RuntimeError):
        register_as_ffn(torch.nn.Identity)  # the name is taken


def test_module_backend_schemas_info_and_batches():
    backend = ModuleBackend(
        "expert.0", torch.nn.Linear(4, 3), args_schema=(BatchTensorDescriptor(4),), max_batch_size=8
    )
    assert set(backend.get_info()) == {"forward_schema", "outputs_schema", "keyword_names"}
    assert tuple(backend.outputs_schema.shape) == (None, 3)  # inferred by a dummy forward
    assert backend.forward_schema == (backend.args_schema, backend.kwargs_schema)
    assert backend.backward_schema == (backend.forward_schema, backend.outputs_schema)
    assert backend.grad_inputs_schema == backend.forward_schema
    assert backend.get_pools() == (backend.forward_pool, backend.backward_pool)
    (output,) = backend.forward(torch.randn(2, 4))
    assert output.shape == (2, 3)
    (grad_input,) = backend.backward(torch.randn(2, 4), torch.randn(2, 3))
    assert grad_input.shape == (2, 4)
    with pytest.raises(RuntimeError):
        backend.forward(torch.randn(0, 4))


def test_averaging_enums_and_group_info():
    from hivemind.averaging.allreduce import AveragingMode
    from hivemind.averaging.control import AveragingStage
    from hivemind.averaging.group_info import GroupInfo

    stages = ["IDLE", "LOOKING_FOR_GROUP", "AWAITING_TRIGGER", "RUNNING_ALLREDUCE", "FINISHED"]
    assert [(stage.name, stage.value) for stage in AveragingStage] == list(zip(stages, range(5)))
    assert [(mode.name, mode.value) for mode in AveragingMode] == [("NODE", 0), ("CLIENT", 1), ("AUX", 2)]
    assert [field.name for field in dataclasses.fields(GroupInfo)] == ["group_id", "peer_ids", "gathered"]
    assert GroupInfo(b"id", (PEER_A, PEER_B), (b"", b"")).group_size == 2


def test_load_balancing_and_schema_hash_shapes():
    from hivemind.averaging.averager import compute_schema_hash
    from hivemind.averaging.load_balancing import load_balance_peers

    for bandwidths in [(None, None, None), (1.0, 2.0, 0)]:
        split = load_balance_peers(100, bandwidths)
        assert isinstance(split, tuple) and sum(split) == 100 and all(isinstance(size, int) for size in split)
    assert load_balance_peers(100, (1.0, 2.0, 0))[2] == 0  # bandwidth 0: reduces nothing
    schema_hash = compute_schema_hash([torch.zeros(3)])
    assert isinstance(schema_hash, bytes) and len(schema_hash) == 20


def test_averager_exposes_its_matchmaking_settings_to_subclasses():
    # subclasses (OpenDiLoCo's gradient averager) size their waits by matchmaking_kwargs["min_matchmaking_time"]
    class OfflineDHT:
        client_mode = False

    averager = hivemind.DecentralizedAverager(
        [torch.zeros(3)], OfflineDHT(), start=False, prefix="run", min_matchmaking_time=7.0, target_group_size=4
    )
    settings = averager.matchmaking_kwargs
    assert settings["min_matchmaking_time"] == 7.0 and settings["target_group_size"] == 4
    assert settings["min_group_size"] == 2 and settings["request_timeout"] == 3.0 and settings["prefix"] == "run"
    settings["min_matchmaking_time"] = 0.0
    assert averager.matchmaking_kwargs["min_matchmaking_time"] == 7.0


@pytest.mark.parametrize(
    "codec, code",
    [
        (NoCompression, 0),
        (ScaledFloat16Compression, 1),
        (Float16Compression, 2),
        (Quantile8BitQuantization, 3),
        (Uniform8BitQuantization, 4),
        (BlockwiseQuantization, 5),
    ],
)
def test_each_codec_declares_its_compression_type(codec, code):
    assert codec().compression_type == code == list(CompressionType.values())[code]


def test_compression_info_and_ratios():
    assert [(role.name, role.value) for role in TensorRole][0] == ("ACTIVATION", 1)
    assert TensorRole.UNSPECIFIED.value == 5
    info = CompressionInfo.from_tensor(torch.randn(10, 5), key="k")
    assert (info.key, info.role, info.part_index, info.part_size) == ("k", TensorRole.UNSPECIFIED, 0, None)
    part = info.get_part(2, 7)
    assert (part.key, part.part_index, part.part_size) == ("k", 2, 7)
    assert NoCompression().estimate_compression_ratio(info) == 1.0
    assert Float16Compression().estimate_compression_ratio(info) == 0.5


@pytest.mark.parametrize("tensor", [torch.arange(5), torch.ones(5, dtype=torch.bfloat16)])
def test_float16_refuses_integer_and_bfloat16_tensors(tensor):
    with pytest.raises(ValueError):
        Float16Compression().compress(tensor, CompressionInfo.from_tensor(tensor))


def test_serialization_clamps_to_float16_range_and_restores_requires_grad():
    clamped = deserialize_torch_tensor(serialize_torch_tensor(torch.tensor([1e6, -1e6]), CompressionType.FLOAT16))
    assert clamped.tolist() == [65504.0, -65504.0]
    restored = deserialize_torch_tensor(serialize_torch_tensor(torch.randn(3, requires_grad=True)))
    assert restored.requires_grad


def test_adaptive_codecs_pick_by_size_role_and_key():
    tensor = torch.randn(10, 5)

    def code(codec, sample=tensor, **info):
        return codec.compress(sample, CompressionInfo.from_tensor(sample, **info)).compression

    by_size = SizeAdaptiveCompression(threshold=10, less=NoCompression(), greater_equal=Float16Compression())
    assert code(by_size, torch.randn(10)) == CompressionType.FLOAT16 and code(by_size, torch.randn(9)) == 0
    by_role = RoleAdaptiveCompression(gradient=Float16Compression())
    assert code(by_role, role=TensorRole.GRADIENT) == 2 and code(by_role, role=TensorRole.PARAMETER) == 0
    assert code(PerTensorCompression([NoCompression(), Float16Compression()]), key=1) == 2
    assert code(PerTensorCompression({"a": Float16Compression()}), key="a") == 2


def test_streaming_split_combine_and_tensor_stream_reassembly():
    big, small = torch.randn(100_000), torch.randn(3)
    parts = list(split_for_streaming(serialize_torch_tensor(big), 2**16))
    assert len(parts) > 1 and torch.equal(deserialize_torch_tensor(combine_from_streaming(parts)), big)

    async def stream():
        for part in parts:
            yield [part]
        for part in split_for_streaming(serialize_torch_tensor(small)):
            yield [part]

    first, second = asyncio.run(deserialize_tensor_stream(stream()))
    assert torch.equal(first, big) and torch.equal(second, small)


def test_nested_structures_iterate_dicts_by_sorted_key_and_keep_namedtuples():
    Pair = collections.namedtuple("Pair", "p q")
    assert list(nested_flatten({"b": 1, "a": [2, (3,)]})) == [2, 3, 1]
    packed = nested_pack([1, 2, 3], {"b": Pair(0, 0), "a": [0]})
    assert packed == {"a": [1], "b": Pair(2, 3)} and type(packed["b"]) is Pair
    assert nested_map(lambda x, y: x + y, {"a": (1, 2)}, {"a": (10, 20)}) == {"a": (11, 22)}


def test_batch_tensor_descriptor_has_a_free_batch_dimension():
    descriptor = BatchTensorDescriptor(5)
    assert tuple(descriptor.shape) == (None, 5) and descriptor.make_zeros(3).shape == (3, 5)
    assert BatchTensorDescriptor.from_tensor(torch.randn(2, 5), compression=2).compression == 2
    assert BatchTensorDescriptor.from_tensor(torch.arange(4), compression=2).compression == 0  # floating only


def test_logging_helpers():
    from hivemind.utils.logging import HandlerMode, golog_level_to_python, python_level_to_golog

    assert {mode.name.lower() for mode in HandlerMode} >= {"nowhere", "in_hivemind", "in_root_logger"}
    assert isinstance(hivemind.utils.get_logger("x"), logging.Logger)
    assert golog_level_to_python("ERROR") == logging.ERROR and python_level_to_golog(logging.ERROR) == "ERROR"


def test_rsa_keys_sign_in_base64_and_export_openssh_public_keys():
    from hivemind.utils.crypto import RSAPrivateKey

    key = RSAPrivateKey.process_wide()
    assert RSAPrivateKey.process_wide() is key
    signature = key.sign(b"data")
    assert key.get_public_key().verify(b"data", signature) and not key.get_public_key().verify(b"other", signature)
    assert key.get_public_key().to_bytes().startswith(b"ssh-rsa ")
    assert RSAPrivateKey.from_bytes(key.to_bytes()).to_bytes() == key.to_bytes()


def test_mpfuture_refuses_a_second_result_and_can_be_awaited():
    future = MPFuture()
    future.set_result(1)
    with pytest.raises(concurrent.futures.InvalidStateError):
        future.set_result(2)

    async def wait():
        return await future

    assert asyncio.run(wait()) == 1


def test_progress_records_are_strict_pydantic_v1_models():
    from hivemind.optim.progress_tracker import GlobalTrainingProgress, LocalTrainingProgress

    assert [field.name for field in dataclasses.fields(GlobalTrainingProgress)] == [
        "epoch", "samples_accumulated", "target_batch_size", "num_peers", "num_clients", "eta_next_epoch",
        "next_fetch_time",
    ]  # fmt: skip
    fields = ["peer_id", "epoch", "samples_accumulated", "samples_per_second", "time", "client_mode"]
    assert list(LocalTrainingProgress.__fields__) == fields
    valid = dict(peer_id=b"x", epoch=0, samples_accumulated=0, samples_per_second=0.0, time=1.0, client_mode=False)
    LocalTrainingProgress(**valid)
    for change in [dict(epoch=-1), dict(epoch="1")]:
        with pytest.raises(pydantic_v1.ValidationError):
            LocalTrainingProgress(**{**valid, **change})


DHT_FLAGS = {  # flag: (destination, default when not given)
    "--initial_peers": ("initial_peers", None),
    "--host_maddrs": ("host_maddrs", ["/ip4/0.0.0.0/tcp/0"]),
    "--announce_maddrs": ("announce_maddrs", None),
    "--use_ipfs": ("use_ipfs", False),
    "--identity_path": ("identity_path", None),
    "--no_relay": ("use_relay", True),
    "--use_auto_relay": ("use_auto_relay", False),
    "--refresh_period": ("refresh_period", 30),
}
SERVER_FLAGS = {
    "--config": ("config", None),
    "--num_experts": ("num_experts", None),
    "--expert_pattern": ("expert_pattern", None),
    "--expert_uids": ("expert_uids", None),
    "--expert_cls": ("expert_cls", "ffn"),
    "--hidden_dim": ("hidden_dim", 1024),
    "--host_maddrs": ("host_maddrs", ["/ip4/0.0.0.0/tcp/0"]),
    "--announce_maddrs": ("announce_maddrs", None),
    "--no_relay": ("use_relay", True),
    "--use_auto_relay": ("use_auto_relay", False),
    "--num_handlers": ("num_handlers", None),
    "--min_batch_size": ("min_batch_size", 1),
    "--max_batch_size": ("max_batch_size", 16384),
    "--device": ("device", ...),  # resolved to cuda when available, else cpu
    "--optimizer": ("optimizer", "adam"),
    "--scheduler": ("scheduler", "none"),
    "--num_warmup_steps": ("num_warmup_steps", None),
    "--num_training_steps": ("num_training_steps", None),
    "--update_period": ("update_period", 30),
    "--expiration": ("expiration", None),
    "--clip_grad_norm": ("clip_grad_norm", None),
    "--initial_peers": ("initial_peers", []),
    "--increase_file_limit": ("increase_file_limit", False),
    "--compression": ("compression", "NONE"),
    "--checkpoint_dir": ("checkpoint_dir", None),
    "--stats_report_interval": ("stats_report_interval", None),
    "--custom_module_path": ("custom_module_path", None),
    "--identity_path": ("identity_path", None),
}


@pytest.mark.parametrize("tool, flags", [("run_dht", DHT_FLAGS), ("run_server", SERVER_FLAGS)])
def test_command_line_tools_take_the_documented_flags_and_defaults(tool, flags, tmp_path, monkeypatch):
    import importlib

    monkeypatch.chdir(tmp_path)  # no config.yml here
    parser = importlib.import_module(f"hivemind.hivemind_cli.{tool}").make_parser()
    destinations = {option: action.dest for action in parser._actions for option in action.option_strings}
    defaults = vars(parser.parse_args([]))
    for flag, (destination, default) in flags.items():
        assert destinations.get(flag) == destination, flag
        assert default is ... or defaults[destination] == default, flag
    assert set(destinations) - set(flags) <= {"-h", "--help", "-c"}, "undocumented flags"


def test_servicer_stubs_refuse_timeouts_on_streams_and_methods_without_context():
    from typing import AsyncIterator

    from hivemind.p2p import P2PContext, ServicerBase, StubBase
    from hivemind.proto import test_pb2

    class Streaming(ServicerBase):
        async def rpc_stream(
            self, request: test_pb2.TestRequest, context: P2PContext
        ) -> AsyncIterator[test_pb2.TestResponse]:
            yield test_pb2.TestResponse()

    class NoContext(ServicerBase):
        async def rpc_square(self, request: test_pb2.TestRequest) -> test_pb2.TestResponse: ...

    stub = Streaming.get_stub(object(), PeerID.from_base58(PEER_A))
    assert isinstance(stub, StubBase)
    with pytest.raises(ValueError):
        asyncio.run(stub.rpc_stream(test_pb2.TestRequest(), timeout=1.0))
    with pytest.raises(ValueError):
        NoContext.get_stub(object(), PeerID.from_base58(PEER_A))


def test_p2p_refuses_port_zero_announcements_and_initial_peers_with_ipfs():
    from hivemind.p2p import P2P

    with pytest.raises(ValueError):
        asyncio.run(P2P.create(announce_maddrs=["/ip4/1.2.3.4/tcp/0"]))
    with pytest.raises(AssertionError):
        asyncio.run(P2P.create(initial_peers=[f"/ip4/1.2.3.4/tcp/5/p2p/{PEER_A}"], use_ipfs=True))


def test_dictionary_values_and_batch_descriptors_use_their_msgpack_extension_codes():
    import msgpack

    from hivemind.dht.storage import DictionaryDHTValue

    def extension_code(value):
        return msgpack.unpackb(MSGPackSerializer.dumps(value), ext_hook=lambda code, data: code)

    dictionary = DictionaryDHTValue()
    dictionary.store("subkey", b"value", 1e10)
    assert extension_code(dictionary) == 0x50 and extension_code(BatchTensorDescriptor(3)) == 0x51


def test_dht_node_refuses_p2p_options_next_to_an_existing_p2p():
    from hivemind.dht import DHTNode

    with pytest.raises(ValueError):
        asyncio.run(DHTNode.create(p2p=object(), host_maddrs=["/ip4/127.0.0.1/tcp/0"]))
