"""The performance benchmarks in their tiny smoke modes, so that they keep working (they print figures; nothing
about speed is asserted here)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from benchmarks import round_time
from brats_fl.settings import REPO_DIR

SERVER_LOG = """\
2026-11-27 17:27:53,865 - FedAvg - INFO - [identity=simulator_server] -
--------------------------------------------------------------------------------
                                Round 0 started.
2026-11-27 17:28:01,500 - FedAvg - INFO - [identity=simulator_server] -
                                Round 1 started.
2026-11-27 17:28:04,000 - FedAvg - INFO - something else
2026-11-27 17:28:06,250 - FedAvg - INFO - [identity=simulator_server] -
                                Finished FedAvg.
"""


def test_round_seconds_come_from_the_server_log(tmp_path):
    (tmp_path / "log.txt").write_text(SERVER_LOG)
    assert round_time.round_seconds(tmp_path / "log.txt") == pytest.approx([7.635, 4.75])


@pytest.mark.e2e
def test_round_time_smoke_runs_both_pipelines_and_compares_their_curves(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.round_time", "--smoke", "--workspace", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO_DIR,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    out = done.stdout
    assert "ratio upstream / defaults:" in out
    assert "val_dice curves agree" in out  # same seed, same numbers: the two pipelines train the same model
    assert (tmp_path / "round_time.json").is_file()


def test_gpu_check_smoke_measures_every_figure_on_the_cpu():
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--smoke", "--steps", "1", "--round_time_rounds", "0"],
        capture_output=True,
        text=True,
        cwd=REPO_DIR,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    for line in (
        "training step fp32",
        "training step amp",
        "sliding-window inference",
        "DP-SGD step",
        "federated + DP-SGD",
    ):
        assert line in done.stdout


def test_gpu_check_refuses_to_run_full_size_without_a_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check"], capture_output=True, text=True, cwd=REPO_DIR)
    assert done.returncode == 2 and "no CUDA device" in done.stderr


def test_the_cross_site_demos_jobs_run_at_the_same_time_and_a_failure_is_named_once_all_ended(tmp_path):
    from benchmarks import cross_site_demo

    def step(name: str, code: int) -> list[str]:  # writes its start and end times, then exits with code
        script = (
            "import sys, time; from pathlib import Path; t0 = time.time(); time.sleep(1.0); "
            f"Path({str(tmp_path / name)!r}).write_text(f'{{t0}} {{time.time()}}'); "
            f"print('{name} ran'); sys.exit({code})"
        )
        return [sys.executable, "-c", script]

    seconds = cross_site_demo.run_steps({"a": step("a", 0), "b": step("b", 0)}, tmp_path)
    assert sorted(seconds) == ["a", "b"] and (tmp_path / "a.log").read_text() == "a ran\n"
    (a0, a1), (b0, b1) = ([float(t) for t in (tmp_path / n).read_text().split()] for n in ("a", "b"))
    assert a0 < b1 and b0 < a1  # the two steps overlapped

    with pytest.raises(RuntimeError, match=r"^b failed \(exit 3\) after \d+ s: b ran$"):
        cross_site_demo.run_steps({"a": step("a", 0), "b": step("b", 3)}, tmp_path)
    assert (tmp_path / "a.log").read_text() == "a ran\n"  # the other step was not cut short
