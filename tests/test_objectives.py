"""Objectives (DESIGN §4) against hand computations on small tensors, their gradient directions,
the rating -> reward mapping and the pg baseline."""
from __future__ import annotations

import math

import pytest
import torch

from common.errors import ConfigError, InvalidRequestError
from store.feedback_records import Feedback, validate_score
from trainer.config import TrainerConfig
from trainer.objectives import (RunningMean, batch_loss, kto_loss, pg_loss, response_logprobs,
                                sft_loss)
from trainer.reuse import TrainRecord


def leaves(*rows: list[float]) -> list[torch.Tensor]:
    return [torch.tensor(r, requires_grad=True) for r in rows]


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# -- response_logprobs -----------------------------------------------------------------------------

def test_response_logprobs_is_log_softmax_gather_in_fp32():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 0.0]], dtype=torch.bfloat16)   # [T=2, V=3]
    targets = torch.tensor([2, 0])
    got = response_logprobs(logits, targets)
    x = logits.float().tolist()
    want = [x[0][2] - math.log(sum(math.exp(v) for v in x[0])),
            x[1][0] - math.log(sum(math.exp(v) for v in x[1]))]
    assert got.dtype == torch.float32 and got.shape == (2,)
    assert torch.allclose(got, torch.tensor(want), atol=1e-6)


def test_response_logprobs_rejects_mismatched_shapes():
    with pytest.raises(InvalidRequestError):
        response_logprobs(torch.zeros(3, 5), torch.zeros(2, dtype=torch.long))


# -- sft -------------------------------------------------------------------------------------------

def test_sft_loss_hand_computation_and_exclusions():
    logp = leaves([-1.0, -2.0], [-0.5], [-3.0, -3.0, -3.0], [-4.0])
    weights = torch.tensor([1.0, 2.0, 0.0, -1.0])      # neutral and bad records contribute nothing
    got = sft_loss(logp, weights)
    want = (1.0 * (1.0 + 2.0) + 2.0 * 0.5) / (1.0 * 2 + 2.0 * 1)
    assert got.item() == pytest.approx(want)
    got.backward()
    assert torch.all(logp[2].grad == 0) and torch.all(logp[3].grad == 0)
    assert torch.allclose(logp[0].grad, torch.tensor([-0.25, -0.25]))     # -w_i / sum_i w_i R_i
    assert torch.allclose(logp[1].grad, torch.tensor([-0.5]))


def test_sft_step_raises_logp_of_good_tokens():
    logp = leaves([-1.0, -2.0])
    sft_loss(logp, torch.tensor([1.0])).backward()
    assert torch.all(logp[0].grad < 0)          # gradient descent raises logp


def test_sft_loss_with_nothing_included_is_zero_with_zero_grad():
    logp = leaves([-1.0], [-2.0])
    loss = sft_loss(logp, torch.tensor([0.0, -1.0]))
    loss.backward()
    assert loss.item() == 0.0 and all(torch.all(t.grad == 0) for t in logp)


def test_sft_loss_validates_batch():
    with pytest.raises(InvalidRequestError):
        sft_loss(leaves([-1.0]), torch.tensor([1.0, 1.0]))
    with pytest.raises(InvalidRequestError):
        sft_loss([], torch.tensor([]))


# -- kto -------------------------------------------------------------------------------------------

def test_kto_loss_hand_computation():
    logp = leaves([-1.0, -2.0], [-0.5])
    ref = [torch.tensor([-1.5, -2.5]), torch.tensor([-1.0])]
    desirable = torch.tensor([True, False])
    beta, ld, lu, kl = 0.5, 1.0, 2.0, 0.1
    got = kto_loss(logp, ref, desirable, beta=beta, lambda_d=ld, lambda_u=lu, kl_ref=kl)
    r0, r1 = beta * 1.0, beta * 0.5
    want = ((ld - ld * sig(r0 - kl)) + (lu - lu * sig(kl - r1))) / 2
    assert got.item() == pytest.approx(want, abs=1e-6)


def test_kto_negative_kl_ref_is_clamped_and_detached():
    logp, ref, d = leaves([-1.0]), [torch.tensor([-1.2])], torch.tensor([True])
    kl = torch.tensor(-3.0, requires_grad=True)
    got = kto_loss(logp, ref, d, kl_ref=kl)
    assert got.item() == pytest.approx(kto_loss(logp, ref, d, kl_ref=0.0).item())
    got.backward()
    assert kl.grad is None


