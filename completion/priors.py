"""Deterministic priors computed from the evidence alone; the DiT completes the residual over them.

A prior is a forecast that needs no training: the engine predicts `X_0 = prior + residual`, and
the DiT's final layer starts at zero (adaLN-Zero), so an untrained engine, or one whose residual
is zero, reproduces the prior exactly. This is how PriSTI conditions CSDI on an interpolated
prior, and it makes the engine start from the best simple baseline instead of from nothing.

`carry` (the default) works per series (entity, channel, cell) on whatever the evidence mask
reveals, so one rule serves forecasting, scattered missing entries and cold start:

- after the last evidence entry (forecasting): the last value, damped toward the series'
  evidence mean by `damping ** h` at h slots past it (damping 1 = persistence; an AR(1)-style
  forecast below 1); before the first one, the first value, damped the same way;
- between two evidence entries: linear interpolation of the two values, each damped toward the
  mean by its distance (`level + (1 - l) d^a (prev - level) + l d^b (next - level)`: plain
  interpolation at damping 1, the mean far from both at damping < 1, like a mean-reverting
  bridge);
- a cell without evidence: at each slot, the mean of the cells with evidence there, itself
  interpolated / carried over time the same way; 0 (the training mean in standardised units)
  for a channel without any evidence.

`shrinkage` k shrinks every evidence mean toward that training mean, as if k more entries
read 0 (`sum / (n + k)`, an empirical-Bayes level): with a long history it changes nothing, with
the four revealed entries of a cold-start user it keeps a few busy entries from being spread
over every empty cell and slot. 0 (the default) is the plain rule above.

With a slot-of-day `profile` [C, slots_per_day] (fitted on training entities), the rule runs on
the de-seasonalised series `x - profile(slot)` and the profile is added back.

Measured choices (``completion.evaluate.choose_prior``, on val, from the prior alone): city
traffic picks damping 0.97 per slot and no shrinkage; bursty per-user counts pick ~0.5 and shrink
every evidence mean toward the training mean by 4 pseudo-entries, which matters for cold-start
users (four revealed entries would otherwise be spread over every empty cell and slot). Shrinkage
is only taken when it buys at least 2% of val RMSE.
"""

from __future__ import annotations

import torch
from torch import Tensor

PRIORS = ("zero", "carry")


def _carry_series(y: Tensor, e: Tensor, damping: float, shrinkage: float = 0.0) -> tuple[Tensor, Tensor]:
    """Interpolate / carry y [..., T] along its last axis from entries where e [..., T] is true
    (e may broadcast against y, e.g. one evidence pattern shared by every channel); the level
    the damping decays toward is the evidence mean shrunk toward 0 by `shrinkage`.

    Returns the completed series and whether the series had any evidence (else it is 0)."""
    T = y.shape[-1]
    y = torch.where(e, y, torch.zeros_like(y))
    t = torch.arange(T, device=y.device).expand_as(e)
    prev = torch.where(e, t, -1).cummax(-1).values
    nxt = torch.where(e, t, T).flip(-1).cummin(-1).values.flip(-1)
    has_prev, has_next = prev >= 0, nxt < T
    prev_val = y.gather(-1, prev.clamp(min=0).expand(y.shape))
    next_val = y.gather(-1, nxt.clamp(max=T - 1).expand(y.shape))
    n = e.sum(-1, keepdim=True)
    level = y.sum(-1, keepdim=True) / (n + shrinkage).clamp(min=1e-6)  # the series' (shrunk) evidence mean
    to_prev, to_next = (t - prev).to(y.dtype), (nxt - t).to(y.dtype)
    a_prev, a_next = (torch.ones_like(to_prev), torch.ones_like(to_next)) if damping == 1 else \
        (damping ** to_prev, damping ** to_next)
    lam = to_prev / (nxt - prev).clamp(min=1).to(y.dtype)  # linear interpolation weight of the next entry
    between = level + (1 - lam) * a_prev * (prev_val - level) + lam * a_next * (next_val - level)
    ahead = prev_val if damping == 1 else level + a_prev * (prev_val - level)
    behind = next_val if damping == 1 else level + a_next * (next_val - level)
    out = torch.where(has_prev & has_next, between, torch.where(has_prev, ahead, behind))
    return torch.where(n > 0, out, torch.zeros_like(out)), n > 0


def shrunk_mean(x: Tensor, evidence: Tensor, shrinkage: float = 0.0) -> Tensor:
    """Per-entity, per-channel mean of x [B, C, T, H, W] over its evidence entries, shrunk toward 0
    (the training mean in standardised units) by `shrinkage` pseudo-entries -> [B, C, 1, 1, 1]."""
    w = evidence.to(x.dtype)
    return ((x * w).sum((2, 3, 4)) / (w.sum((2, 3, 4)) + shrinkage).clamp(min=1e-6))[..., None, None, None]


