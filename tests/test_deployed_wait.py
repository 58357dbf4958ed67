"""Waiting for a deployed job: each new status printed once, NVFlare's own printing kept off the screen."""

from __future__ import annotations

import brats_fl.runner as runner
from brats_fl.job_results import JobPaths


class FakeDeployment:
    """Answers get_job_status from a script of statuses, printing as NVFlare's admin API does."""

    def __init__(self, statuses: list[str]):
        self.statuses = statuses
        self.calls = 0

    def get_job_status(self, job_id: str) -> str:
        print("Connecting to FLARE ...")
        status = self.statuses[min(self.calls, len(self.statuses) - 1)]
        self.calls += 1
        return status


def test_each_status_is_printed_once_and_nvflare_chatter_goes_to_the_job_log(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runner.time, "sleep", lambda s: None)
    paths = JobPaths(tmp_path, "job")
    paths.job_dir.mkdir()
    statuses = ["SUBMITTED", "RUNNING", "RUNNING", "RUNNING", "FINISHED:COMPLETED"]
    deployment = FakeDeployment(statuses)
    assert runner.wait_for_job(deployment, "abc", paths) == "FINISHED:COMPLETED"
    out = capsys.readouterr().out
    assert [line.split(": ")[1].split(" after")[0] for line in out.splitlines()] == [
        "SUBMITTED",
        "RUNNING",
        "FINISHED:COMPLETED",
    ]
    assert "Connecting" not in out and deployment.calls == 5
    assert (paths.job_dir / runner.ADMIN_LOG).read_text().count("Connecting to FLARE") == 5


def test_a_long_unchanged_status_is_repeated_as_a_heartbeat(tmp_path, monkeypatch, capsys):
    clock = iter(range(0, 10_000, 700))  # each poll 700 s later
    monkeypatch.setattr(runner.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(runner.time, "sleep", lambda s: None)
    paths = JobPaths(tmp_path, "job")
    paths.job_dir.mkdir()
    deployment = FakeDeployment(["RUNNING"] * 6 + ["FINISHED:ABORTED"])
    assert runner.wait_for_job(deployment, "abc", paths, heartbeat_s=1800) == "FINISHED:ABORTED"
    lines = capsys.readouterr().out.splitlines()
    # polls at 700, 1400, ... 4900 s: RUNNING new at 700, repeated at 2800 (2100 s >= 1800 s later, not at 4200:
    # 1400 s), FINISHED:ABORTED new at 4900
    assert [line.split(": ", 1)[1] for line in lines] == [
        "RUNNING after 11.7 min",
        "RUNNING after 46.7 min",
        "FINISHED:ABORTED after 81.7 min",
    ]
