"""RemoteMixtureOfExperts: a layer that routes each sample to its best-scoring remote experts and mixes the answers."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from hivemind.dht import DHT
from hivemind.moe.client.beam_search import MoEBeamSearcher
from hivemind.moe.client.beam_search_dht import count_other_peers  # (runs in the DHT process, without torch)
from hivemind.moe.client.call_many import CallOptions, RemoteCallMany, check_inputs_fit_schema, refusals_hint
from hivemind.moe.client.expert import DUMMY, RemoteExpert
from hivemind.moe.client.expert_rpc import parse_expert_info, shorten
from hivemind.moe.client.gating import (
    ExpertFailurePenalty,
    compute_expert_scores,
    masked_expert_weights,
    mix_expert_outputs,
    penalty_key,
    unroutable_samples,
)
from hivemind.moe.client.mixture_arguments import check_mixture_arguments
from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
from hivemind.moe.expert_uid import UID_DELIMITER
from hivemind.proto import runtime_pb2
from hivemind.utils.logging import get_logger
from hivemind.utils.nested import nested_flatten, nested_pack

__all__ = ["RemoteMixtureOfExperts"]

logger = get_logger(__name__)


def _remaining(deadline: Optional[float]) -> Optional[float]:
    return None if deadline is None else deadline - time.monotonic()


def check_routing_arguments(k_best: int, k_min: int, backward_k_min: int) -> None:
    """Refuse routing settings no forward or backward could satisfy (ValueError naming the argument)."""
    if k_best < 1:
        raise ValueError(f"k_best must be at least 1 (each sample needs an expert), got k_best={k_best}")
    for name, value in (("k_min", k_min), ("backward_k_min", backward_k_min)):
        if not 0 <= value <= k_best:
            raise ValueError(f"{name} must be between 0 and k_best={k_best}, got {name}={value}")


class RemoteMixtureOfExperts(nn.Module):
    """A mixture-of-experts layer whose experts are found in the DHT by beam search and run on remote servers.

    :param in_features: width of the gating input (the last dimension of ``input``)
    :param grid_size: size of each grid dimension; experts are ``uid_prefix + "i.j..."``
    :param dht: a running DHT that knows the experts' servers
    :param uid_prefix: the grid's prefix, such as ``ffn.``
    :param k_best: how many experts each sample is sent to
    :param k_min: forward raises TimeoutError if fewer expert answers (over the whole batch) arrive
    :param forward_timeout: seconds for the WHOLE forward: beam search, expert info and expert calls (None: no limit)
    :param timeout_after_k_min: once every sample has k_min answers, wait at most this long for the rest (seconds)
    :param backward_k_min: like k_min, for backward
    :param backward_timeout: seconds for the expert calls of backward (None: no limit)
    :param detect_anomalies: refuse NaN/inf inputs (ValueError); treat NaN/inf expert answers as failures
    :param allow_zero_outputs: a sample none of whose experts answered gets zeros; otherwise RuntimeError
    :param dht_kwargs: to MoEBeamSearcher (num_workers, negative_caching, cache_expiration)

    An expert that fails or times out is masked for the samples routed to it and is then skipped for a short while
    (``self.failure_penalty``) rather than waited for again at every step.
    """

    def __init__(
        self,
        *,
        dht: DHT,
        uid_prefix: str,
        grid_size: Sequence[int],
        in_features: int,
        k_best: int,
        k_min: int = 1,
        backward_k_min: int = 1,
        forward_timeout: Optional[float] = None,
        backward_timeout: Optional[float] = None,
        timeout_after_k_min: Optional[float] = None,
        allow_zero_outputs: bool = False,
        detect_anomalies: bool = False,
        **dht_kwargs,
    ):
        super().__init__()
        check_mixture_arguments(
            dht=dht, uid_prefix=uid_prefix, grid_size=grid_size, in_features=in_features,
            ints=dict(k_best=k_best, k_min=k_min, backward_k_min=backward_k_min),
            timeouts=dict(forward_timeout=forward_timeout, backward_timeout=backward_timeout,
                          timeout_after_k_min=timeout_after_k_min),
        )  # fmt: skip
        check_routing_arguments(k_best, k_min, backward_k_min)
        if not uid_prefix.endswith(UID_DELIMITER):
            uid_prefix += UID_DELIMITER
        self.dht, self.uid_prefix, self.grid_size = dht, uid_prefix, tuple(grid_size)
        self.k_best = k_best
        self.k_min, self.backward_k_min = k_min, backward_k_min
        self.forward_timeout, self.backward_timeout, self.timeout_after_k_min = (
            forward_timeout,
            backward_timeout,
            timeout_after_k_min,
        )
        self.allow_zero_outputs, self.detect_anomalies = allow_zero_outputs, detect_anomalies
        self.beam_search = MoEBeamSearcher(dht, uid_prefix, self.grid_size, **dht_kwargs)
        self.proj = nn.Linear(in_features, sum(self.grid_size))  # gating logits of all dimensions, concatenated
        self.failure_penalty = ExpertFailurePenalty()
        self._expert_info: Optional[dict] = None
        self._info_provider: Optional[RemoteExpert] = None  # the expert whose rpc_info gave _expert_info
        self._skipped_hint = 0  # twice the most penalized experts one sample's search found last time

    def forward(self, input: torch.Tensor, *args: torch.Tensor, **kwargs: torch.Tensor) -> Any:
        """Mix the answers of each sample's ``k_best`` experts, weighted by a softmax of their gating scores.

        :param input: [batch, ..., in_features]; the gating uses it averaged over all but the first and last dims
        """
        deadline = None if self.forward_timeout is None else time.monotonic() + self.forward_timeout
        self.check_anomalies(input, *args, **kwargs)
        grid_scores = self.compute_grid_scores(input)
        if input.shape[0] == 0:
            outputs = self.empty_batch_outputs(grid_scores, input.device, deadline)
            return nested_pack(outputs, structure=self._expert_info["outputs_schema"])
        chosen_experts = self.find_experts(grid_scores, deadline)
        expert_mask, outputs = self.call_experts(chosen_experts, deadline, input, *args, **kwargs)
        logits = self.compute_expert_scores(grid_scores, chosen_experts)
        weights = masked_expert_weights(logits, expert_mask.to(logits.device))
        mixed = [mix_expert_outputs(weights, stacked.to(weights.device)) for stacked in outputs]
        return nested_pack(mixed, structure=self._expert_info["outputs_schema"])

    # ------------------------------------------------------------------ steps of forward

    def check_anomalies(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> None:
        """With detect_anomalies, refuse inputs that contain NaN or infinite values (ValueError)."""
        if self.detect_anomalies:
            for tensor in nested_flatten((args, kwargs)):
                if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                    raise ValueError("One of the inputs has NaN or infinite values (detect_anomalies=True)")

    def compute_grid_scores(self, input: torch.Tensor) -> List[torch.Tensor]:
        """Gating logits of each grid dimension: a list of [batch, grid_size[d]] tensors."""
        gating_input = input.mean(dim=tuple(range(1, input.ndim - 1))) if input.ndim > 2 else input
        return list(self.proj(gating_input).split_with_sizes(self.grid_size, dim=-1))

    def empty_batch_outputs(
        self, grid_scores: Sequence[torch.Tensor], device: torch.device, deadline: Optional[float] = None
    ) -> List[torch.Tensor]:
        """Flat outputs of shape [0, ...] for a batch without samples; no expert is called (their shapes come from
        the experts' schema, fetched once, by the deadline) in a mixture's dtypes, attached to the gating graph."""
        anchor = sum(scores.sum() for scores in grid_scores) * 0
        outputs = []
        for descriptor in nested_flatten(self._info_within(deadline)["outputs_schema"]):
            dtype = torch.promote_types(anchor.dtype, descriptor.dtype or anchor.dtype)  # as mix_expert_outputs does
            empty = descriptor.make_zeros(0, dtype=dtype, device=device, requires_grad=False, pin_memory=False)
            outputs.append(empty + anchor.to(dtype))
        return outputs

    def find_experts(self, grid_scores: Sequence[torch.Tensor], deadline: Optional[float]) -> List[List[RemoteExpert]]:
        """Beam search for each sample's experts within the forward's time budget.

        Experts that failed recently (``self.failure_penalty``) are passed over for the next-best ones: the search
        looks for as many more experts per sample as are penalized (at most MAX_EXTRA_CANDIDATES), so that a dead
        server's experts, still announced in the DHT until their announcements expire, do not take the samples'
        slots.
        """
        self.check_routable(grid_scores)
        extra = min(max(self.failure_penalty.num_penalized(), self._skipped_hint), MAX_EXTRA_CANDIDATES)
        future = self.beam_search.batch_find_best_experts(
            [scores.detach().cpu().float().numpy() for scores in grid_scores], self.k_best + extra, return_future=True
        )
        found = self._search_result(future, deadline)
        if not any(found):
            raise self._no_experts_error()
        chosen, most_skipped = [], 0
        for experts in found:
            alive = [expert for expert in experts if not self.failure_penalty.is_penalized(penalty_key(expert))]
            most_skipped = max(most_skipped, len(experts) - len(alive))
            # all penalized: the best ones, skipped in the call: the sample gets the error or zeros of no answer
            chosen.append((alive or experts)[: self.k_best])
        # a penalized server hides experts not counted among the penalized ones: ask for more at the next search
        self._skipped_hint = 2 * most_skipped
        return chosen

    def check_routable(self, grid_scores: Sequence[torch.Tensor]) -> None:
        """Refuse (ValueError) samples whose gating scores choose no expert (NaN), unless allow_zero_outputs gives
        them zeros and other samples of the batch can be routed."""
        unroutable = unroutable_samples(grid_scores)
        batch_size = len(grid_scores[0])
        if unroutable and (len(unroutable) == batch_size or not self.allow_zero_outputs):
            raise ValueError(
                f"The gating scores of {len(unroutable)} of {batch_size} samples (e.g. sample {unroutable[0]}) are "
                "NaN (or -inf) across a whole grid dimension, so no expert can be chosen for them: does the input "
                "have NaN or infinite values? (detect_anomalies=True refuses such inputs)"
            )

    def call_experts(
        self, chosen_experts: List[List[RemoteExpert]], deadline: Optional[float], *args, **kwargs
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """(alive mask [batch, max_k], stacked outputs [batch, max_k, ...] per output tensor).

        The experts' info comes from one of them: if at least two other experts that answered give outputs that its
        outputs schema does not describe, and more of them than give outputs it does, that info is dropped, its
        provider penalized instead of them, and the call is made once more with the info of another expert.
        """
        options = self._call_options(deadline)
        try:
            expert_mask, outputs = self._call_with_info(chosen_experts, options, *args, **kwargs)
            dispute = self._dispute(options)
        except TimeoutError:  # too few answers: maybe because the info made the others' answers look malformed
            dispute = self._dispute(options)
            if dispute is None:
                raise
        if dispute is not None:
            self._drop_disputed_info(*dispute)
            options = self._call_options(deadline)
            expert_mask, outputs = self._call_with_info(chosen_experts, options, *args, **kwargs)
        empty_samples = (~expert_mask.any(dim=1)).nonzero().flatten().tolist()
        if empty_samples and not self.allow_zero_outputs:
            raise RuntimeError(
                f"No expert answered for {len(empty_samples)} of {len(chosen_experts)} samples (e.g. sample "
                f"{empty_samples[0]}); pass allow_zero_outputs=True to give them zero outputs, or raise k_best"
                f"{refusals_hint(options)}"
            )
        return expert_mask, outputs

    def _dispute(self, options: CallOptions) -> Optional[Tuple[set, set]]:
        """If at least two experts other than the info's provider gave answers its outputs schema does not describe,
        more than gave answers it does: the penalty keys of those (disagreed) and of these (agreed); else None."""
        if self._info_provider is None:
            return None
        provider = penalty_key(self._info_provider)
        disagreed, agreed = options.disagreed - {provider}, options.agreed - {provider}
        return (disagreed, agreed) if len(disagreed) >= 2 and len(disagreed) > len(agreed) else None

    def _drop_disputed_info(self, disagreed: set, agreed: set) -> None:
        """Forget the info that the ``disagreed`` experts' answers disputed; penalize its provider, not them."""
        provider = penalty_key(self._info_provider)
        logger.warning(
            f"The outputs of {len(disagreed)} experts (e.g. {next(iter(disagreed))[0]}) do not fit the outputs schema "
            f"that {_describe(self._info_provider)} described, while {len(agreed)} fit it: using the info of another "
            f"expert, and skipping {provider[0]} for a while"
        )
        for key in disagreed:
            self.failure_penalty.report_success(key)  # (they were masked for that info's fault)
        self.failure_penalty.report_failure(provider)
        self._expert_info = self._info_provider = None

    def _call_with_info(self, chosen_experts, options: CallOptions, *args, **kwargs):
        # (sent as they are, inputs that do not fit would be refused by every expert, and blamed on them)
        info = self._get_info(chosen_experts, options.deadline, partial(_check_fit, args, kwargs))
        flat_inputs = list(nested_flatten((args, kwargs)))
        expert_mask, *outputs = RemoteCallMany.apply(DUMMY, chosen_experts, info, options, *flat_inputs)
        return expert_mask, outputs

    def _call_options(self, deadline: Optional[float]) -> CallOptions:
        return CallOptions(
            k_min=self.k_min,
            backward_k_min=self.backward_k_min,
            deadline=deadline,
            backward_timeout=self.backward_timeout,
            timeout_after_k_min=self.timeout_after_k_min,
            detect_anomalies=self.detect_anomalies,
            penalty=self.failure_penalty,
        )

    def compute_expert_scores(
        self, grid_scores: Sequence[torch.Tensor], batch_experts: List[List[RemoteExpert]]
    ) -> torch.Tensor:
        """Summed per-dimension logits of each chosen expert: [batch, max_k], -inf where a sample has fewer."""
        uids = [[expert.uid for expert in experts] for experts in batch_experts]
        return compute_expert_scores(grid_scores, uids, self.uid_prefix)

    def _search_result(self, future: concurrent.futures.Future, deadline: Optional[float]):
        try:
            return future.result(timeout=None if deadline is None else max(_remaining(deadline), 0))
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(
                f"Beam search for experts of {self.uid_prefix} did not finish within forward_timeout="
                f"{self.forward_timeout} s (the DHT is slow or unreachable)"
            ) from None

    # ------------------------------------------------------------------ expert info

    def _get_info(
        self, chosen_experts: List[List[RemoteExpert]], deadline: Optional[float], check: Optional[Callable] = None
    ) -> dict:
        """The experts' info (fetched once from the first of the chosen experts to answer, then cached).

        :param check: ``check(info, source)`` raises TypeError / ValueError if the call's inputs do not fit ``info``.
          An info they do not fit is replaced by that of another chosen expert that they fit, and the expert that
          gave the other one is penalized (a server of another configuration under this prefix, whose calls would
          fail); if they fit none, the first mismatch is raised and no expert is blamed (the inputs are wrong).
        """
        mismatches: Dict[RemoteExpert, Exception] = {}
        if self._expert_info is not None:
            try:
                if check is not None:
                    check(self._expert_info, _describe(self._info_provider))
                return self._expert_info
            except (TypeError, ValueError) as e:
                mismatches[self._info_provider] = e
        distinct = {expert.uid: expert for experts in chosen_experts for expert in experts}
        candidates = [e for e in distinct.values() if not self.failure_penalty.is_penalized(penalty_key(e))]
        candidates = candidates[:MAX_INFO_REQUESTS]
        if deadline is not None and _remaining(deadline) <= 0:
            raise TimeoutError(f"Could not fetch expert info within forward_timeout={self.forward_timeout} s")
        answer, errors, timed_out = RemoteExpertWorker.run_coroutine(
            _first_expert_info(candidates, deadline, check, mismatches)
        )
        for expert in (*errors, *timed_out):
            self.failure_penalty.report_failure(penalty_key(expert))
        if answer is not None:
            for expert in mismatches:
                if expert is not None:
                    self.failure_penalty.report_failure(penalty_key(expert))
            self._expert_info, self._info_provider = answer
            return self._expert_info
        if mismatches:
            raise next(iter(mismatches.values()))
        if timed_out:
            raise TimeoutError(f"Could not fetch expert info within forward_timeout={self.forward_timeout} s")
        problems = "; ".join(f"{expert.uid}: {shorten(repr(error))}" for expert, error in errors.items())
        raise RuntimeError(f"None of the chosen experts answered rpc_info: {problems or 'all skipped'}")

    def _no_experts_error(self) -> RuntimeError:
        """Beam search found no alive expert: say whether this DHT is connected to any other peer at all."""
        message = f"No responding experts found in the DHT for {self.uid_prefix} (grid {self.grid_size})"
        try:
            other_peers = self.dht.run_coroutine(count_other_peers, return_future=True).result(timeout=10)
        except Exception:  # the DHT process is gone or busy: the generic hint below still holds
            other_peers = None
        if other_peers == 0:
            return RuntimeError(
                f"{message}: this DHT knows no other peer. Pass initial_peers=[...] with the addresses that an expert "
                f"server prints (hivemind-server: 'To connect other peers to this server, use --initial_peers ...') "
                f"or that any peer of its swarm prints"
            )
        return RuntimeError(f"{message}; check that expert servers run and that this DHT is connected to them")

    @property
    def info(self) -> dict:
        """The schemas of this grid's experts, fetched from some alive expert (found by a neutral beam search)."""
        return self._info_within(None)

    def _info_within(self, deadline: Optional[float]) -> dict:
        if self._expert_info is None:
            neutral_scores = [[0.0] * size for size in self.grid_size]
            future = self.beam_search.find_best_experts(neutral_scores, beam_size=self.k_best, return_future=True)
            chosen = self._search_result(future, deadline)
            if not chosen:
                raise self._no_experts_error()
            self._get_info([chosen], deadline)
        return self._expert_info


# while experts are penalized, beam search looks for up to this many more experts per sample than k_best (one per
# penalized expert), so that the samples of a dead server find their next-best alive experts
MAX_EXTRA_CANDIDATES = 64

# the first forward asks this many of its chosen experts for their info at once, and uses the first answer: a dead or
# frozen expert ranked first no longer takes the whole forward_timeout (they were asked one after another)
MAX_INFO_REQUESTS = 8


def _describe(expert: Optional[RemoteExpert]) -> str:
    return "an expert" if expert is None else f"{expert.uid} at {expert.peer_id}"


def _check_fit(args: Sequence[torch.Tensor], kwargs: Dict[str, torch.Tensor], info: dict, source: str) -> None:
    """Raise TypeError / ValueError if a call's inputs do not fit ``info``, the experts' info that ``source`` gave."""
    # (keyword inputs may also be passed positionally, after the positional ones, as hivemind 1.1.12 allows)
    if kwargs and set(kwargs) != set(info["keyword_names"]):
        raise TypeError(f"the experts expect keyword arguments {info['keyword_names']}, got {tuple(kwargs)}")
    check_inputs_fit_schema(list(nested_flatten((args, kwargs))), list(nested_flatten(info["forward_schema"])), source)


async def _first_expert_info(
    experts: Sequence[RemoteExpert],
    deadline: Optional[float],
    check: Optional[Callable] = None,
    mismatches: Optional[Dict[RemoteExpert, Exception]] = None,
) -> Tuple[Optional[Tuple[dict, RemoteExpert]], Dict[RemoteExpert, BaseException], List[RemoteExpert]]:
    """((the info of the first expert to answer rpc_info that ``check`` accepts, that expert) or None, errors of those
    that failed, those cut off by the deadline); the requests still running when one is accepted are cancelled.
    Infos that ``check`` refuses (TypeError / ValueError) are added to ``mismatches`` by expert."""

    async def fetch(expert: RemoteExpert) -> Tuple[dict, RemoteExpert]:
        response = await expert.stub.rpc_info(runtime_pb2.ExpertUID(uid=expert.uid), timeout=_remaining(deadline))
        return parse_expert_info(response.serialized_info), expert

    tasks = {asyncio.ensure_future(fetch(expert)): expert for expert in experts}
    pending, errors = set(tasks), {}
    try:
        while pending:
            remaining = _remaining(deadline)
            if remaining is not None and remaining <= 0:
                break
            done, pending = await asyncio.wait(pending, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task.exception() is not None:
                    errors[tasks[task]] = task.exception()
                    continue
                info, expert = task.result()
                try:
                    if check is not None:
                        check(info, _describe(expert))
                    return (info, expert), errors, []
                except (TypeError, ValueError) as e:
                    if mismatches is not None:
                        mismatches[expert] = e
        return None, errors, [tasks[task] for task in pending]
    finally:
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
