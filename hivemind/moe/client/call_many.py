"""Calling many remote experts at once, each with the samples routed to it, under the mixture's time limits."""

from __future__ import annotations

import asyncio
import math
import re
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Set, Tuple

import torch

from hivemind.moe.client.expert import RemoteExpert, check_grad_inputs
from hivemind.moe.client.expert_rpc import (
    ExpertInfoError,
    ExpertResponseTooLarge,
    MalformedExpertResponse,
    call_expert,
    expected_output_bytes,
    malformed_answer,
    raw_size_of,
    response_size_limit,
    serialize_inputs,
    shorten,
)
from hivemind.moe.client.gating import ExpertFailurePenalty, all_samples_settled, penalty_key
from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
from hivemind.p2p import P2PDaemonError, P2PHandlerError
from hivemind.utils.logging import get_logger
from hivemind.utils.nested import nested_flatten

__all__ = ["CallOptions", "ExpertJob", "RemoteCallMany", "group_by_expert", "check_inputs_fit_schema"]

logger = get_logger(__name__)

# the [batch, k, ...] answer buffers of one mixture call are sized by the experts' outputs schema, which a remote
# server declares: above this many bytes the call is refused before anything is sent or allocated
MAX_MIXTURE_OUTPUT_BYTES = 2**32


@dataclass
class CallOptions:
    """Limits of one mixture call; ``deadline`` is an absolute ``time.monotonic()`` value (None: no limit)."""

    k_min: int
    backward_k_min: int
    deadline: Optional[float]
    backward_timeout: Optional[float]
    timeout_after_k_min: Optional[float]
    detect_anomalies: bool
    penalty: ExpertFailurePenalty = field(default_factory=ExpertFailurePenalty)
    refused: Dict[str, str] = field(default_factory=dict)  # uid -> why its server refused this call's request
    # penalty keys of the experts whose forward answers fit the info's outputs schema, and of those whose did not
    # (of the wrong shape, or refused as they arrived: too many, too few or too large tensors)
    agreed: Set[Tuple[str, object]] = field(default_factory=set)
    disagreed: Set[Tuple[str, object]] = field(default_factory=set)


# what an expert server of this library answers when it refuses a request as invalid (its shapes, dtypes, values or
# batch size): the caller's fault, not the expert's, so that expert is not penalized for it (if the refusal is
# credible, see refusal_is_credible); a streamed call's error comes after "Failed to call handler `<name>` at <peer>: "
_REFUSAL = re.compile(
    r"(?:Failed to call handler `[^`]*` at \w+: )?((?:InvalidInputsError|TaskRejectedError)\(.*)", re.DOTALL
)


# 1.1.12's servers refuse one thing as the caller's: more rows than the expert's max_batch_size, as a ValueError (a
# unary call) or its bare text (a streamed one); its other errors (a wrong shape or dtype fails inside the module with
# torch's RuntimeError) cannot be told from the expert's own failures. That refusal is believed only for more rows
# than the limit it names.
_TOO_MANY_ROWS = r"Task size greater than max_batch_size \((\d+)\), it can't be processed"
_ORIGINAL_REFUSAL = re.compile(
    rf'ValueError\("({_TOO_MANY_ROWS})"\)|Failed to call handler `[^`]*` at \w+: ({_TOO_MANY_ROWS})'
)


def refusal_reason(error: BaseException, num_rows: int) -> Optional[str]:
    """The server's reason if ``error`` says that it refused the request of ``num_rows`` rows itself as invalid,
    else None."""
    if not isinstance(error, P2PHandlerError):
        return None
    match = _REFUSAL.match(str(error))
    if match is not None:
        return shorten(match.group(1))
    match = _ORIGINAL_REFUSAL.fullmatch(str(error))
    if match is None:
        return None
    reason, limit = match.group(1, 2) if match.group(1) is not None else match.group(3, 4)
    return reason if num_rows > int(limit) else None


