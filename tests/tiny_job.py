"""One tiny real simulator job (2 clients x 3 rounds, ~40 s), run once per test session and shared by the
evaluation and plotting tests. Named brats18_4 so result_stat/testing_models_3d.sh picks it up."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from brats_fl.job_results import JobPaths

REPO_DIR = Path(__file__).resolve().parents[1]
JOB_NAME = "brats18_4"
NUM_ROUNDS = 3  # rounds 1 and 2 can both be best: an off-by-one in the saved model would show


def tiny_job_paths(tmp_path_factory, dataset_dir: Path, datalist_dir: Path) -> JobPaths:
    """Run the job the first time a test of this run asks for it (in any test worker); later calls reuse it."""
    from conftest import made_once

    def run(workspace: Path) -> None:
        done = subprocess.run(tiny_job_command(workspace, dataset_dir, datalist_dir), capture_output=True, text=True,
                              cwd=REPO_DIR)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]

    return JobPaths(made_once(tmp_path_factory, "tiny_job_ws", run), JOB_NAME)


def tiny_job_command(workspace: Path, dataset_dir: Path, datalist_dir: Path) -> list[str]:
    """The command line that ran the tiny job."""
    return [
        sys.executable,
        "job.py",
        "--dataset_base_dir",
        str(dataset_dir),
        "--datalist_json_path",
        str(datalist_dir),
        "--workspace",
        str(workspace),
        "--job_name",
        JOB_NAME,
        "--n_clients",
        "2",
        "--num_rounds",
        str(NUM_ROUNDS),
        "--roi_size",
        "32",
        "32",
        "24",
        "--infer_roi_size",
        "32",
        "32",
        "24",
        "--init_filters",
        "8",
        "--learning_rate",
        "1e-3",
    ]
