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