def refusal_is_credible(tensors: Sequence[torch.Tensor], most_rows_taken: int) -> bool:
    """Whether a server's refusal of a request of ``tensors`` as invalid can be the caller's fault: the rows hold a NaN
    or infinite value (servers refuse those), or there are more of them than any other expert of the call took
    (``most_rows_taken``, 0 if none did: a server refuses more rows than its max_batch_size, which the experts that
    took fewer may share, and with none taken the whole request may be wrong). Any server can answer with a refusal's
    text, so one refusing finite rows, no more than another expert took, is counted as failing, and skipped for a
    while like one."""
    if not tensors or len(tensors[0]) > most_rows_taken:
        return True
    return any(tensor.is_floating_point() and not torch.isfinite(tensor).all() for tensor in tensors)


def refusals_hint(options: CallOptions) -> str:
    """'; N experts refused the request as invalid, e.g. <uid>: <reason>' (or '' if none did)."""
    if not options.refused:
        return ""
    uid, reason = next(iter(options.refused.items()))
    return f"; {len(options.refused)} experts refused the request as invalid, e.g. {uid}: {reason}"


@dataclass
class ExpertJob:
    """One expert and the (sample, slot) positions of the batch that were routed to it."""

    expert: RemoteExpert
    samples: torch.Tensor  # int64 [n] rows of the batch
    slots: torch.Tensor  # int64 [n] positions among each sample's chosen experts


def group_by_expert(experts_per_sample: Sequence[Sequence[RemoteExpert]]) -> List[ExpertJob]:
    """One job per distinct expert uid, with every (sample, slot) that chose it."""
    positions: Dict[str, Tuple[RemoteExpert, List[int], List[int]]] = {}
    for sample, experts in enumerate(experts_per_sample):
        for slot, expert in enumerate(experts):
            _, samples, slots = positions.setdefault(expert.uid, (expert, [], []))
            samples.append(sample), slots.append(slot)
    return [
        ExpertJob(expert, torch.tensor(samples, dtype=torch.int64), torch.tensor(slots, dtype=torch.int64))
        for expert, samples, slots in positions.values()
    ]


def check_inputs_fit_schema(inputs: Sequence[torch.Tensor], schema: Sequence, source: str) -> None:
    """Refuse the caller's flat inputs where they do not fit the experts' flat input descriptors (which servers would
    refuse each): TypeError for the wrong number of tensors, ValueError for a per-example shape or dtype or a batch
    size that differs. ``source`` names where the schema came from, for the message."""
    if len(inputs) != len(schema):
        raise TypeError(
            f"the experts take {len(schema)} input tensors (positional, then keyword by name), got {len(inputs)}"
        )
    for index, (tensor, descriptor) in enumerate(zip(inputs, schema)):
        expected = tuple(descriptor.shape[1:])
        if tensor.ndim != len(expected) + 1 or tuple(tensor.shape[1:]) != expected:
            shape = ", ".join(["batch_size", *map(str, expected)])
            raise ValueError(
                f"input #{index} has shape {list(tensor.shape)}, expected [{shape}] (the experts' schema, from "
                f"{source})"
            )
        if descriptor.dtype is not None and tensor.dtype != descriptor.dtype:
            raise ValueError(
                f"input #{index} has dtype {tensor.dtype}, expected {descriptor.dtype} (the experts' schema, from "
                f"{source})"
            )
        if len(tensor) != len(inputs[0]):
            raise ValueError(f"input #{index} has batch size {len(tensor)}, but input #0 has {len(inputs[0])}")


def _check_outputs(job: ExpertJob, outputs: Sequence[torch.Tensor], schema: Sequence, detect_anomalies: bool):
    if len(outputs) != len(schema):
        raise malformed_answer(job.expert.uid, "forward", f"{len(outputs)} outputs instead of {len(schema)}")
    for output, descriptor in zip(outputs, schema):
        expected = (len(job.samples), *descriptor.shape[1:])
        if tuple(output.shape) != expected:
            raise malformed_answer(
                job.expert.uid, "forward", f"an output of shape {tuple(output.shape)} instead of {expected}"
            )
        if detect_anomalies and output.is_floating_point() and not torch.isfinite(output).all():
            raise RuntimeError(f"expert {job.expert.uid} returned NaN or infinite values")


