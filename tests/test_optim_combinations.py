"""
hivemind.Optimizer's delay / offload / local-updates options: which combinations are refused (and how), and that
every valid pair of option values trains two peers to a lower loss.

The six boolean options have 22 valid combinations of 64; the network test covers all pairs of values that occur in a
valid combination (7 combinations, found greedily), with two DHTs shared by the whole module.
"""

import itertools

import pytest
import torch
from optim_swarm_helpers import FAST_TRACKER, RegressionTask, wait_for

from hivemind.dht import DHT
from hivemind.optim.optimizer import Optimizer
from hivemind.optim.optimizer_options import resolve_options

NAMES = ("delay_optimizer_step", "delay_grad_averaging", "delay_state_averaging", "offload_optimizer",
         "reuse_grad_buffers", "use_local_updates")  # fmt: skip


def refusal_reason(options: dict):
    """Why a combination cannot work (the option it conflicts with), or None for a valid one."""
    if options["use_local_updates"] and options["reuse_grad_buffers"]:
        return "reuse_grad_buffers"
    if options["use_local_updates"] and options["delay_grad_averaging"]:
        return "delay_grad_averaging"
    if options["delay_grad_averaging"] and not options["delay_optimizer_step"]:
        return "delay_optimizer_step"
    if options["delay_optimizer_step"] and not options["offload_optimizer"]:
        return "offload_optimizer"
    return None


ALL_COMBINATIONS = [dict(zip(NAMES, values)) for values in itertools.product([False, True], repeat=len(NAMES))]
VALID = [options for options in ALL_COMBINATIONS if refusal_reason(options) is None]
PAIRWISE = [
    dict(zip(NAMES, values))
    for values in [
        (0, 0, 0, 0, 0, 0),
        (1, 1, 1, 1, 1, 0),
        (0, 0, 1, 1, 0, 1),
        (1, 0, 0, 1, 0, 1),
        (0, 0, 0, 0, 1, 0),
        (0, 0, 1, 0, 0, 1),
        (1, 1, 0, 1, 0, 0),
    ]
]


def short_id(options: dict) -> str:
    words = [name.split("_")[0][:3] + name.split("_")[1][:3] for name, value in options.items() if value]
    return "-".join(words) or "none"


def test_the_pairwise_cover_is_valid_and_covers_every_pair_of_valid_values():
    assert len(VALID) == 22
    assert all(refusal_reason(options) is None for options in PAIRWISE)

    def pairs(options):
        values = [options[name] for name in NAMES]
        return {(i, bool(values[i]), j, bool(values[j])) for i, j in itertools.combinations(range(len(NAMES)), 2)}

    assert set().union(*map(pairs, PAIRWISE)) == set().union(*map(pairs, VALID))


@pytest.mark.parametrize("options", ALL_COMBINATIONS, ids=map(short_id, ALL_COMBINATIONS))
def test_each_combination_is_accepted_or_refused_naming_the_conflicting_option(options):
    options = dict(options)
    delay_state_averaging, use_local_updates = options.pop("delay_state_averaging"), options["use_local_updates"]
    del delay_state_averaging  # works with everything
    kwargs = dict(
        run_id="run", target_batch_size=32, batch_size_per_step=4, optimizer=lambda params: None, params=[],
        scheduler=None, matchmaking_time=1.0, averaging_timeout=5.0, allreduce_timeout=None,
        next_chunk_timeout=None, average_state_every=1, client_mode=False, auxiliary=False,
        grad_averager_factory=None, **options,
    )  # fmt: skip
    reason = refusal_reason(dict(options, delay_state_averaging=False))
    if reason is None:
        resolved = resolve_options(**kwargs)
        assert resolved.offload_optimizer == options["offload_optimizer"]
        assert resolved.delay_optimizer_step == options["delay_optimizer_step"]
        assert not (use_local_updates and resolved.delay_grad_averaging)
    else:
        with pytest.raises(ValueError, match=reason):
            resolve_options(**kwargs)


@pytest.fixture(scope="module")
def dht_pair():
    first = DHT(start=True)
    second = DHT(initial_peers=first.get_visible_maddrs(), start=True)
    yield first, second
    second.shutdown()
    first.shutdown()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("options", PAIRWISE, ids=map(short_id, PAIRWISE))
def test_two_peers_converge_with_this_combination_of_options(dht_pair, options):
    task = RegressionTask()
    run_id = f"combination_{short_id(options)}"
    flags = {name: bool(value) for name, value in options.items()}

    def make_optimizer(dht, model):
        return Optimizer(
            dht=dht, run_id=run_id, target_batch_size=16, batch_size_per_step=4,
            optimizer=lambda params: torch.optim.SGD(params, lr=0.2), params=model.parameters(),
            matchmaking_time=0.5, averaging_timeout=3.0, tracker_opts=FAST_TRACKER,
            averager_opts=dict(request_timeout=0.3), **flags,
        )  # fmt: skip

    opts = [make_optimizer(dht, model) for model, dht in zip(task.models, dht_pair)]
    try:
        wait_for(lambda: all(opt.tracker.global_progress.num_peers == 2 for opt in opts), timeout=30)
        task.train_concurrently(opts, epochs=4, timeout=60)
    finally:
        for opt in opts:
            opt.shutdown()  # also applies the last delayed step
    for model in task.models:
        assert task.full_loss(model) < 0.5 * task.initial_loss