def test_kto_pushes_desirable_up_and_undesirable_down():
    logp = leaves([-1.0, -2.0], [-1.0, -2.0])
    ref = [torch.tensor([-1.0, -2.0]), torch.tensor([-1.0, -2.0])]
    kto_loss(logp, ref, torch.tensor([True, False])).backward()
    assert torch.all(logp[0].grad < 0)          # descent raises the desirable response
    assert torch.all(logp[1].grad > 0)          # and lowers the undesirable one


def test_kto_weights_scale_each_record_and_default_to_one():
    logp = leaves([-1.0, -2.0], [-0.5])
    ref = [torch.tensor([-1.5, -2.5]), torch.tensor([-1.0])]
    desirable = torch.tensor([True, False])
    beta, kl = 0.5, 0.1
    got = kto_loss(logp, ref, desirable, beta=beta, kl_ref=kl, weights=torch.tensor([0.25, 1.0]))
    want = (0.25 * (1 - sig(beta * 1.0 - kl)) + (1 - sig(kl - beta * 0.5))) / 2
    assert got.item() == pytest.approx(want, abs=1e-6)
    ones = kto_loss(logp, ref, desirable, beta=beta, kl_ref=kl, weights=torch.ones(2))
    assert ones.item() == pytest.approx(kto_loss(logp, ref, desirable, beta=beta, kl_ref=kl).item())
    with pytest.raises(InvalidRequestError):
        kto_loss(logp, ref, desirable, weights=torch.ones(3))


def _served(weights: list[float]) -> tuple[list[torch.Tensor], list[TrainRecord]]:
    """Records with the same logprobs [-1, -2], as at serving time (pg's ratio 1: unclipped), rated `weights`."""
    records = [TrainRecord(("r", i), [1, 2], [3, 4], [-1.0, -2.0], w) for i, w in enumerate(weights)]
    return leaves(*[[-1.0, -2.0] for _ in weights]), records


@pytest.mark.parametrize("objective", ["kto", "pg"])
def test_a_graders_reward_is_the_records_weight_in_kto_and_pg(objective):
    """A reward of 0.25 pushes a record a quarter as hard as a thumbs up (kto: |reward| weighs the record;
    pg: the reward is the advantage, the baseline at 0), in the same direction; -0.25 the other way."""
    config, grads = TrainerConfig(objective=objective), {}
    for weight in (1.0, 0.25, -0.25):
        logp, records = _served([weight])
        batch_loss(config, RunningMean(), logp, records).backward()
        grads[weight] = logp[0].grad
    assert torch.all(grads[1.0] < 0) and torch.all(grads[0.25] < 0) and torch.all(grads[-0.25] > 0)
    if objective == "pg":
        assert torch.allclose(grads[0.25], grads[1.0] / 4) and torch.allclose(grads[-0.25], -grads[0.25])
    else:                                # kto's value is not symmetric: only the scale is the weight's
        assert torch.allclose(grads[0.25], grads[1.0] / 4)


def test_sft_trains_positive_rewards_by_their_size_and_ignores_the_rest():
    logp, records = _served([0.25, 1.0, -0.5, 0.0])
    batch_loss(TrainerConfig(objective="sft"), RunningMean(), logp, records).backward()
    assert torch.allclose(logp[0].grad * 4, logp[1].grad) and torch.all(logp[1].grad < 0)
    assert torch.all(logp[2].grad == 0) and torch.all(logp[3].grad == 0)


def test_kto_validates():
    logp, ref, d = leaves([-1.0]), [torch.tensor([-1.0, -2.0])], torch.tensor([True])
    with pytest.raises(InvalidRequestError):
        kto_loss(logp, ref, d)
    with pytest.raises(ConfigError):
        kto_loss(logp, [torch.tensor([-1.0])], d, beta=0.0)


# -- pg --------------------------------------------------------------------------------------------

