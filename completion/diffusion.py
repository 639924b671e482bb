"""VP diffusion: schedule, X_0 loss over targets, evidence-clamped reverse process.

The sampler reads an X_0 estimate. A network can give it directly (`x0`) or through the
v-parameterisation (`v`, Salimans & Ho 2022): X_0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v, so the
estimate follows x_t where the noise is small and the network's output where it is large
(`x0_estimate`). With `x0`, a patch-token network fitted to Eq. 19 learns E[X_0 | evidence] and
ignores x_t at every level, so all samples end on the same point: the spread then comes only from
calibration. One reverse update (DDIM with stochasticity eta) serves both
samplers: over all training steps with eta = 1 it is exactly ancestral DDPM sampling (the DDIM
variance then equals the DDPM posterior variance beta~_t), and over a short sub-sequence with
eta = 0 it is the deterministic few-step DDIM sampler.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Denoiser = Callable[[Tensor, Tensor], Tensor]  # (x_t [B, ...], t long [B]) -> X_0 estimate


class VPSchedule:
    """Eq. 30-31: q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I), abar_t = prod_s (1 - beta_s).

    Linear betas from `beta_start` to `beta_end` over `num_steps` steps (Ho et al., 2020).
    """

    def __init__(self, num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        self.num_steps = num_steps
        self.betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
        self.alphas_cumprod = torch.cumprod(1 - self.betas, dim=0)

    def abar(self, t: Tensor, like: Tensor) -> Tensor:
        """abar_t for timesteps t [B] (-1 means abar = 1), shaped to broadcast against `like`."""
        a = torch.where(t >= 0, self.alphas_cumprod.to(t.device)[t.clamp(min=0)], 1.0)
        return a.to(like).reshape(-1, *([1] * (like.dim() - 1)))

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        a = self.abar(t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def timesteps(self, steps: int) -> list[int]:
        """`steps` evenly spaced timesteps, descending, from num_steps - 1 to 0."""
        if not 1 <= steps <= self.num_steps:
            raise ValueError(f"steps must be in [1, {self.num_steps}], got {steps}")
        return torch.linspace(self.num_steps - 1, 0, steps).round().long().unique().flip(0).tolist()


PARAMETERIZATIONS = ("x0", "v")


def x0_estimate(output: Tensor, x_t: Tensor, t: Tensor, schedule: VPSchedule, parameterization: str) -> Tensor:
    """The X_0 estimate from the network's output at x_t, step t: the output itself (`x0`) or
    sqrt(abar_t) x_t - sqrt(1 - abar_t) v with v = output (`v`)."""
    if parameterization == "x0":
        return output
    a = schedule.abar(t, x_t)
    return a.sqrt() * x_t - (1 - a).sqrt() * output


def x0_loss(x0_hat: Tensor, x0: Tensor, target: Tensor) -> Tensor:
    """Eq. 19/32: mean squared X_0 error over target entries only."""
    w = target.to(x0.dtype)
    return ((x0_hat - x0) ** 2 * w).sum() / w.sum().clamp(min=1)


def clamp_evidence(x: Tensor, x_obs: Tensor, evidence: Tensor, schedule: VPSchedule, t: Tensor,
                   generator: torch.Generator | None) -> Tensor:
    """Eq. 35: put the evidence entries back at noise level t (exactly x_obs when t = -1)."""
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    noisy_obs = torch.where(t.reshape(-1, *([1] * (x.dim() - 1))) >= 0,
                            schedule.q_sample(x_obs, t, noise), x_obs)
    return torch.where(evidence.bool(), noisy_obs, x)


def reverse_step(x_t: Tensor, x0_hat: Tensor, a: Tensor, a_prev: Tensor, eta: float,
                 noise: Tensor) -> Tensor:
    """x_t -> x_{t_prev} given the X_0 estimate (DDIM, Song et al. 2021, Eq. 12).

    sigma^2 = eta^2 (1 - abar_prev) / (1 - abar_t) (1 - abar_t / abar_prev); with eta = 1 and
    consecutive steps this is the DDPM posterior q(x_{t-1} | x_t, X_0).
    """
    eps_hat = (x_t - a.sqrt() * x0_hat) / (1 - a).sqrt()
    sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
    return (a_prev.sqrt() * x0_hat + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps_hat
            + sigma * noise)


@torch.no_grad()
def sample(denoise: Denoiser, x_obs: Tensor, evidence: Tensor, schedule: VPSchedule,
           steps: int | None = None, eta: float | None = None,
           generator: torch.Generator | None = None) -> Tensor:
    """Complete x_obs [B, ...] given the binary evidence mask (same shape) by reverse diffusion.

    steps=None runs every training step with eta=1 (DDPM); fewer steps default to eta=0 (DDIM).
    Evidence is clamped after every step; on return evidence entries equal x_obs bit for bit.
    """
    steps = steps or schedule.num_steps
    eta = (1.0 if steps == schedule.num_steps else 0.0) if eta is None else eta

    def steps_of(t: int) -> Tensor:
        return torch.full((x_obs.shape[0],), t, device=x_obs.device)

    seq = schedule.timesteps(steps)
    x = torch.randn(x_obs.shape, generator=generator, dtype=x_obs.dtype, device=x_obs.device)
    x = clamp_evidence(x, x_obs, evidence, schedule, steps_of(seq[0]), generator)
    for t, t_prev in zip(seq, seq[1:] + [-1]):
        t_b, t_prev_b = steps_of(t), steps_of(t_prev)
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        x = reverse_step(x, denoise(x, t_b), schedule.abar(t_b, x), schedule.abar(t_prev_b, x),
                         eta, noise)
        x = clamp_evidence(x, x_obs, evidence, schedule, t_prev_b, generator)
    return x


def sample_many(denoise: Denoiser, x_obs: Tensor, evidence: Tensor, schedule: VPSchedule,
                n_samples: int, steps: int | None = None, eta: float | None = None,
                generator: torch.Generator | None = None) -> Tensor:
    """`n_samples` independent completions per entity -> [S, B, ...] in one batched reverse pass.

    The batch is repeated sample-major, so `denoise` must accept S * B rows whose conditioning is
    the original batch's repeated the same way (`tensor.repeat(S, 1, ...)`).
    """
    ones = [1] * (x_obs.dim() - 1)
    out = sample(denoise, x_obs.repeat(n_samples, *ones), evidence.repeat(n_samples, *ones),
                 schedule, steps, eta, generator)
    return out.reshape(n_samples, *x_obs.shape)
