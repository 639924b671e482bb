"""Per-channel ``log1p`` + standardisation, fitted on training entities only.

``z = (log1p(x) - mean_c) / std_c`` over the *available* entries of each channel ``c``; the inverse
undoes it exactly (up to float rounding), so metrics can be reported in original units. Counts,
bytes and presence are all non-negative, which ``log1p`` needs; it also tames heavy tails and
the scale shift between training and test entities.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class Log1pStandardizer:
    mean: np.ndarray = field(default_factory=lambda: np.zeros(0))
    std: np.ndarray = field(default_factory=lambda: np.ones(0))

    # -- fitting (streaming: call ``update`` per batch, then ``finalize``) --------------------
    def __post_init__(self):
        self.mean, self.std = np.asarray(self.mean, np.float64), np.asarray(self.std, np.float64)
        self._sums: np.ndarray | None = None

    def update(self, x: np.ndarray, available: np.ndarray | None = None) -> None:
        """Accumulate ``x [N, C, ...]``; ``available [N, ...]`` (no channel axis) weights entries.

        Behaviour tensors are sparse and ``log1p(0) = 0``, so only non-zero entries add to the
        sums; the entry count per channel is the number of available entries.
        """
        x = np.asarray(x)
        N, C = x.shape[:2]
        x3 = x.reshape(N, C, -1)
        w = np.ones((N, x3.shape[2]), np.float64) if available is None else \
            np.broadcast_to(available, (N,) + x.shape[2:]).reshape(N, -1).astype(np.float64)
        flat = np.flatnonzero(x3)
        item, channel, rest = np.unravel_index(flat, x3.shape)
        z = np.log1p(x3.reshape(-1)[flat].astype(np.float64))
        zw = z * w[item, rest]
        sums = np.stack([np.full(C, w.sum()), np.bincount(channel, zw, C), np.bincount(channel, zw * z, C)])
        self._sums = sums if self._sums is None else self._sums + sums

    def finalize(self, min_std: float = 1e-3) -> "Log1pStandardizer":
        if self._sums is None or (self._sums[0] == 0).any():
            raise ValueError("cannot fit the standardizer: some channel has no available training entry")
        n, s, ss = self._sums
        self.mean = s / n
        self.std = np.maximum(np.sqrt(np.maximum(ss / n - self.mean**2, 0)), min_std)
        self._sums = None
        return self

    @classmethod
    def fit(cls, x: np.ndarray, available: np.ndarray | None = None) -> "Log1pStandardizer":
        out = cls()
        out.update(x, available)
        return out.finalize()

    # -- use ---------------------------------------------------------------------------------
    def _shape(self, x, values):
        shape = (-1,) + (1,) * (x.ndim - 2) if x.ndim >= 2 else (-1,)
        if isinstance(x, torch.Tensor):
            return torch.as_tensor(values, dtype=x.dtype, device=x.device).reshape(shape)
        return values.reshape(shape).astype(x.dtype)

    def transform(self, x, channel_axis: int = 1):
        """Raw -> standardised; ``x`` is ``[N, C, ...]`` (numpy or torch)."""
        x = _move(x, channel_axis, 1)
        log = torch.log1p(x) if isinstance(x, torch.Tensor) else np.log1p(x)
        return _move((log - self._shape(x, self.mean)) / self._shape(x, self.std), 1, channel_axis)

    def inverse_transform(self, z, channel_axis: int = 1):
        """Standardised -> raw units (clamped at 0, since raw values are non-negative)."""
        z = _move(z, channel_axis, 1)
        log = z * self._shape(z, self.std) + self._shape(z, self.mean)
        raw = torch.expm1(log).clamp_min(0) if isinstance(z, torch.Tensor) else np.maximum(np.expm1(log), 0)
        return _move(raw, 1, channel_axis)

    def to_dict(self) -> dict:
        return {"transform": "log1p_standardize", "mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "Log1pStandardizer":
        if d.get("transform") != "log1p_standardize":
            raise ValueError(f"unknown normalisation {d.get('transform')!r}; expected 'log1p_standardize'")
        return cls(np.array(d["mean"]), np.array(d["std"]))


def _move(x, source: int, dest: int):
    if source == dest:
        return x
    return torch.movedim(x, source, dest) if isinstance(x, torch.Tensor) else np.moveaxis(x, source, dest)
