"""Few-step samplers written as stochastic policies.

Each sampler reproduces one diffusers scheduler's `step` exactly, but returns the parts of the
transition separately: the clean estimate x0_hat, the Gaussian mean mu and the std s, so that

    x_next = mu + s * z,   z ~ N(0, I)

and log p(x_next | x) = -||x_next - mu||^2 / (2 s^2) + const is available for PSO (pso.md).
Steps are given per sample (a LongTensor of step indices), so one call can evaluate
transitions from different points of different trajectories, as the learner needs.
Coefficients are precomputed per step index from the scheduler's own tables.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from diffusers import (
    DDIMScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    LCMScheduler,
    SCMScheduler,
    TCDScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import Tensor

from pso.families import SamplerKind


@dataclass
class Step:
    """One transition: the clean estimate, the Gaussian mean and std (std 0 = deterministic)."""

    x0: Tensor
    mean: Tensor
    std: Tensor  # (B, 1, 1, 1)


def vp_x0_eps(output: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor, prediction_type: str):
    """Convert a model output to (x0, eps) for x = alpha * x0 + sigma * eps, as diffusers does."""
    if prediction_type == "epsilon":
        return (x - sigma * output) / alpha, output
    if prediction_type == "sample":
        return output, (x - alpha * output) / sigma
    if prediction_type == "v_prediction":
        return alpha * x - sigma * output, alpha * output + sigma * x
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected epsilon, sample or v_prediction")


class Sampler(ABC):
    """A configured scheduler at a fixed step count, exposing transitions as Gaussians."""

    kind: SamplerKind
    scheduler_class: type[SchedulerMixin]

    def __init__(
        self,
        scheduler: SchedulerMixin,
        num_steps: int,
        timesteps: list[int] | None = None,
        eta: float = 0.0,
        schedule: dict | None = None,
    ):
        """`timesteps`: a family's own grid; else `schedule` holds what the pipeline passes to `set_timesteps`
        besides the step count (FLUX's sigmas and shift `mu`)."""
        if not isinstance(scheduler, self.scheduler_class):
            raise TypeError(
                f"{type(self).__name__} needs a {self.scheduler_class.__name__}, got {type(scheduler).__name__}"
            )
        if scheduler.config.get("clip_sample") or scheduler.config.get("thresholding"):
            raise ValueError(
                f"{type(scheduler).__name__} clips or thresholds x0, which these samplers do not model; "
                "set clip_sample=False and thresholding=False"
            )
        if timesteps is not None:
            if len(timesteps) != num_steps:
                raise ValueError(f"custom timesteps {timesteps} do not have {num_steps} entries")
            scheduler.set_timesteps(timesteps=list(timesteps))
        elif schedule:
            scheduler.set_timesteps(**schedule)
        else:
            scheduler.set_timesteps(num_steps)
        self.scheduler = scheduler
        self.num_steps = num_steps
        self.eta = eta
        self.timesteps: Tensor = self._loop_timesteps(scheduler).clone()
        if len(self.timesteps) != num_steps:
            raise ValueError(f"{type(scheduler).__name__} set {len(self.timesteps)} timesteps, not {num_steps}")
        self.init_noise_sigma = float(getattr(scheduler, "init_noise_sigma", 1.0))  # flow matching starts at N(0, I)
        self._table: dict[str, Tensor] = {
            k: torch.stack([torch.as_tensor(r[k], dtype=torch.float32) for r in self._rows()]) for k in self._rows()[0]
        }

    def _loop_timesteps(self, scheduler: SchedulerMixin) -> Tensor:
        """The timesteps the pipeline's loop visits, one per step (SCM's table also holds the final angle 0)."""
        return scheduler.timesteps

    @abstractmethod
    def _rows(self) -> list[dict[str, Tensor | float]]:
        """Per-step coefficients; every row must hold the key "std"."""

    @abstractmethod
    def step(self, x: Tensor, model_output: Tensor, step: Tensor) -> Step:
        """The transition from state x at step index `step` (LongTensor, one per sample)."""

    @abstractmethod
    def forward_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(x_t, target): x0 noised to timesteps t (B,), and the model output that would be exact there."""

    @abstractmethod
    def random_timesteps(self, n: int, gen: torch.Generator) -> Tensor:
        """n timesteps drawn uniformly over the whole training range (Diffusion-DPO's forward-noised loss)."""

    def model_input(self, x: Tensor, step: Tensor) -> Tensor:
        """The model's input for state x (the scheduler's `scale_model_input`; identity for most)."""
        return x

    def _at(self, name: str, step: Tensor) -> Tensor:
        return self._table[name].to(step.device)[step].view(-1, 1, 1, 1)

    @property
    def stds(self) -> Tensor:
        """(N,) std of each transition; the last step's is 0 for every sampler but DDIM (eta > 0)."""
        return self._table["std"].clone()

    @property
    def stochastic(self) -> bool:
        """Whether any transition before the last has noise, i.e. the online form has something to train."""
        return bool((self._table["std"][:-1] > 0).any())


class VPSampler(Sampler):
    """Samplers of variance-preserving (UNet) models: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, integer t."""

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    @property
    def alphas_cumprod(self) -> Tensor:
        return self.scheduler.alphas_cumprod.to(torch.float32)

    @property
    def num_train_timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    def _alpha_sigma(self, t: Tensor | int) -> tuple[Tensor, Tensor]:
        abar = self.alphas_cumprod[t]
        return abar.sqrt(), (1 - abar).sqrt()

    def forward_noise(self, x0, noise, t):
        abar = self.alphas_cumprod.to(x0.device)[t.round().long()].view(-1, 1, 1, 1)
        alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
        x_t = alpha * x0 + sigma * noise
        if self.prediction_type == "epsilon":
            return x_t, noise
        if self.prediction_type == "sample":
            return x_t, x0
        return x_t, alpha * noise - sigma * x0  # v_prediction

    def random_timesteps(self, n, gen):
        return torch.randint(self.num_train_timesteps, (n,), generator=gen)


class LCMSampler(VPSampler):
    """LCMScheduler: boundary-condition denoise, then re-noise to the next timestep."""

    kind = "lcm"
    scheduler_class = LCMScheduler

    def _rows(self):
        ts = [int(t) for t in self.timesteps]
        rows = []
        for k, t in enumerate(ts):
            last = k == len(ts) - 1
            alpha, sigma = self._alpha_sigma(t)
            c_skip, c_out = self.scheduler.get_scalings_for_boundary_condition_discrete(torch.tensor(t))
            abar_prev = self.alphas_cumprod[ts[k + 1]] if not last else None
            rows.append(
                {
                    "alpha": alpha,
                    "sigma": sigma,
                    "c_skip": c_skip,
                    "c_out": c_out,
                    "renoise": 1.0 if last else abar_prev.sqrt(),
                    "std": 0.0 if last else (1 - abar_prev).sqrt(),
                }
            )
        return rows

    def step(self, x, model_output, step):
        x0, _ = vp_x0_eps(model_output, x, self._at("alpha", step), self._at("sigma", step), self.prediction_type)
        denoised = self._at("c_out", step) * x0 + self._at("c_skip", step) * x
        return Step(denoised, self._at("renoise", step) * denoised, self._at("std", step))


class TCDSampler(VPSampler):
    """TCDScheduler: move to an intermediate timestep s = floor((1 - gamma) t_prev), then re-noise."""

    kind = "tcd"
    scheduler_class = TCDScheduler

    def _rows(self):
        ts = [int(t) for t in self.timesteps]
        rows = []
        for k, t in enumerate(ts):
            last = k == len(ts) - 1
            t_prev = 0 if last else ts[k + 1]
            t_s = math.floor((1 - self.eta) * t_prev)
            abar_prev, abar_s = self.alphas_cumprod[t_prev], self.alphas_cumprod[t_s]
            alpha, sigma = self._alpha_sigma(t)
            stochastic = self.eta > 0 and not last
            rows.append(
                {
                    "alpha": alpha,
                    "sigma": sigma,
                    "alpha_s": abar_s.sqrt(),
                    "sigma_s": (1 - abar_s).sqrt(),
                    "renoise": (abar_prev / abar_s).sqrt() if stochastic else 1.0,
                    "std": (1 - abar_prev / abar_s).sqrt() if stochastic else 0.0,
                }
            )
        return rows

    def step(self, x, model_output, step):
        x0, eps = vp_x0_eps(model_output, x, self._at("alpha", step), self._at("sigma", step), self.prediction_type)
        noised = self._at("alpha_s", step) * x0 + self._at("sigma_s", step) * eps
        return Step(x0, self._at("renoise", step) * noised, self._at("std", step))


class DDIMSampler(VPSampler):
    """DDIMScheduler with eta (0 = deterministic DDIM, as Hyper-SD's N-step LoRAs use)."""

    kind = "ddim"
    scheduler_class = DDIMScheduler

    def _rows(self):
        stride = self.num_train_timesteps // self.num_steps
        final = self.scheduler.final_alpha_cumprod
        rows = []
        for t in (int(t) for t in self.timesteps):
            t_prev = t - stride
            abar_t = self.alphas_cumprod[t]
            abar_prev = self.alphas_cumprod[t_prev] if t_prev >= 0 else final
            variance = (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)
            std = self.eta * variance**0.5
            rows.append(
                {
                    "alpha": abar_t.sqrt(),
                    "sigma": (1 - abar_t).sqrt(),
                    "alpha_prev": abar_prev**0.5,
                    "direction": (1 - abar_prev - std**2) ** 0.5,
                    "std": std,
                }
            )
        return rows

    def step(self, x, model_output, step):
        x0, eps = vp_x0_eps(model_output, x, self._at("alpha", step), self._at("sigma", step), self.prediction_type)
        mean = self._at("alpha_prev", step) * x0 + self._at("direction", step) * eps
        return Step(x0, mean, self._at("std", step))


class _EulerBase(VPSampler):
    """Euler samplers work in sigma space: x = x0 + sigma * eps, UNet input x / sqrt(sigma^2 + 1)."""

    def _sigma_pairs(self):
        sigmas = self.scheduler.sigmas.to(torch.float32)
        return [(sigmas[k], sigmas[k + 1]) for k in range(self.num_steps)]

    def model_input(self, x, step):
        return x / self._at("input_scale", step)

    def _x0(self, x, model_output, sigma):
        if self.prediction_type == "epsilon":
            return x - sigma * model_output
        if self.prediction_type == "v_prediction":
            return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + (x / (sigma**2 + 1))
        if self.prediction_type == "sample":
            return model_output
        raise ValueError(f"unknown prediction_type {self.prediction_type!r}")

    def step(self, x, model_output, step):
        sigma = self._at("sigma", step)
        x0 = self._x0(x, model_output, sigma)
        return Step(x0, x + (x - x0) / sigma * self._at("dt", step), self._at("std", step))


class EulerAncestralSampler(_EulerBase):
    """EulerAncestralDiscreteScheduler: an Euler step to sigma_down plus noise sigma_up."""

    kind = "euler_ancestral"
    scheduler_class = EulerAncestralDiscreteScheduler

    def _rows(self):
        rows = []
        for sigma, sigma_to in self._sigma_pairs():
            sigma_up = (sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2) ** 0.5
            rows.append(
                {
                    "sigma": sigma,
                    "input_scale": (sigma**2 + 1) ** 0.5,
                    "dt": (sigma_to**2 - sigma_up**2) ** 0.5 - sigma,
                    "std": sigma_up,
                }
            )
        return rows


class EulerSampler(_EulerBase):
    """EulerDiscreteScheduler without churn: a deterministic ODE step (no transition likelihood)."""

    kind = "euler"
    scheduler_class = EulerDiscreteScheduler

    def _rows(self):
        return [
            {"sigma": s, "input_scale": (s**2 + 1) ** 0.5, "dt": s_to - s, "std": 0.0}
            for s, s_to in self._sigma_pairs()
        ]


class FlowEulerSampler(Sampler):
    """FlowMatchEulerDiscreteScheduler (flow matching: x_s = (1 - s) x0 + s eps, velocity v = eps - x0, t = 1000 s)
    as a stochastic policy with noise level eta in [0, 1].

    With x0_hat = x - s v and eps_hat = x + (1 - s) v, the pipeline's Euler step x + (s' - s) v equals
    (1 - s') x0_hat + s' eps_hat. The policy replaces eps_hat by sqrt(1 - eta^2) eps_hat + eta z:

        x_next ~ N((1 - s') x0_hat + s' sqrt(1 - eta^2) eps_hat, (eta s')^2 I)

    eta 0 is the pipeline's deterministic sampler exactly; eta 1 re-noises from the clean estimate as
    consistency samplers do (the scheduler's `stochastic_sampling=True`). Any eta keeps the marginal of x_s'
    when eps_hat is the true noise (the DDIM family, in flow coordinates); the last step (s' = 0) lands on
    x0_hat without noise.
    """

    kind = "flow_euler"
    scheduler_class = FlowMatchEulerDiscreteScheduler

    def _rows(self):
        sigmas = self.scheduler.sigmas.to(torch.float64)
        keep = (1 - self.eta**2) ** 0.5
        rows = []
        for k in range(self.num_steps):
            s, s_to = sigmas[k], sigmas[k + 1]
            rows.append(
                {
                    "sigma": s,
                    # mean = cx * x + cv * v, the expansion of the formula above
                    "cx": 1 - s_to + s_to * keep,
                    "cv": s_to * keep * (1 - s) - s * (1 - s_to),
                    "std": self.eta * s_to,
                }
            )
        return rows

    def step(self, x, model_output, step):
        x, v = x.float(), model_output.float()  # the scheduler steps in float32 as well
        x0 = x - self._at("sigma", step) * v
        return Step(x0, self._at("cx", step) * x + self._at("cv", step) * v, self._at("std", step))

    def forward_noise(self, x0, noise, t):
        s = (t.to(x0) / 1000).view(-1, *([1] * (x0.ndim - 1)))
        return (1 - s) * x0 + s * noise, noise - x0

    def random_timesteps(self, n, gen):
        return torch.rand(n, generator=gen).clamp_min(1e-3) * 1000


class SCMSampler(Sampler):
    """SCMScheduler (SANA-Sprint's sCM consistency sampler on TrigFlow angles t in [0, pi/2]) as a policy.

    TrigFlow noises a clean latent X0 (the pipeline's scaled latents) as X_t = cos(t) X0 + sin(t) sigma_d z,
    and the model predicts the velocity F with X0 = cos(t) X_t - sin(t) F. The scheduler's step from angle s
    to the next angle t is consistency sampling, natively stochastic:

        X0_hat = cos(s) X - sin(s) F,   X_next = cos(t) X0_hat + sin(t) sigma_d z

    The sampler's state is the pipeline's latents in units of sigma_d, x = X / sigma_d (the pipeline's own
    `latents / sigma_data`, which is also what it decodes at the end): the start is N(0, I), each step is

        x0_hat = cos(s) x - sin(s) F / sigma_d,   x_next ~ N(cos(t) x0_hat, sin(t)^2 I)

    and the last step (t = 0: cos 1, sin 0) lands on x0_hat without noise, the pipeline's returned
    `denoised / sigma_data`. Scaling by sigma_d (0.5) is exact in floating point, so states are the pipeline's
    up to that factor bit for bit, and the policy draws its noise from the same generators in the same order
    (one draw per step before the last; the scheduler's draw on the last step is multiplied by sin 0 = 0).
    `model_input` turns a state back into the pipeline's latents, what the denoiser is given.

    eta has no effect: the transition noise is the scheduler's own, full re-noising (FlowEulerSampler's eta 1).
    """

    kind = "scm"
    scheduler_class = SCMScheduler

    def __init__(self, scheduler, num_steps, timesteps=None, eta=0.0, schedule=None):
        """`schedule`: what the pipeline passes to `set_timesteps` (SANA-Sprint: `max_timesteps`, and
        `intermediate_timesteps`, which SCMScheduler allows only at 2 steps)."""
        if timesteps is not None:
            raise ValueError("the scm sampler takes its angles from max_timesteps and intermediate_timesteps")
        super().__init__(scheduler, num_steps, None, eta, {**(schedule or {}), "num_inference_steps": num_steps})

    @property
    def sigma_data(self) -> float:
        return float(self.scheduler.config.sigma_data)

    def _loop_timesteps(self, scheduler):
        return scheduler.timesteps[:-1]  # as the pipeline's loop: the table ends with the final angle 0

    def _rows(self):
        angles = self.scheduler.timesteps.to(torch.float32)  # trig in float32 on the table, as the scheduler does
        rows = []
        for k in range(self.num_steps):
            s, t = angles[k], angles[k + 1]
            last = k == self.num_steps - 1
            rows.append(
                {
                    "cos": torch.cos(s),
                    "sin": torch.sin(s),
                    "renoise": torch.cos(t),
                    "std": 0.0 if last else torch.sin(t),
                }
            )
        return rows

    def model_input(self, x, step):
        return x * self.sigma_data

    def step(self, x, model_output, step):
        x, out = x.float(), model_output.float()  # the pipeline steps in float32
        x0 = self._at("cos", step) * x - self._at("sin", step) * out / self.sigma_data
        return Step(x0, self._at("renoise", step) * x0, self._at("std", step))

    def forward_noise(self, x0, noise, t):
        """x0: a final state (the pipeline's latents / sigma_d); returns the model's input X_t = sigma_d (cos t x0
        + sin t noise) and the exact velocity there, F = sigma_d (cos t noise - sin t x0)."""
        t = t.to(x0).view(-1, *([1] * (x0.ndim - 1)))
        cos, sin = torch.cos(t), torch.sin(t)
        return self.sigma_data * (cos * x0 + sin * noise), self.sigma_data * (cos * noise - sin * x0)

    def random_timesteps(self, n, gen):
        """Angles uniform in (0, max_timesteps], the range the sampler visits (sCM training draws
        arctan(exp(tau) / sigma_d) with a log-normal tau instead; uniform weighs every noise level alike, as
        the other samplers' uniform t does)."""
        return (1 - torch.rand(n, generator=gen)) * float(self.timesteps[0])


SAMPLERS: dict[str, type[Sampler]] = {
    cls.kind: cls
    for cls in (
        LCMSampler,
        TCDSampler,
        DDIMSampler,
        EulerAncestralSampler,
        EulerSampler,
        FlowEulerSampler,
        SCMSampler,
    )
}
