"""A finished job is never wiped by running its command again: NVFlare's simulator would delete its folder at start."""

from __future__ import annotations

import subprocess

import pytest
import torch
from tiny_job import REPO_DIR, tiny_job_command, tiny_job_paths

from brats_fl.job_results import JobPaths
from brats_fl.run_options import run_from_argv
from brats_fl.settings import EXIT_BAD_INPUT, InputError

TINY = ["--roi_size", "32", "32", "24", "--infer_roi_size", "32", "32", "24", "--num_rounds", "2", "--n_clients", "2"]


def snapshot(folder) -> dict:
    """Every file under folder, with its size and modification time."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


def test_running_a_finished_jobs_command_again_stops_at_once_and_touches_nothing(tmp_path_factory, tiny_federation):
    job = tiny_job_paths(tmp_path_factory, *tiny_federation)
    before = snapshot(job.job_dir)
    command = tiny_job_command(job.workspace_root, *tiny_federation)
    again = subprocess.run(command, capture_output=True, text=True, cwd=REPO_DIR, timeout=120)
    assert again.returncode == EXIT_BAD_INPUT, again.stderr[-2000:]
    assert again.stderr.strip() == (
        f"error: {job.job_dir} holds an earlier run of this job (best_FL_global_model.pt): if it stopped early, "
        f"continue it with --resume {job.job_dir}; start it afresh with --overwrite (deletes that folder); or "
        "choose another --job_name"
    )
    assert snapshot(job.job_dir) == before


def stopped_job(workspace, name: str) -> JobPaths:
    """A job folder holding only a last global model, as a job stopped after round 0 leaves it."""
    paths = JobPaths(workspace, name)
    paths.last_global_model.parent.mkdir(parents=True)
    torch.save({"model": {}, "round": 0}, paths.last_global_model)
    return paths


def test_a_stopped_job_is_refused_too_and_overwrite_or_another_name_starts_afresh(tiny_federation, tmp_path):
    data_dir, datalist_dir = tiny_federation
    base = ["--dataset_base_dir", str(data_dir), "--datalist_json_path", str(datalist_dir), *TINY]
    paths = stopped_job(tmp_path / "ws", "brats18_2")
    with pytest.raises(InputError, match=r"brats18_2 holds an earlier run of this job \(last_global_model.pt\)"):
        run_from_argv([*base, "--workspace", str(tmp_path / "ws")])
    assert run_from_argv([*base, "--workspace", str(tmp_path / "ws"), "--overwrite"]).job == paths
    assert run_from_argv([*base, "--workspace", str(tmp_path / "ws"), "--job_name", "other"]).job.job_name == "other"
    assert paths.last_global_model.is_file()  # preparing a run writes nothing into the job's folder
