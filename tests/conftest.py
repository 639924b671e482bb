"""Shared fixtures: CPU-only, one thread, small simulated cohorts, and the real data in ../shared."""

import os
from pathlib import Path

import pytest
import torch

from scope.data.simulate import CohortConfig, simulate_cohort

torch.set_num_threads(1)
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need a CUDA device: skipped on CPU machines."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def shared_data(relative: str) -> Path:
    """A file of ../shared/data: skipped when absent, but a failure under CI (CI must have it)."""
    path = SHARED_DATA / relative
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing under CI")
        pytest.skip(f"{path} not available")
    return path


@pytest.fixture(scope="session")
def small_cohort(tmp_path_factory) -> Path:
    """A simulated 40-user, 4-day cohort (every persona, a few cold-start users)."""
    out = tmp_path_factory.mktemp("cohort")
    simulate_cohort(CohortConfig(n_users=40, days=4, seed=7, cold_start_fraction=0.1, n_stations=400, n_apps=300),
                    out, progress=False)
    return out
