"""Plain gating logic of the mixtures: expert scores, masked weights, mixing, stopping rule, failure penalty."""

import pytest
import torch

from hivemind.moe.client.gating import (
    ExpertFailurePenalty,
    all_samples_settled,
    compute_expert_scores,
    masked_expert_weights,
    mix_expert_outputs,
    uid_coordinates,
)
from hivemind.moe.client.switch_moe import balancing_loss, routed_fractions


def test_uid_coordinates_inside_and_outside_the_grid():
    assert uid_coordinates("ffn.1.2", "ffn.", (2, 3)) == [1, 2]
    for uid in ["ffn.2.0", "ffn.1", "ffn.1.2.0", "other.1.2"]:
        with pytest.raises(ValueError):
            uid_coordinates(uid, "ffn.", (2, 3))


def test_expert_scores_sum_the_coordinates_logits_and_pad_with_minus_inf():
    grid_scores = [torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[10.0, 20.0, 30.0], [40.0, 50.0, 60.0]])]
    scores = compute_expert_scores(grid_scores, [["ffn.1.2", "ffn.0.0"], ["ffn.0.1"]], "ffn.")
    assert scores[0].tolist() == [32.0, 11.0]
    assert scores[1, 0] == 53.0 and scores[1, 1] == -float("inf")


def test_expert_scores_are_differentiable():
    logits = torch.zeros(1, 2, requires_grad=True)
    compute_expert_scores([logits], [["ffn.1"]], "ffn.").sum().backward()
    assert logits.grad.tolist() == [[0.0, 1.0]]


def test_masked_weights_softmax_over_alive_experts_only():
    logits = torch.tensor([[0.0, 0.0, 5.0]])
    weights = masked_expert_weights(logits, torch.tensor([[True, True, False]]))
    assert torch.allclose(weights, torch.tensor([[0.5, 0.5, 0.0]]))


def test_sample_without_alive_experts_gets_zero_weights_and_no_nan_gradient():
    logits = torch.tensor([[1.0, 2.0], [3.0, -float("inf")]], requires_grad=True)
    alive = torch.tensor([[True, False], [False, False]])
    weights = masked_expert_weights(logits, alive)
    assert weights.tolist() == [[1.0, 0.0], [0.0, 0.0]]
    (weights * torch.tensor([[1.0, 2.0], [3.0, 4.0]])).sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_mix_weighs_each_experts_output():
    stacked = torch.arange(12.0).view(2, 2, 3)  # [batch, k, features]
    mixed = mix_expert_outputs(torch.tensor([[1.0, 0.0], [0.25, 0.75]]), stacked)
    assert mixed.tolist() == [[0.0, 1.0, 2.0], [0.25 * 6 + 0.75 * 9, 0.25 * 7 + 0.75 * 10, 0.25 * 8 + 0.75 * 11]]


def test_mix_keeps_extra_dimensions():
    assert mix_expert_outputs(torch.ones(2, 3), torch.ones(2, 3, 4, 5)).shape == (2, 4, 5)


def test_samples_settle_with_k_min_answers_or_nothing_left_to_wait_for():
    assert not all_samples_settled(torch.tensor([1, 0]), torch.tensor([0, 1]), k_min=1)
    assert all_samples_settled(torch.tensor([1, 0]), torch.tensor([1, 0]), k_min=1)
    assert all_samples_settled(torch.tensor([2, 2]), torch.tensor([3, 3]), k_min=2)


def test_failure_penalty_grows_with_failures_and_clears_on_success():
    now = [100.0]
    penalty = ExpertFailurePenalty(base=10, maximum=25, clock=lambda: now[0])
    penalty.report_failure("ffn.1")
    assert penalty.is_penalized("ffn.1") and not penalty.is_penalized("ffn.2")
    now[0] = 110.5
    assert not penalty.is_penalized("ffn.1")
    penalty.report_failure("ffn.1")  # second failure in a row: 20 s
    now[0] = 129.0
    assert penalty.is_penalized("ffn.1")
    penalty.report_failure("ffn.1")  # third: capped at 25 s
    now[0] = 154.5
    assert not penalty.is_penalized("ffn.1")
    penalty.report_failure("ffn.1")
    penalty.report_success("ffn.1")
    assert not penalty.is_penalized("ffn.1")


def test_routed_fractions_share_each_samples_unit_among_its_experts():
    fractions = routed_fractions([["ffn.0.1"], ["ffn.1.1", "ffn.1.2"], []], "ffn.", (2, 3))
    assert fractions[0].tolist() == [0.5, 0.5]
    assert fractions[1].tolist() == [0.0, 0.75, 0.25]


def test_balancing_loss_is_one_when_uniform_and_larger_when_concentrated():
    uniform = balancing_loss([torch.full((4, 2), 0.5)], [torch.tensor([0.5, 0.5])])
    concentrated = balancing_loss([torch.tensor([[0.9, 0.1]] * 4)], [torch.tensor([1.0, 0.0])])
    assert torch.isclose(uniform, torch.tensor(1.0)) and concentrated > 1.5


def test_balancing_loss_pushes_probability_away_from_overused_indices():
    logits = torch.zeros(3, 2, requires_grad=True)
    balancing_loss([torch.softmax(logits, dim=-1)], [torch.tensor([0.9, 0.1])]).backward()
    assert (logits.grad[:, 0] > 0).all() and (logits.grad[:, 1] < 0).all()


def test_failure_penalty_forgets_experts_whose_penalty_ended_long_ago():
    now = [0.0]
    penalty = ExpertFailurePenalty(base=1, maximum=1, clock=lambda: now[0])
    penalty.max_entries = 3
    for uid in ["ffn.1", "ffn.2", "ffn.3"]:
        penalty.report_failure(uid)
    now[0] = 10.0
    penalty.report_failure("ffn.4")
    assert set(penalty._until) == {"ffn.4"}
