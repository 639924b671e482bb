"""The tensors one batch of entities brings to the completion engine.

Every model in `completion/` reads a `Batch`; loaders (`completion/city.py`, the per-user tensors of
the data layer) produce one. Values in `x` are already normalised; `observed` marks the entries
that exist at all (missing data is False and is never a target nor evidence).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor


@dataclass(frozen=True)
class Batch:
    x: Tensor  # float [B, C, T, H, W], normalised behaviour tensor X_b
    observed: Tensor  # bool [B, T, H, W], entries that exist
    entity: Tensor  # float [B, d_e], entity side information (e.g. h_u, a POI profile)
    cells: Tensor  # float [B, H, W, F], per-cell features, the source of E_pos
    timestamps: Tensor | None = None  # long [B, T, 2], (weekday, slot of day)

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, index) -> Batch:
        """Rows `index` (a slice or an index tensor) of every field."""
        return replace(self, **{f.name: getattr(self, f.name)[index] for f in fields(self)
                                if getattr(self, f.name) is not None})

    def to(self, device: torch.device | str) -> Batch:
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if getattr(self, f.name) is not None})
