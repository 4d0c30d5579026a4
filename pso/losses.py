"""PSO losses and baselines as pure functions of log-ratios and prediction errors.

Every function returns one loss per element (per pair, or per pair and transition); callers
average with `.mean()`. Squared errors inside the log-ratios and prediction errors are reduced
over latent elements by the `reduction` setting (mean or sum), which rescales beta.
All pairwise forms use `logsigmoid`, which is stable for any margin.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor


def clip_log_ratio(log_ratio: Tensor, clip_eps: float) -> Tensor:
    """log clamp(r, 1 - eps, 1 + eps), clamped in log space: zero gradient outside the band."""
    return log_ratio.clamp(math.log1p(-clip_eps), math.log1p(clip_eps))


def online_pso_loss(log_ratio_w: Tensor, log_ratio_l: Tensor, beta: float, clip_eps: float) -> Tensor:
    """-log sigmoid(beta * (log clip(r_w) - log clip(r_l))) per transition (pso.md, online PSO)."""
    margin = clip_log_ratio(log_ratio_w, clip_eps) - clip_log_ratio(log_ratio_l, clip_eps)
    return -F.logsigmoid(beta * margin)


def pairwise_error_loss(err_w: Tensor, err_w_ref: Tensor, err_l: Tensor, err_l_ref: Tensor, beta: float) -> Tensor:
    """-log sigmoid(-beta * [(e_w - e_w_ref) - (e_l - e_l_ref)]): offline PSO and Diffusion-DPO.

    The two differ only in where t comes from (distilled timesteps vs 0..T-1).
    """
    return -F.logsigmoid(-beta * ((err_w - err_w_ref) - (err_l - err_l_ref)))


def target_vs_reference_loss(
    err_target: Tensor, err_target_ref: Tensor, log_ratio_ref_sample: Tensor, beta: float, clip_eps: float
) -> Tensor:
    """Fixed target (forward-noised branch) against a policy sample (transition branch).

    The target's log-likelihood ratio is approximated by -(e_theta - e_ref); the sample's is the
    clipped transition log-ratio.
    """
    margin = -(err_target - err_target_ref) - clip_log_ratio(log_ratio_ref_sample, clip_eps)
    return -F.logsigmoid(beta * margin)


def customization_loss(err_target: Tensor, err_sample: Tensor, beta: float, sample_weight: float) -> Tensor:
    """max(0, 1 - beta * (e_sample - e_target)) + sample_weight * e_sample: the paper's customization form.

    Both errors are on forward-noised final latents with one noise; the hinge stops pushing once the
    target is fitted 1/beta better than the policy's own sample, the second term keeps the sample fitted.
    """
    return F.relu(1 - beta * (err_sample - err_target)) + sample_weight * err_sample


def sft_loss(err: Tensor) -> Tensor:
    """Plain diffusion loss: the prediction error itself (no reference, no pair)."""
    return err