def test_pg_loss_hand_computation_with_clipping():
    logp = leaves([0.0, math.log(1.5)], [math.log(0.5)])
    old = [torch.zeros(2), torch.zeros(1)]
    adv = torch.tensor([2.0, -1.0])
    got = pg_loss(logp, old, adv, clip_eps=0.2)
    # ratios 1, 1.5 (A=2: min(3, 2.4) = 2.4), 0.5 (A=-1: min(-0.5, -0.8) = -0.8)
    want = -(1.0 * 2 + 2.4 + -0.8) / 3
    assert got.item() == pytest.approx(want, abs=1e-6)


def test_pg_positive_advantage_increases_logp_and_negative_decreases():
    logp = leaves([-1.0, -2.0], [-1.0])
    old = [torch.tensor([-1.0, -2.0]), torch.tensor([-1.0])]
    pg_loss(logp, old, torch.tensor([1.0, -1.0])).backward()
    assert torch.all(logp[0].grad < 0) and torch.all(logp[1].grad > 0)


@pytest.mark.parametrize("advantage, ratio, flows", [
    (1.0, 1.5, False),    # already pushed up past 1 + eps: stop
    (1.0, 0.5, True),     # below 1 - eps with A > 0: keep pushing up
    (-1.0, 0.5, False),   # already pushed down past 1 - eps: stop
    (-1.0, 1.5, True),    # above 1 + eps with A < 0: keep pushing down
])
def test_pg_clipping_stops_gradient_only_in_the_direction_of_the_advantage(advantage, ratio, flows):
    logp = leaves([math.log(ratio)])
    pg_loss(logp, [torch.zeros(1)], torch.tensor([advantage]), clip_eps=0.2).backward()
    g = logp[0].grad.item()
    if flows:
        assert g == pytest.approx(-advantage * ratio)
    else:
        assert g == 0.0


def test_pg_validates():
    with pytest.raises(ConfigError):
        pg_loss(leaves([-1.0]), [torch.zeros(1)], torch.tensor([1.0]), clip_eps=1.5)
    with pytest.raises(InvalidRequestError):
        pg_loss(leaves([-1.0]), [torch.zeros(2)], torch.tensor([1.0]))


# -- reward and baseline -----------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, want", [
    (dict(rating=1), 1.0), (dict(rating=-1), -1.0),
    (dict(stars=5), 1.0), (dict(stars=4), 1.0), (dict(stars=3), 0.0), (dict(stars=2), -1.0), (dict(stars=1), -1.0),
    (dict(reward_value=0.25), 0.25), (dict(reward_value=-1.0), -1.0),
])
def test_reward_mapping(kwargs, want):
    """The record weight the objectives train with: Feedback.reward() (what the trainer calls)."""
    score = {"rating": None, "stars": None, **kwargs}
    feedback = Feedback("fb", 1, "r", 0, score["rating"], score["stars"], None, None, None, 0.0, 0.0, "pending",
                        reward_value=kwargs.get("reward_value"))
    assert feedback.reward() == want


@pytest.mark.parametrize("kwargs", [dict(), dict(rating=1, stars=5), dict(rating=1, reward=0.5), dict(rating=0),
                                    dict(rating=2), dict(stars=0), dict(stars=6), dict(stars=3.5),
                                    dict(rating=True), dict(reward=1.5), dict(reward=float("nan"))])
def test_reward_rejects_bad_input(kwargs):
    with pytest.raises(InvalidRequestError):
        validate_score(kwargs.get("rating"), kwargs.get("stars"), kwargs.get("reward"))


def test_running_mean_baseline_and_checkpoint():
    rm = RunningMean(momentum=0.5)
    assert torch.equal(rm.advantages(torch.tensor([1.0, -1.0])), torch.tensor([1.0, -1.0]))
    assert rm.update(torch.tensor([1.0, 1.0])) == pytest.approx(0.5)
    assert rm.update([-1.0]) == pytest.approx(-0.25)
    assert torch.allclose(rm.advantages(torch.tensor([1.0])), torch.tensor([1.25]))
    assert rm.update([]) == pytest.approx(-0.25) and rm.count == 3
    restored = RunningMean(momentum=0.9)
    restored.load_state_dict(rm.state_dict())
    assert restored.state_dict() == rm.state_dict()
    with pytest.raises(ConfigError):
        restored.load_state_dict({"mean": 0.0})
    with pytest.raises(ConfigError):
        RunningMean(momentum=1.0)
