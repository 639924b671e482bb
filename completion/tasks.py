"""The three completion tasks as regions of a tensor of T slots.

A task fixes, per entity, the *target* entries (predicted and scored, never revealed) and the
*available* region (the T x H x W coordinates a mask generator may reveal as evidence):

- short: target = the last `short_horizon` slots (the next hour: 4 slots of 15 minutes);
  available = the observed slots before them.
- long: target = the last `long_horizon` slots (the next day: 96 slots; 32 of 64 on NJ);
  available = the observed slots before them.
- cold: an entity unseen in training. Either at most `cold_revealed` observed coordinates are
  available and every other observed entry is a target, or (when `cold_hidden_channels` is set)
  one channel group is fully hidden: the other channels are available everywhere they are
  observed and the hidden group is the target.

Evidence masks live on T x H x W and broadcast over channels; `visible` says which channels
evidence may reveal (all of them except in the hidden-group cold task).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

TASKS = ("short", "long", "cold")


@dataclass(frozen=True)
class TaskConfig:
    short_horizon: int = 4
    long_horizon: int = 96
    cold_revealed: int = 4
    cold_hidden_channels: tuple[int, ...] = ()


@dataclass(frozen=True)
class Regions:
    target: Tensor  # bool [B, C, T, H, W]
    available: Tensor  # bool [B, T, H, W]
    visible: Tensor  # bool [B, C]

    def evidence(self, M: Tensor) -> Tensor:
        """Broadcast a T x H x W mask [B, T, H, W] over the visible channels -> [B, C, T, H, W]."""
        return M[:, None] * self.visible[:, :, None, None, None].to(M.dtype)


def task_index(name: str) -> int:
    return TASKS.index(name)


def make_regions(task: Tensor, observed: Tensor, channels: int, config: TaskConfig,
                 generator: torch.Generator | None = None) -> Regions:
    """Regions for a batch; `task` is long [B] (indices into TASKS), `observed` bool [B, T, H, W]."""
    B, T, H, W = observed.shape
    slot = torch.arange(T, device=observed.device)[None, :, None, None]
    target_thw = torch.zeros_like(observed)
    available = torch.zeros_like(observed)
    visible = torch.ones(B, channels, dtype=torch.bool, device=observed.device)
    target_channels = torch.ones_like(visible)
    hidden = torch.zeros(channels, dtype=torch.bool, device=observed.device)
    hidden[list(config.cold_hidden_channels)] = True

    for name, horizon in (("short", config.short_horizon), ("long", config.long_horizon)):
        rows = task == task_index(name)
        if rows.any() and horizon >= T:
            raise ValueError(f"{name} horizon {horizon} leaves no history in T={T} slots")
        future = (slot >= T - horizon).expand(B, T, H, W)
        target_thw[rows] = (observed & future)[rows]
        available[rows] = (observed & ~future)[rows]

    cold = task == task_index("cold")
    if hidden.any():
        target_thw[cold] = observed[cold]
        available[cold] = observed[cold]
        visible[cold] = ~hidden
        target_channels[cold] = hidden
    else:
        revealed = _reveal_few(observed, config.cold_revealed, generator)
        target_thw[cold] = (observed & ~revealed)[cold]
        available[cold] = revealed[cold]

    target = target_thw[:, None] & target_channels[:, :, None, None, None]
    return Regions(target=target, available=available, visible=visible)


def _reveal_few(observed: Tensor, n: int, generator: torch.Generator | None) -> Tensor:
    """At most `n` uniformly chosen observed coordinates per entity."""
    B = observed.shape[0]
    keys = torch.rand(observed.shape, generator=generator, device=observed.device)
    keys = keys.masked_fill(~observed, -1.0).reshape(B, -1)
    rank = keys.argsort(dim=1, descending=True).argsort(dim=1)
    return ((rank < n) & (keys >= 0)).reshape(observed.shape)
