"""Shared fixtures: tiny synthetic datasets and the real BraTS sample when it is present."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

REPO_DIR = Path(__file__).resolve().parents[1]

SHARED_DIR = REPO_DIR.parent / "shared"
SAMPLE_DIR = SHARED_DIR / "brats18_sample"
PAPER_SPLIT_CSV = SHARED_DIR / "brats18_paper_split.csv"
TINY_SHAPE = (32, 32, 24)  # every size divisible by 8, so SegResNet takes whole volumes


def made_once(tmp_path_factory: pytest.TempPathFactory, name: str, make: Callable[[Path], None]) -> Path:
    """Folder `name`, shared by every pytest-xdist worker of this run (pytest.ini runs two): the first worker that asks
    runs make(folder) while the others wait for it. A folder whose make did not finish is made again, never reused."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    folder = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name
    finished = folder.with_name(f"{name}.finished")
    with FileLock(str(folder.with_name(f"{name}.lock"))):
        if not finished.is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            make(folder)
            finished.touch()
    return folder


@pytest.fixture(scope="session")
def tiny_federation(tmp_path_factory) -> tuple[Path, Path]:
    """(dataset_dir, datalist_dir) of 10 tiny synthetic cases: 2 sites x 4 training cases, 2 validation cases."""
    from dataset_brats18.synthetic import generate_dataset, write_federated_datalists

    def make(data_dir: Path) -> None:
        cases = generate_dataset(data_dir, 10, TINY_SHAPE, seed=1)
        write_federated_datalists(cases, data_dir / "datalist", n_sites=2, n_validation=2)

    data_dir = made_once(tmp_path_factory, "tiny_brats", make)
    return data_dir, data_dir / "datalist"


@pytest.fixture
def brats_sample() -> Path:
    if not SAMPLE_DIR.is_dir():
        pytest.skip(f"real BraTS sample not found at {SAMPLE_DIR} (only present in the project's workplace)")
    return SAMPLE_DIR


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Longest work first: the end-to-end tests, then the rest, so that pytest.ini's two workers (`--dist loadfile`:
    a test file's tests in one worker, so a module-scoped simulator job runs once) finish at about the same time."""
    items.sort(key=lambda item: item.get_closest_marker("e2e") is None)
