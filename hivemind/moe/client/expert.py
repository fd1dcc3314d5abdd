"""RemoteExpert: a torch module whose forward and backward run on an expert server, through the network."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn

from hivemind.dht import DHT
from hivemind.moe.client.expert_rpc import (
    ConnectionHandler,
    call_expert,
    expected_output_bytes,
    malformed_answer,
    parse_expert_info,
    raw_size_of,
    response_size_limit,
    serialize_inputs,
    shorten,
)
from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
from hivemind.moe.expert_uid import ExpertInfo
from hivemind.p2p import P2P, P2PDaemonError, P2PHandlerError, PeerID, StubBase
from hivemind.p2p.call_arguments import check_peer_id
from hivemind.proto import runtime_pb2
from hivemind.utils.nested import nested_compare, nested_flatten, nested_pack

__all__ = ["RemoteExpert", "create_remote_experts", "batch_create_remote_experts", "get_server_stub", "DUMMY"]

# an empty tensor that requires grad: passed to autograd functions so that backward runs even when no input does
DUMMY = torch.empty(0, requires_grad=True)


def get_server_stub(p2p: P2P, server_peer_id: PeerID) -> StubBase:
    """A stub that calls the expert RPCs (rpc_info, rpc_forward, rpc_backward, ...) of the given server."""
    return ConnectionHandler.get_stub(p2p, server_peer_id)


class RemoteExpert(nn.Module):
    """Calls one expert hosted on a remote server as if it were a local module (with autograd).

    :param expert_info: the expert's uid and the peer id of its server
    :param p2p: a P2P instance of this process (e.g. ``await dht.replicate_p2p()``)

    There is no timeout of its own: a call waits until the server answers or the connection fails.
    """

    def __init__(self, expert_info: ExpertInfo, p2p: P2P):
        if not isinstance(expert_info, ExpertInfo):
            raise TypeError(
                f"expert_info must be an ExpertInfo(uid, peer_id), got {type(expert_info).__name__} {expert_info!r} "
                f"(to find experts by uid, use hivemind.moe.get_experts(dht, uids))"
            )
        check_peer_id(expert_info.peer_id)
        if not isinstance(p2p, P2P):
            what = type(p2p).__name__
            raise TypeError(f"p2p must be a hivemind.p2p.P2P (e.g. await dht.replicate_p2p()), got {what}")
        super().__init__()
        self._location, self.p2p = expert_info, p2p
        self._stub = get_server_stub(p2p, expert_info.peer_id)
        self._rpc_info: Optional[dict] = None
        self._pid = os.getpid()  # the process whose connection to p2pd self.p2p is

    @property
    def uid(self) -> str:
        return self._location.uid

    @property
    def peer_id(self) -> PeerID:
        return self._location.peer_id

    @property
    def stub(self) -> StubBase:
        if self._pid != os.getpid():
            # a forked child (e.g. a DataLoader worker) inherited this expert: the parent's connection to p2pd is not
            # usable here (its event loop does not run in this process), so calls go through a replica of this one
            self.p2p = _replica_for_this_process(str(self.p2p.daemon_listen_maddr))
            self._stub, self._pid = get_server_stub(self.p2p, self.peer_id), os.getpid()
        return self._stub

    @property
    def info(self) -> Dict[str, Any]:
        """The expert's schemas, fetched from its server on first use and cached."""
        if self._rpc_info is None:
            try:
                response = RemoteExpertWorker.run_coroutine(self.stub.rpc_info(runtime_pb2.ExpertUID(uid=self.uid)))
            except P2PDaemonError as e:  # the same type (callers tell network failures by it), saying which and why
                what = f"cannot get the schema of expert {self.uid!r} from {self.peer_id}"
                raise type(e)(f"{what}: {e}{_hint(e)}") from e
            except P2PHandlerError as e:  # the server's error text (a hostile one can make it megabytes long)
                what = f"cannot get the schema of expert {self.uid!r} from {self.peer_id}"
                raise P2PHandlerError(f"{what}: {shorten(str(e))}") from None
            self._rpc_info = parse_expert_info(response.serialized_info)
        return self._rpc_info

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> Any:
        """Run the expert on the server; inputs are sent from CPU, outputs come back as CPU tensors."""
        info = self.info
        assert set(kwargs) == set(info["keyword_names"]), (
            f"{self.uid} expects keyword arguments {info['keyword_names']}, got {tuple(kwargs)}"
        )
        kwargs = {key: kwargs[key] for key in info["keyword_names"]}
        forward_inputs = (args, kwargs)
        if not nested_compare(forward_inputs, info["forward_schema"]):
            raise TypeError(
                f"{self.uid} expects inputs structured as {info['forward_schema']}, got "
                f"{len(args)} positional and {len(kwargs)} keyword tensors that do not match"
            )
        flat_inputs = tuple(nested_flatten(forward_inputs))
        for index, tensor in enumerate(flat_inputs):
            if isinstance(tensor, torch.Tensor) and tensor.dim() == 0:
                raise TypeError(
                    f"{self.uid}: input #{index} is a 0-d tensor, but experts take batches: add a batch dimension "
                    f"(tensor[None])"
                )
        flat_outputs = _RemoteModuleCall.apply(DUMMY, self.uid, self.stub, info, *flat_inputs)
        return nested_pack(flat_outputs, structure=info["outputs_schema"])

    def extra_repr(self) -> str:
        return f"uid={self.uid}, peer_id={self.peer_id}"

    def __reduce__(self):
        """Pickled as its uid, peer id, cached info and the control socket of this process's p2pd: another process on
        this machine (e.g. a DataLoader worker) calls the expert through that same daemon while it runs."""
        daemon = str(self.p2p.daemon_listen_maddr)
        return _unpickle_remote_expert, (self._location, daemon, self._rpc_info)


