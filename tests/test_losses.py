"""The losses against hand-computed values on small tensors."""

import math

import pytest
import torch

from pso.losses import (
    clip_log_ratio,
    online_pso_loss,
    pairwise_error_loss,
    sft_loss,
    target_vs_reference_loss,
)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_online_loss_at_initialisation_is_log2():
    zeros = torch.zeros(5, 3)
    loss = online_pso_loss(zeros, zeros, beta=50.0, clip_eps=0.1)
    torch.testing.assert_close(loss, torch.full((5, 3), math.log(2)))


def test_online_loss_hand_computed():
    lr_w, lr_l = torch.tensor([0.02, 0.3]), torch.tensor([-0.01, -0.5])
    loss = online_pso_loss(lr_w, lr_l, beta=10.0, clip_eps=0.1)
    # second pair: both ratios clipped, to log(1.1) and log(0.9)
    expected = [-log_sigmoid(10 * 0.03), -log_sigmoid(10 * (math.log(1.1) - math.log(0.9)))]
    torch.testing.assert_close(loss, torch.tensor(expected))


def test_online_gradient_raises_winner_and_lowers_loser():
    lr_w = torch.tensor([0.01], requires_grad=True)
    lr_l = torch.tensor([0.02], requires_grad=True)
    online_pso_loss(lr_w, lr_l, beta=50.0, clip_eps=0.1).sum().backward()
    assert lr_w.grad.item() < 0 < lr_l.grad.item()  # descent raises log r_w, lowers log r_l


def test_clipping_gives_zero_gradient_outside_the_band():
    lr = torch.tensor([-0.5, -0.05, 0.0, 0.05, 0.5], requires_grad=True)
    clip_log_ratio(lr, 0.1).sum().backward()
    assert lr.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
    lr_w = torch.tensor([0.5], requires_grad=True)
    lr_l = torch.tensor([-0.5], requires_grad=True)
    online_pso_loss(lr_w, lr_l, 50.0, 0.1).sum().backward()
    assert lr_w.grad.item() == 0.0 and lr_l.grad.item() == 0.0


def test_online_loss_is_stable_for_huge_margins():
    big = torch.tensor([1e4]), torch.tensor([-1e4])
    assert torch.isfinite(online_pso_loss(*big, beta=1e6, clip_eps=0.5)).all()
    assert torch.isfinite(
        pairwise_error_loss(torch.tensor([1e6]), torch.zeros(1), torch.zeros(1), torch.zeros(1), beta=1e6)
    ).all()


def test_pairwise_error_loss_hand_computed():
    ew, ewr, el, elr = (torch.tensor([v]) for v in (0.30, 0.35, 0.50, 0.45))
    # policy improved on the winner (-0.05) and got worse on the loser (+0.05): margin -0.1
    loss = pairwise_error_loss(ew, ewr, el, elr, beta=20.0)
    torch.testing.assert_close(loss, torch.tensor([-log_sigmoid(20.0 * 0.1)]))
    same = pairwise_error_loss(ew, ew, el, el, beta=20.0)
    torch.testing.assert_close(same, torch.tensor([math.log(2)]))


def test_target_vs_reference_hand_computed():
    loss = target_vs_reference_loss(
        torch.tensor([0.2]), torch.tensor([0.25]), torch.tensor([0.03]), beta=10.0, clip_eps=0.1
    )
    torch.testing.assert_close(loss, torch.tensor([-log_sigmoid(10.0 * (0.05 - 0.03))]))


def test_sft_is_the_error():
    err = torch.tensor([0.1, 0.4])
    assert torch.equal(sft_loss(err), err)


@pytest.mark.parametrize("eps", [0.05, 0.1, 0.3])
def test_clip_band_matches_ratio_clamp(eps):
    lr = torch.linspace(-1, 1, 41)
    expected = torch.log(torch.clamp(torch.exp(lr), 1 - eps, 1 + eps))
    torch.testing.assert_close(clip_log_ratio(lr, eps), expected)
