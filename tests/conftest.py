"""Shared fixtures: tiny synthetic datasets and the real BraTS sample when it is present."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_DIR = Path(__file__).resolve().parents[1]

SHARED_DIR = REPO_DIR.parent / "shared"
SAMPLE_DIR = SHARED_DIR / "brats18_sample"
PAPER_SPLIT_CSV = SHARED_DIR / "brats18_paper_split.csv"
TINY_SHAPE = (32, 32, 24)  # every size divisible by 8, so SegResNet takes whole volumes


@pytest.fixture(scope="session")
def tiny_federation(tmp_path_factory) -> tuple[Path, Path]:
    """(dataset_dir, datalist_dir) of 10 tiny synthetic cases: 2 sites x 4 training cases, 2 validation cases."""
    from dataset_brats18.synthetic import generate_dataset, write_federated_datalists

    data_dir = tmp_path_factory.mktemp("tiny_brats")
    cases = generate_dataset(data_dir, 10, TINY_SHAPE, seed=1)
    datalist_dir = write_federated_datalists(cases, data_dir / "datalist", n_sites=2, n_validation=2)
    return data_dir, datalist_dir


@pytest.fixture
def brats_sample() -> Path:
    if not SAMPLE_DIR.is_dir():
        pytest.skip(f"real BraTS sample not found at {SAMPLE_DIR} (only present in the project's workplace)")
    return SAMPLE_DIR


def xdist_group_of(item: pytest.Item) -> str | None:
    """The group of tests that must run in one pytest-xdist worker, or None for a test that can run anywhere: the
    tests of the shared tiny job (tiny_job.py) together, and a module's tests together when they share a module-scoped
    fixture (one simulator job each, not one per worker)."""
    if "tiny_job" in item.fixturenames:
        return "tiny_job"
    fixtures = getattr(item, "_fixtureinfo", None)
    if fixtures and any(defs[-1].scope == "module" for defs in fixtures.name2fixturedefs.values() if defs):
        return item.module.__name__
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Group the tests for `-n 2 --dist loadgroup` (pytest.ini), and start the longest work first: groups that run
    simulator jobs, then single end-to-end tests, then the rest, so that both workers finish at about the same time."""
    for item in items:
        group = xdist_group_of(item)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))

    def rank(item: pytest.Item) -> int:
        e2e = item.get_closest_marker("e2e") is not None
        return 0 if e2e and xdist_group_of(item) else 1 if e2e else 2

    items.sort(key=rank)
