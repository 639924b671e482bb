"""User-level splits: train / val / test, plus a cold-start split of users with very few records.

A user with fewer than ``cold_start_max_events`` events is ``cold`` (unseen in training by
construction). Every other user goes to train / val / test by a seeded hash of its id, so the
assignment of a user never depends on which other users exist or in which order they stream:
the same user lands in the same split in a 100-user sample and in the full cohort.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

SPLITS = ("train", "val", "test", "cold")


def uniform_hash(values: np.ndarray, seed: int) -> np.ndarray:
    """A splitmix64 hash of ``values`` mapped to [0, 1)."""
    with np.errstate(over="ignore"):
        z = np.asarray(values).astype(np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


@dataclass(frozen=True)
class UserSplitter:
    train: float = 0.8
    val: float = 0.1
    test: float = 0.1
    cold_start_max_events: int = 50
    seed: int = 0

    def __post_init__(self):
        if min(self.train, self.val, self.test) < 0 or abs(self.train + self.val + self.test - 1) > 1e-6:
            raise ValueError(f"train/val/test fractions must be non-negative and sum to 1, got "
                             f"{self.train}, {self.val}, {self.test}")

    def __call__(self, user_ids, n_events) -> np.ndarray:
        """Split name of each user, given its id and its number of events."""
        u = uniform_hash(np.asarray(user_ids), self.seed)
        names = np.where(u < self.train, "train", np.where(u < self.train + self.val, "val", "test"))
        return np.where(np.asarray(n_events) < self.cold_start_max_events, "cold", names).astype(object)

    def split(self, events: pd.DataFrame) -> dict[str, list[int]]:
        """Split every user of an events frame: ``{split name: sorted user ids}``."""
        counts = events.groupby("user_id").size()
        names = self(counts.index.to_numpy(), counts.to_numpy())
        return {s: sorted(int(u) for u in counts.index[names == s]) for s in SPLITS}