def carry_prior(x: Tensor, evidence: Tensor, damping: float = 1.0, seasonal: Tensor | None = None,
                shrinkage: float = 0.0) -> Tensor:
    """The `carry` prior of x [B, C, T, H, W] given a binary evidence mask of the same shape.

    `seasonal` [B, C, T, 1, 1] (or broadcastable) is the slot-of-day profile at every slot.
    Only evidence entries of `x` are read.
    """
    e = evidence.bool()
    y = x if seasonal is None else x - seasonal
    channel_has = e.flatten(2).any(2)[:, :, None, None, None]  # [B, C, 1, 1, 1]
    pattern = e.any(1, keepdim=True)
    if torch.equal(e, pattern & channel_has):  # one pattern for every channel with evidence: index it once
        e = pattern
    series = y.permute(0, 1, 3, 4, 2)  # [B, C, H, W, T]
    e_series = e.permute(0, 1, 3, 4, 2)
    out, has = _carry_series(series, e_series, damping, shrinkage)
    # a cell without evidence: the mean over the cells with evidence at each slot, itself carried over time
    w = e_series.to(y.dtype)
    across = (series * w).sum((2, 3)) / (w.sum((2, 3)) + shrinkage).clamp(min=1e-6)  # [B, C, T]
    across, _ = _carry_series(across, w.sum((2, 3)) > 0, damping, shrinkage)
    out = torch.where(has, out, across[:, :, None, None, :]).permute(0, 1, 4, 2, 3)
    out = torch.where(channel_has, out, torch.zeros_like(out))  # a channel without evidence: 0
    return out if seasonal is None else out + seasonal


def compute_prior(kind: str, x: Tensor, evidence: Tensor, damping: float = 1.0,
                  seasonal: Tensor | None = None, shrinkage: float = 0.0) -> Tensor:
    """The prior named `kind` (see PRIORS): `zero` is the plain DiT, `carry` the rule above."""
    if kind == "zero":
        return torch.zeros_like(x)
    if kind == "carry":
        return carry_prior(x, evidence, damping, seasonal, shrinkage)
    raise ValueError(f"unknown prior {kind!r}; expected one of {PRIORS}")


def slot_profile(x: Tensor, observed: Tensor, timestamps: Tensor, slots_per_day: int) -> Tensor:
    """Slot-of-day profile per channel [C, slots_per_day]: the mean deviation of observed entries
    from their own (entity, channel, cell) mean, at each slot of the day (0 where never seen).

    x [N, C, T, H, W]; observed bool [N, T, H, W]; timestamps long [N, T, 2] (weekday, slot).
    """
    obs = observed[:, None].to(x.dtype)
    mean = (x * obs).sum(2, keepdim=True) / obs.sum(2, keepdim=True).clamp(min=1)
    dev = ((x - mean) * obs).sum((3, 4))  # [N, C, T]
    slot = timestamps[..., 1].long()  # [N, T]
    if slot.numel() and (slot.min() < 0 or slot.max() >= slots_per_day):
        raise ValueError(f"slot of day must be in 0..{slots_per_day - 1}, found {slot.min()}..{slot.max()}: "
                         "do the timestamps match slots_per_day?")
    C = x.shape[1]
    total = torch.zeros(C, slots_per_day, dtype=x.dtype).index_add_(1, slot.flatten(), dev.permute(1, 0, 2).flatten(1))
    count = torch.zeros(slots_per_day, dtype=x.dtype).index_add_(0, slot.flatten(), obs.sum((1, 3, 4)).flatten())
    return total / count.clamp(min=1)


def profile_at(profile: Tensor, timestamps: Tensor) -> Tensor:
    """A [C, slots_per_day] profile read at every slot of timestamps [B, T, 2] -> [B, C, T, 1, 1]."""
    return profile[:, timestamps[..., 1].long()].permute(1, 0, 2)[..., None, None]


def resample_profile(profile: Tensor, slots_per_day: int) -> Tensor:
    """A [C, S] slot-of-day profile on another day resolution [C, slots_per_day] (piecewise-linear,
    periodic), e.g. a 15-minute profile read at 30- or 60-minute steps."""
    C, S = profile.shape
    if S == slots_per_day:
        return profile
    # centre of each new slot, in units of old slots
    pos = (torch.arange(slots_per_day, dtype=torch.float64) + 0.5) * S / slots_per_day - 0.5
    lo = pos.floor().long()
    frac = (pos - lo).to(profile.dtype)
    return profile[:, lo % S] * (1 - frac) + profile[:, (lo + 1) % S] * frac


def smoother_gradient(x: Tensor, weight: Tensor, kappa: float = 0.9) -> Tensor:
    """Zero in value, with the gradient of a kernel smoother of x over time with respect to the soft
    evidence weights [B, C, T, H, W] (and x): sum_s K_ts w_s x_s / sum_s K_ts w_s, K_ts = kappa^|t-s|.

    Added to a prior computed from the hard evidence, it is a straight-through estimator: the
    prior's value stays exact while L_rec tells the mask generator which evidence the prior needs
    (an entry near the targets that pulls them toward the truth gets a positive gradient).
    """
    T = x.shape[2]
    t = torch.arange(T, device=x.device, dtype=x.dtype)
    K = kappa ** (t[:, None] - t[None, :]).abs()  # [T, T]
    num = torch.einsum("bcshw,ts->bcthw", weight * x, K)
    den = torch.einsum("bcshw,ts->bcthw", weight, K)
    smooth = num / den.clamp(min=1e-6)
    return smooth - smooth.detach()
