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
  observed and the hidden group is the target, or (when `cold_hidden_cells` > 0) that share of
  the H x W cells is hidden at every slot and every other cell is available (UoMo's
  "generation" task: an unseen location).

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
    cold_hidden_cells: float = 0.0

    def __post_init__(self):
        if isinstance(self.cold_hidden_channels, str):
            raise ValueError(f"cold_hidden_channels is a list of channel indices, got {self.cold_hidden_channels!r}")
        object.__setattr__(self, "cold_hidden_channels", tuple(self.cold_hidden_channels))  # a list from a parser or JSON
        if min(self.short_horizon, self.long_horizon) < 1 or self.cold_revealed < 0:
            raise ValueError("short_horizon and long_horizon must be >= 1 and cold_revealed >= 0, got "
                             f"{self.short_horizon}, {self.long_horizon} and {self.cold_revealed}")
        if not 0 <= self.cold_hidden_cells < 1:
            raise ValueError(f"cold_hidden_cells is a share of the cells in [0, 1), got {self.cold_hidden_cells}")
        if self.cold_hidden_cells and self.cold_hidden_channels:
            raise ValueError("the cold task hides either channels or cells, not both")

    @classmethod
    def in_hours(cls, short_hours: float, long_hours: float, slots_per_day: int, **kwargs) -> TaskConfig:
        """Horizons given in hours, converted to slots of the data's length (at least one slot)."""
        def slots(hours: float) -> int:
            n = hours * slots_per_day / 24
            if abs(n - round(n)) > 1e-9:
                raise ValueError(f"a horizon of {hours} h is not a whole number of {24 * 60 // slots_per_day}-minute slots")
            return max(1, round(n))
        return cls(short_horizon=slots(short_hours), long_horizon=slots(long_hours), **kwargs)


@dataclass(frozen=True)
class Regions:
    target: Tensor  # bool [B, C, T, H, W]
    available: Tensor  # bool [B, T, H, W]
    visible: Tensor  # bool [B, C]

    def __getitem__(self, index) -> Regions:
        """The regions of entities `index` (a slice or an index tensor)."""
        return Regions(self.target[index], self.available[index], self.visible[index])

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
    if config.cold_hidden_cells:
        n = max(1, round(config.cold_hidden_cells * H * W))
        keys = torch.rand((B, H * W), generator=generator, device=observed.device)
        hidden_cell = (keys.argsort(1).argsort(1) < n).reshape(B, 1, H, W)
        target_thw[cold] = (observed & hidden_cell)[cold]
        available[cold] = (observed & ~hidden_cell)[cold]
    elif hidden.any():
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


#################################################################################
#               Sparsity protocol: history entries dropped before a task          #
#################################################################################

DROP_KINDS = ("uniform", "block")


def history(observed: Tensor, task: Tensor, config: TaskConfig) -> Tensor:
    """The observed entries a task may reveal at most: before the horizon (short / long), all (cold)."""
    T = observed.shape[1]
    slot = torch.arange(T, device=observed.device)[None, :, None, None]
    horizon = torch.zeros_like(task)
    for name, h in (("short", config.short_horizon), ("long", config.long_horizon)):
        horizon = torch.where(task == task_index(name), h, horizon)
    return observed & (slot < T - horizon[:, None, None, None])


def drop_history(observed: Tensor, task: Tensor, config: TaskConfig, fraction: float | Tensor,
                 kind: str = "uniform", block_slots: int = 4,
                 generator: torch.Generator | None = None) -> Tensor:
    """`observed` with a `fraction` of each entity's history entries removed (per entity when a
    tensor [B]); what is removed is neither evidence nor target afterwards, as for data that never
    existed. Regions are drawn from the result (`make_regions`).

    uniform: floor(fraction N) history entries drawn uniformly; block: whole blocks of `block_slots`
    consecutive slots (every cell, the way a phone or a sensor goes silent for an hour or a day),
    in random order, as long as no more than fraction N entries are gone (whole blocks rarely
    hit the fraction exactly; with 15 hours of history, 95% drops 14 of them, 93%).
    """
    if kind not in DROP_KINDS:
        raise ValueError(f"unknown drop kind {kind!r}; expected one of {DROP_KINDS}")
    B, T, H, W = observed.shape
    fraction = torch.as_tensor(fraction, dtype=torch.float32, device=observed.device).expand(B)
    if ((fraction < 0) | (fraction > 1)).any():
        raise ValueError("the dropped fraction must be in [0, 1]")
    past = history(observed, task, config)
    n_drop = torch.floor(fraction * past.flatten(1).sum(1))
    if kind == "uniform":
        keys = torch.rand((B, T, H, W), generator=generator, device=observed.device)
        keys = keys.masked_fill(~past, torch.inf).flatten(1)
        dropped = (keys.argsort(1).argsort(1) < n_drop[:, None]).reshape(B, T, H, W) & past
    else:
        n_blocks = -(-T // block_slots)
        block = torch.arange(T, device=observed.device) // block_slots  # [T]
        per_block = torch.zeros(B, n_blocks, device=observed.device).index_add_(
            1, block, past.flatten(2).sum(2).float())
        order = torch.rand((B, n_blocks), generator=generator, device=observed.device).argsort(1)
        upto = per_block.gather(1, order).cumsum(1)  # entries dropped once this block is
        chosen = torch.zeros_like(per_block, dtype=torch.bool).scatter_(1, order, upto <= n_drop[:, None])
        dropped = chosen[:, block][:, :, None, None] & past
    return observed & ~dropped