async def _gather_answers(
    calls: Dict[int, asyncio.Future],
    jobs: Sequence[ExpertJob],
    num_samples: int,
    k_min: int,
    deadline: Optional[float],
    timeout_after_k_min: Optional[float],
) -> Tuple[Dict[int, list], Dict[int, BaseException], List[int]]:
    """Wait for the calls until all answered, the deadline passed, or stragglers outlived timeout_after_k_min.

    :returns: (results by job, errors by job, jobs cut off by the deadline); stragglers are simply dropped
    """
    tasks = {asyncio.ensure_future(call): index for index, call in calls.items()}
    pending = set(tasks)
    answered, waiting = torch.zeros(num_samples, dtype=torch.int64), torch.zeros(num_samples, dtype=torch.int64)
    for index in calls:
        waiting[jobs[index].samples] += 1
    results, errors, timed_out, settled_at = {}, {}, [], None
    if all_samples_settled(answered, waiting, k_min):  # k_min=0: stragglers are waited for from the start
        settled_at = time.monotonic()
    try:
        while pending:
            budget = None if deadline is None else deadline - time.monotonic()
            if settled_at is not None and timeout_after_k_min is not None:
                straggler_budget = settled_at + timeout_after_k_min - time.monotonic()
                budget = straggler_budget if budget is None else min(budget, straggler_budget)
            if budget is not None and budget <= 0:
                break
            done, pending = await asyncio.wait(pending, timeout=budget, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                index = tasks[task]
                waiting[jobs[index].samples] -= 1
                if task.exception() is None:
                    results[index] = task.result()
                    answered[jobs[index].samples] += 1
                else:
                    errors[index] = task.exception()
            if settled_at is None and all_samples_settled(answered, waiting, k_min):
                settled_at = time.monotonic()
        if pending and deadline is not None and time.monotonic() >= deadline:
            timed_out = [tasks[task] for task in pending]
    finally:
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
    return results, errors, timed_out


def _fan_out(
    jobs, method, tensors_for_job, expected_for_job, schema, options: CallOptions, num_samples, k_min, deadline
):
    """Call ``method`` of each job's expert in parallel; returns {job index: tensors} of the ones that answered.

    ``expected_for_job(job)``: (the raw bytes, the number of tensors) that an answer should carry; it may carry at
    most response_size_limit of those bytes, and is streamed when they do not fit one unary message.
    """
    options.refused.clear()
    if deadline is not None and deadline <= time.monotonic():
        raise TimeoutError(f"The time limit of {method} ran out before any expert was called (raise the timeout)")
    calls = {}
    try:
        for index, job in enumerate(jobs):
            if options.penalty.is_penalized(penalty_key(job.expert)):
                continue  # failed recently: counted as not answering without waiting for it again
            tensors = tensors_for_job(job)
            serialized = serialize_inputs(tensors, schema)
            expected_bytes, count = expected_for_job(job)
            raw_size, limit = raw_size_of(tensors), response_size_limit(expected_bytes)
            calls[index] = call_expert(
                job.expert.stub, method, job.expert.uid, serialized, raw_size, None, limit, count, expected_bytes
            )
    except BaseException:
        for call in calls.values():
            call.close()  # never started
        raise
    if not calls:
        return {}

    results, errors, timed_out = RemoteExpertWorker.run_coroutine(
        _gather_answers(calls, jobs, num_samples, k_min, deadline, options.timeout_after_k_min)
    )
    most_rows_taken = max((len(jobs[index].samples) for index in results), default=0)
    for index, error in errors.items():
        reason = refusal_reason(error, len(jobs[index].samples))
        if reason is not None and refusal_is_credible(tensors_for_job(jobs[index]), most_rows_taken):
            logger.warning(f"Expert {jobs[index].expert.uid} refused the {method} request as invalid: {reason}")
            options.refused[jobs[index].expert.uid] = reason  # the request was invalid: the expert is fine
            continue
        problem = (
            shorten(repr(error))
            if reason is None
            else f"it refused finite rows, no more than another expert took: {reason}"
        )
        logger.warning(f"Expert {jobs[index].expert.uid} failed in {method}, masking it: {problem}")
        if method == "forward" and isinstance(error, ExpertResponseTooLarge):
            # more, fewer or larger tensors than the info's outputs schema describes: the info may be what is wrong
            options.disagreed.add(penalty_key(jobs[index].expert))
        # unreachable (a P2PDaemonError, not an error the server answered with): its server's other experts too
        options.penalty.report_failure(penalty_key(jobs[index].expert), server_down=isinstance(error, P2PDaemonError))
    for index in timed_out:
        logger.warning(f"Expert {jobs[index].expert.uid} did not answer {method} in time, masking it")
        options.penalty.report_failure(penalty_key(jobs[index].expert), server_down=True)
    for index in results:
        options.penalty.report_success(penalty_key(jobs[index].expert))
    return results


def _raise_if_all_refused(options: CallOptions, num_called: int, method: str) -> None:
    """Too few answers because every expert called refused the request as invalid: a ValueError with the reason."""
    if options.refused and len(options.refused) == num_called:
        uid, reason = next(iter(options.refused.items()))
        raise ValueError(
            f"Every expert called in {method} refused the request as invalid, e.g. {uid}: {reason}; fix the inputs "
            "(the experts are not penalized for it)"
        )


class RemoteCallMany(torch.autograd.Function):
    """Forward: each distinct expert gets the rows routed to it. Outputs are [batch, max_k, ...] plus an alive mask.

    Backward sends the saved rows and their output gradients to the experts that answered; experts that fail then
    contribute no gradient.
    """

    @staticmethod
    def forward(ctx, dummy, experts_per_sample, info: dict, options: CallOptions, *flat_inputs: torch.Tensor):
        ctx.input_devices = tuple(tensor.device for tensor in flat_inputs)  # gradients go back there (autograd asks)
        flat_inputs = tuple(tensor.detach().cpu() for tensor in flat_inputs)
        num_samples, max_k = len(experts_per_sample), max(map(len, experts_per_sample), default=0)
        jobs = group_by_expert(experts_per_sample)
        outputs_schema = list(nested_flatten(info["outputs_schema"]))
        num_outputs = len(outputs_schema)
        buffer_bytes = expected_output_bytes(outputs_schema, num_samples * max_k)
        if buffer_bytes > MAX_MIXTURE_OUTPUT_BYTES:
            raise ExpertInfoError(
                f"the experts' outputs schema {outputs_schema} asks for {buffer_bytes} bytes of answers for "
                f"{num_samples} samples x {max_k} experts, over the {MAX_MIXTURE_OUTPUT_BYTES} bytes a mixture call "
                "allocates: check the servers under this uid prefix (or raise "
                "hivemind.moe.client.call_many.MAX_MIXTURE_OUTPUT_BYTES if this size is intended)"
            )

        def rows_for(job):
            return [tensor[job.samples] for tensor in flat_inputs]

        def expected_outputs(job):
            return expected_output_bytes(outputs_schema, len(job.samples)), num_outputs

        skipped = sum(options.penalty.is_penalized(penalty_key(job.expert)) for job in jobs)
        results = _fan_out(
            jobs,
            "forward",
            rows_for,
            expected_outputs,
            info["forward_schema"],
            options,
            num_samples,
            options.k_min,
            options.deadline,
        )
        alive = torch.zeros(num_samples, max_k, dtype=torch.bool)
        outputs = [
            descriptor.make_zeros(num_samples, max_k, device="cpu", requires_grad=False, pin_memory=False)
            for descriptor in outputs_schema
        ]
        alive_jobs = []
        for index, job_outputs in results.items():
            job = jobs[index]
            try:
                _check_outputs(job, job_outputs, outputs_schema, options.detect_anomalies)
            except RuntimeError as e:
                logger.warning(f"{e}; masking it")
                options.penalty.report_failure(penalty_key(job.expert))
                if isinstance(e, MalformedExpertResponse):  # (not NaN outputs: outputs the schema does not describe)
                    options.disagreed.add(penalty_key(job.expert))
                continue
            options.agreed.add(penalty_key(job.expert))
            for output, value in zip(outputs, job_outputs):
                output[job.samples, job.slots] = value.to(output.dtype)
            alive[job.samples, job.slots] = True
            alive_jobs.append(job)

        num_answers = int(alive.sum())
        if num_answers < options.k_min:
            _raise_if_all_refused(options, len(jobs) - skipped, "forward")
            failed = len(jobs) - skipped - len(alive_jobs) - len(options.refused)
            raise TimeoutError(
                f"Only {num_answers} expert answers arrived in forward, fewer than k_min={options.k_min}: of the "
                f"{len(jobs)} chosen experts, {failed} failed or did not answer in time (see the warnings above) "
                f"and {skipped} were not called because they failed in the last seconds (raise forward_timeout or "
                f"lower k_min; skipped experts are tried again once their penalty ends){refusals_hint(options)}"
            )
        ctx.alive_jobs, ctx.info, ctx.options = alive_jobs, info, options
        ctx.num_samples = num_samples
        ctx.save_for_backward(*flat_inputs)
        ctx.mark_non_differentiable(alive)
        return (alive, *outputs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_alive, *grad_outputs: torch.Tensor):
        flat_inputs, options, jobs = ctx.saved_tensors, ctx.options, ctx.alive_jobs
        grad_outputs = [grad.cpu() for grad in grad_outputs]
        backward_schema = (ctx.info["forward_schema"], ctx.info["outputs_schema"])

        def rows_for(job):
            return [tensor[job.samples] for tensor in flat_inputs] + [
                grad[job.samples, job.slots] for grad in grad_outputs
            ]

        deadline = None if options.backward_timeout is None else time.monotonic() + options.backward_timeout

        def expected_grads(job):
            rows = len(job.samples)  # one gradient per input, of the input's shape
            grad_bytes = sum(rows * math.prod(t.shape[1:]) * t.element_size() for t in flat_inputs)
            return grad_bytes, len(flat_inputs)

        skipped = sum(options.penalty.is_penalized(penalty_key(job.expert)) for job in jobs)
        results = _fan_out(
            jobs,
            "backward",
            rows_for,
            expected_grads,
            backward_schema,
            options,
            ctx.num_samples,
            options.backward_k_min,
            deadline,
        )
        grad_inputs = [torch.zeros_like(t) if t.is_floating_point() else None for t in flat_inputs]
        num_survivors = num_answered = 0
        for index, job_grads in results.items():
            job = jobs[index]
            try:
                checked = check_grad_inputs(job.expert.uid, [t[job.samples] for t in flat_inputs], job_grads)
                if options.detect_anomalies and not all(
                    torch.isfinite(grad).all() for grad in checked if grad.is_floating_point()
                ):
                    raise RuntimeError(f"expert {job.expert.uid} returned NaN or infinite gradients")
            except RuntimeError as e:  # like a failed call: no gradient from it, and it is skipped for a while
                logger.warning(f"{e}; masking it")
                options.penalty.report_failure(penalty_key(job.expert))
                continue
            for grad_input, grad in zip(grad_inputs, checked):
                if grad_input is not None:
                    grad_input.index_add_(0, job.samples, grad)
            num_survivors += len(job.samples)
            num_answered += 1
        if num_survivors < options.backward_k_min:
            _raise_if_all_refused(options, len(jobs) - skipped, "backward")
            failed = len(jobs) - skipped - num_answered - len(options.refused)
            raise TimeoutError(
                f"Only {num_survivors} expert answers arrived in backward, fewer than backward_k_min="
                f"{options.backward_k_min}: of the {len(jobs)} experts that answered forward, {failed} failed or did "
                f"not answer in time (see the warnings above) and {skipped} were not called because they failed in "
                f"the last seconds (raise backward_timeout or lower backward_k_min){refusals_hint(options)}"
            )
        needs = ctx.needs_input_grad[4:]
        devices = ctx.input_devices
        grads = (grad.to(device) if need else None for grad, need, device in zip(grad_inputs, needs, devices))
        return (None, None, None, None, *grads)
