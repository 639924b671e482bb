"""Fixtures for the completion tests: tiny seeded batches and the real NJ file."""

from pathlib import Path

import pytest
import torch

from completion.batch import Batch
from tests.conftest import shared_data


def random_batch(B=6, C=2, T=16, H=3, W=5, cell_dim=4, entity_dim=7, seed=0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    slot = torch.arange(T).expand(B, T)
    return Batch(
        x=torch.randn(B, C, T, H, W, generator=g),
        observed=torch.ones(B, T, H, W, dtype=torch.bool),
        entity=torch.randn(B, entity_dim, generator=g),
        cells=torch.randn(B, H, W, cell_dim, generator=g),
        timestamps=torch.stack([(slot // 96) % 7, slot % 96], dim=-1),
    )


@pytest.fixture
def make_batch():
    """Factory of tiny seeded batches: make_batch(B=6, C=2, T=16, H=3, W=5, ...)."""
    return random_batch


@pytest.fixture
def batch() -> Batch:
    return random_batch()


@pytest.fixture(scope="session")
def nj_path() -> Path:
    """The real NJ file: skipped when absent, a failure when CI is set."""
    return shared_data("uomo-nj/nj_traffic_users_64.npz")


@pytest.fixture(scope="session")
def user_tensors(small_cohort, tmp_path_factory) -> Path:
    """The small simulated cohort tensorized (T = 192, 3 x 4 top-K cells, 6 location clusters)."""
    from completion.tensors import TensorConfig, tensorize_cohort
    from scope.data.locations import cluster_locations
    from scope.data.splits import UserSplitter
    from scope.data.tsinghua import load_cohort

    cohort = load_cohort(small_cohort)
    clusters = cluster_locations(cohort.base_poi, k=6, seed=0)
    out = tmp_path_factory.mktemp("user_tensors")
    tensorize_cohort([cohort.events], out, categories=cohort.categories, location_cluster=clusters.labels,
                     assign_split=UserSplitter(cold_start_max_events=50), cfg=TensorConfig(height=3, width=4),
                     progress=False, meta={"location_clusters": clusters.to_dict()})
    return out