_replicas: Dict[tuple, P2P] = {}  # (pid, daemon socket) -> the P2P that unpickled experts of this process share


def _hint(error: P2PDaemonError) -> str:
    if "protocols not supported" in str(error):
        return " (that peer serves no experts: is an expert server running there?)"
    if "failed to find any peer in table" in str(error) or "routing: not found" in str(error):
        return " (this DHT does not know how to reach that peer: it is down, or not in this swarm)"
    return ""


def _replica_for_this_process(daemon_listen_maddr: str) -> P2P:
    """The P2P of this process bound to the given daemon, shared by all experts that use it here."""
    key = (os.getpid(), daemon_listen_maddr)
    if key not in _replicas:
        with _replicas_lock:
            if key not in _replicas:
                _replicas[key] = RemoteExpertWorker.run_coroutine(P2P.replicate(daemon_listen_maddr))
    return _replicas[key]


def _reset_replicas_lock() -> None:
    global _replicas_lock
    _replicas_lock = threading.Lock()  # (a lock held by another thread while forking would never be released)


_replicas_lock = threading.Lock()
os.register_at_fork(after_in_child=_reset_replicas_lock)


def _unpickle_remote_expert(location: ExpertInfo, daemon_listen_maddr: str, rpc_info: Optional[dict]) -> RemoteExpert:
    expert = RemoteExpert(location, _replica_for_this_process(daemon_listen_maddr))
    expert._rpc_info = rpc_info
    return expert


class _RemoteModuleCall(torch.autograd.Function):
    """Forward: rpc_forward with the inputs. Backward: rpc_backward with the saved inputs and output gradients."""

    @staticmethod
    def forward(ctx, dummy: torch.Tensor, uid: str, stub: StubBase, info: dict, *inputs: torch.Tensor):
        ctx.input_devices = tuple(tensor.device for tensor in inputs)  # gradients go back there (autograd insists)
        inputs = tuple(tensor.detach().cpu() for tensor in inputs)
        ctx.expert_call = (uid, stub, info)
        ctx.save_for_backward(*inputs)
        serialized = serialize_inputs(inputs, info["forward_schema"])
        expected = expected_output_bytes(info["outputs_schema"], len(inputs[0]) if inputs else 0)
        count = len(list(nested_flatten(info["outputs_schema"])))
        call = call_expert(
            stub, "forward", uid, serialized, raw_size_of(inputs), None, response_size_limit(expected), count, expected
        )
        outputs = _run_call(call, uid, stub, "forward")
        batch_size = len(inputs[0]) if inputs else 0
        for output, descriptor in zip(outputs, nested_flatten(info["outputs_schema"])):
            expected_shape = (batch_size, *descriptor.shape[1:])  # (as RemoteMixtureOfExperts checks them)
            if tuple(output.shape) != expected_shape:
                raise malformed_answer(
                    uid, "forward", f"an output of shape {tuple(output.shape)} instead of {expected_shape}"
                )
            # (an integer output is not differentiable: the expert would silently get no gradient)
            if descriptor.dtype is not None and output.dtype != descriptor.dtype:
                raise malformed_answer(
                    uid, "forward", f"an output of dtype {output.dtype} instead of {descriptor.dtype}"
                )
        return tuple(map(_standalone, outputs))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grad_outputs: torch.Tensor):
        inputs, (uid, stub, info) = ctx.saved_tensors, ctx.expert_call
        grad_outputs = tuple(grad.cpu() for grad in grad_outputs)
        backward_schema = (info["forward_schema"], info["outputs_schema"])
        tensors = (*inputs, *grad_outputs)
        serialized = serialize_inputs(tensors, backward_schema)
        grads_limit = response_size_limit(raw_size_of(inputs))  # one gradient per input, of its shape
        call = call_expert(stub, "backward", uid, serialized, raw_size_of(tensors), None, grads_limit, len(inputs))
        grad_inputs = _run_call(call, uid, stub, "backward")
        checked = check_grad_inputs(uid, inputs, grad_inputs)
        needs = ctx.needs_input_grad[4:]
        grads = (grad.to(device) if need else None for grad, need, device in zip(checked, needs, ctx.input_devices))
        return (None, None, None, None, *grads)


