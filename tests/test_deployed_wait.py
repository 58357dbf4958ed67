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
    clock = [0.0]

    class SlowDeployment(FakeDeployment):
        def get_job_status(self, job_id: str) -> str:
            clock[0] += 700  # each poll 700 s after the one before
            return super().get_job_status(job_id)

    monkeypatch.setattr(runner.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(runner.time, "sleep", lambda seconds: clock.__setitem__(0, clock[0] + seconds))
    paths = JobPaths(tmp_path, "job")
    paths.job_dir.mkdir()
    deployment = SlowDeployment(["RUNNING"] * 6 + ["FINISHED:ABORTED"])
    assert runner.wait_for_job(deployment, "abc", paths, heartbeat_s=1800) == "FINISHED:ABORTED"
    lines = capsys.readouterr().out.splitlines()
    # polls 710 s apart (700 s in the call, then a 10 s pause): at 700, 1410, 2120, 2830, 3540, 4250, 4960 s.
    # RUNNING is new at 700 and repeated at 2830 (2130 s >= 1800 s later; 4250 is only 1420 s after that);
    # FINISHED:ABORTED is new at 4960
    assert [line.split(": ", 1)[1] for line in lines] == [
        "RUNNING after 11.7 min",
        "RUNNING after 47.2 min",
        "FINISHED:ABORTED after 82.7 min",
    ]


def test_a_signal_during_the_wait_stops_it_between_two_calls_into_nvflare(tmp_path, monkeypatch):
    """In the deferred block the signal is only recorded; the wait raises it after the NVFlare call returned."""
    import os
    import signal

    import pytest

    class InterruptedDeployment(FakeDeployment):
        def get_job_status(self, job_id: str) -> str:
            if self.calls == 1:
                os.kill(os.getpid(), signal.SIGINT)  # arrives inside NVFlare's call, which must still complete
            return super().get_job_status(job_id)

    paths = JobPaths(tmp_path, "job")
    paths.job_dir.mkdir()
    deployment = InterruptedDeployment(["RUNNING"] * 100)
    with pytest.raises(runner.JobInterrupted) as stopped, runner.stoppable(paths.job_dir, deferred=True):
        runner.wait_for_job(deployment, "abc", paths)
    assert stopped.value.exit_code == 130 and deployment.calls == 2
