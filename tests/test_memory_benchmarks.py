"""benchmarks/memory_points.py and benchmarks/soak.py: their figures from hand-made samples, and tiny smoke runs so
that they keep working (nothing about this machine's memory is asserted)."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest

from benchmarks import soak
from brats_fl.settings import REPO_DIR


def samples_growing(mb_per_round: float, rounds: int, label: str = "site-1 process") -> list[dict]:
    """Three samples per round of one process whose RSS grows by mb_per_round, plus a noisy first round."""
    rows = []
    for r in range(rounds):
        for k in range(3):
            rss = 500.0 + mb_per_round * r + k * 0.1 + (50.0 if r == 0 else 0.0)
            rows.append({"time": 3.0 * r + k, "round": r, "label": label, "pid": 7, "rss_mb": rss})
    return rows


def test_growth_per_round_is_the_slope_after_the_skipped_rounds():
    table = soak.growth_table(samples_growing(2.0, 30) + samples_growing(0.0, 30, "server"), skip_rounds=10)
    by_name = {row["process"]: row for row in table}
    assert by_name["site-1 process"]["mb_per_round"] == pytest.approx(2.0)
    assert by_name["server"]["mb_per_round"] == pytest.approx(0.0, abs=1e-9)
    assert by_name["site-1 process"]["peak_mb"] == pytest.approx(500.0 + 2.0 * 29 + 0.2)
    assert by_name["server"]["rounds"] == 30


def test_processes_of_one_label_running_together_are_summed_and_too_few_rounds_give_no_slope():
    two_workers = samples_growing(0.0, 5, "loader") + samples_growing(0.0, 5, "loader")
    (row,) = soak.growth_table(two_workers, skip_rounds=1)
    assert row["peak_mb"] == pytest.approx(2 * (500.0 + 50.0 + 0.2))
    assert row["mb_per_round"] == pytest.approx(0.0, abs=1e-9)
    (short,) = soak.growth_table(samples_growing(1.0, 3), skip_rounds=0)
    assert short["mb_per_round"] is None


def test_the_goal_verdict(capsys):
    assert not soak.print_table(soak.growth_table(samples_growing(1.5, 20), 10), 19, 10)
    assert "ABOVE GOAL" in capsys.readouterr().out
    assert soak.print_table(soak.growth_table(samples_growing(0.5, 20), 10), 19, 10)


def test_round_numbers_come_from_the_server_log(tmp_path):
    log = tmp_path / "log.txt"
    assert soak.current_round(log) is None
    log.write_text("x\n      Round 0 started.   \ny\n      Round 1 started.\n")
    assert soak.current_round(log) == 1


def test_memory_points_smoke_measures_each_point_in_its_own_process(tmp_path):
    out = tmp_path / "points.csv"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory_points", "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO_DIR,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = list(csv.DictReader(open(out)))
    assert [r["kind"] for r in rows] == ["train", "val"]
    for row in rows:  # a whole process with torch imported, and more than it had after the imports
        assert float(row["peak_rss_mb"]) > float(row["rss_after_imports_mb"]) > 50
    again = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory_points", "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO_DIR,
    )
    assert again.returncode == 2 and "--overwrite" in again.stderr


@pytest.mark.e2e
def test_soak_smoke_samples_every_process_of_a_real_job(tiny_federation, tmp_path):
    data_dir, datalist_dir = tiny_federation
    tiny = f"--dataset_base_dir {data_dir} --datalist_json_path {datalist_dir} --roi_size 32 32 24"
    soak_command = [
        sys.executable,
        "-m",
        "benchmarks.soak",
        "--smoke",
        "--num_rounds",
        "3",
        "--workspace",
        str(tmp_path),
    ]
    done = subprocess.run(
        [*soak_command, "--job_flags", f"{tiny} --infer_roi_size 32 32 24 --init_filters 8"],
        capture_output=True,
        text=True,
        cwd=REPO_DIR,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "rounds reached: 2" in done.stdout
    for name in ("job.py", "site-1 process", "site-2 process"):
        assert name in done.stdout
    assert (tmp_path / "soak_samples.csv").is_file() and (tmp_path / "soak.json").is_file()