def _run_call(call, uid: str, stub: StubBase, method: str) -> List[torch.Tensor]:
    """Run an expert call; a network failure (P2PDaemonError) names the expert, its server and the call."""
    where = f"{method} of expert {uid!r} at {getattr(stub, '_peer', 'its server')}"
    try:
        return RemoteExpertWorker.run_coroutine(call)
    except P2PDaemonError as e:  # the same type, as for the expert's info
        raise type(e)(f"{where}: {e}{_hint(e)}") from e
    except P2PHandlerError as e:  # the server's error text, which a hostile server can make megabytes long
        raise P2PHandlerError(f"{where}: {shorten(str(e))}") from None


def _standalone(tensor: torch.Tensor) -> torch.Tensor:
    """The same memory as a tensor that is not a view: autograd forbids in-place edits of a custom Function's outputs
    that are views (decoded tensors view their receive buffer), and users add to expert outputs in place."""
    if tensor._base is None:
        return tensor
    standalone = torch.empty(0, dtype=tensor.dtype)
    return standalone.set_(tensor.untyped_storage(), tensor.storage_offset(), tensor.shape, tensor.stride())


def check_grad_inputs(uid: str, inputs: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Gradients from a server must match the inputs one to one in shape; cast to the inputs' dtypes.

    :raises MalformedExpertResponse: (a RuntimeError) they do not match
    """
    if len(grads) != len(inputs):
        raise malformed_answer(uid, "backward", f"{len(grads)} gradients for {len(inputs)} inputs")
    checked = []
    for index, (tensor, grad) in enumerate(zip(inputs, grads)):
        if grad.shape != tensor.shape:
            raise malformed_answer(
                uid,
                "backward",
                f"a gradient of shape {tuple(grad.shape)} for input {index} of shape {tuple(tensor.shape)}",
            )
        checked.append(grad.to(tensor.dtype) if tensor.is_floating_point() else grad)
    return checked


async def _create_remote_experts(infos: Sequence[Optional[ExpertInfo]], dht: DHT) -> List[Optional[RemoteExpert]]:
    p2p = await dht.replicate_p2p()
    return [RemoteExpert(info, p2p) if info is not None else None for info in infos]


async def _await_infos(infos: Union[Sequence, concurrent.futures.Future]) -> Sequence:
    if isinstance(infos, concurrent.futures.Future):
        return await asyncio.wrap_future(infos)
    return infos


def create_remote_experts(
    infos: Union[Sequence[Optional[ExpertInfo]], concurrent.futures.Future], dht: DHT, return_future: bool = False
) -> Union[List[Optional[RemoteExpert]], concurrent.futures.Future]:
    """RemoteExperts for a list of ExpertInfo (None stays None); ``infos`` may be a future of such a list."""

    async def create():
        return await _create_remote_experts(await _await_infos(infos), dht)

    return RemoteExpertWorker.run_coroutine(create(), return_future=return_future)


def batch_create_remote_experts(
    infos: Union[Sequence[Sequence[Optional[ExpertInfo]]], concurrent.futures.Future],
    dht: DHT,
    return_future: bool = False,
) -> Union[List[List[Optional[RemoteExpert]]], concurrent.futures.Future]:
    """Like :func:`create_remote_experts` for a list of lists (one list of experts per sample; None stays None)."""

    async def create():
        batch = await _await_infos(infos)
        p2p = await dht.replicate_p2p()
        # samples share their experts: one RemoteExpert per distinct (uid, peer) rather than one torch module for
        # every (sample, expert) pair (a batch of 20000 samples spent seconds creating 80000 identical modules)
        experts: Dict[ExpertInfo, RemoteExpert] = {}

        def make(info: Optional[ExpertInfo]) -> Optional[RemoteExpert]:
            if info is None:  # (an expert that get_experts did not find)
                return None
            if info not in experts:
                experts[info] = RemoteExpert(info, p2p)
            return experts[info]

        return [[make(info) for info in row] for row in batch]

    return RemoteExpertWorker.run_coroutine(create(), return_future=return_future)
