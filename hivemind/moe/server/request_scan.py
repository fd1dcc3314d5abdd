"""Expert requests are counted on the wire before protobuf parses them (see hivemind/moe/wire_scan.py): a request,
or a message of a stream, that carries more tensors than its expert takes is refused without materialising them."""

from __future__ import annotations

from typing import Mapping

from google.protobuf.message import DecodeError

from hivemind.moe.server.expert_requests import ExpertRequestError
from hivemind.moe.wire_scan import Buffer, MessageScanError, scan_tensor_message
from hivemind.proto import runtime_pb2

__all__ = ["RequestScanError", "CheckedExpertRequest", "scan_expert_request"]


class RequestScanError(ExpertRequestError):
    """An ExpertRequest refused from its wire bytes: too many tensors or fields, or not a protobuf message."""


def scan_expert_request(data: Buffer, tensor_counts: Mapping[str, int], what: str) -> None:
    """Refuse (RequestScanError) a request with more tensors than its expert takes, or with bloated ones.

    :param tensor_counts: {hosted uid: how many tensors its request may carry}; before the uid is read (or for an
      unknown uid), the largest of them applies
    :param what: names the RPC in errors, e.g. "forward"
    """
    try:
        scan_tensor_message(data, None, what, tensor_counts)  # the largest count, if a tensor precedes the uid
    except MessageScanError as e:
        raise RequestScanError(str(e)) from None


class CheckedExpertRequest:
    """What the p2p layer parses an expert request into: the wire bytes are scanned first, then parsed into
    ``message``, a ``runtime_pb2.ExpertRequest``.

    The p2p layer creates one per request with no arguments: pass ``functools.partial(CheckedExpertRequest,
    tensor_counts, what)`` as the handler's input type.
    """

    __slots__ = ("tensor_counts", "what", "message")

    def __init__(self, tensor_counts: Mapping[str, int], what: str):
        self.tensor_counts, self.what = tensor_counts, what
        self.message = None

    def ParseFromString(self, data: Buffer) -> int:  # noqa: N802 (protobuf's name)
        scan_expert_request(data, self.tensor_counts, self.what)
        self.message = runtime_pb2.ExpertRequest()
        try:
            return self.message.ParseFromString(data)
        except DecodeError as e:  # well-formed fields, but not an ExpertRequest (e.g. field 0, a uid not in UTF-8)
            raise RequestScanError(f"{self.what}: not a valid expert message ({e})") from None
