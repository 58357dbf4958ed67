"""End-to-end: long-run behaviour of job.py in the real NVFlare simulator on tiny data (2 sites, 3-4 rounds).

Stopping by signal (every process gone, exit 130/143, the resume command printed), resuming to the end with the
rounds, curves and privacy ledger intact, a crashed site resumed once the cause is fixed, and early stopping.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from test_e2e import tiny_args

from brats_fl.job_results import JobPaths, read_round_metrics
from brats_fl.privacy import dpsgd
from brats_fl.privacy import report as privacy_report
from brats_fl.settings import EXIT_BAD_INPUT, EXIT_FAILED, REPO_DIR
from result_stat.tb_events import read_site_scalars

pytestmark = pytest.mark.e2e
SITES = ("site-1", "site-2")
STOP_SECONDS = 30  # every process of a stopped job must be gone by then


def start_job(argv: list[str], log: Path) -> subprocess.Popen:
    """job.py in its own session (as from a terminal: SIGINT is not ignored), output to log."""
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "job.py", *argv], cwd=REPO_DIR, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip


def wait_for_text(log: Path, text: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log.read_text():
            return
        assert proc.poll() is None, (
            f"job.py ended ({proc.returncode}) before printing {text!r}:\n{log.read_text()[-3000:]}"
        )
        time.sleep(0.3)
    proc.kill()
    pytest.fail(f"no {text!r} within {timeout} s:\n{log.read_text()[-3000:]}")


def stop_with(proc: subprocess.Popen, signum: int, job_dir: Path) -> int:
    """Send signum to job.py alone; returns its exit code once it and every process it started are gone."""
    started = psutil.Process(proc.pid).children(recursive=True)
    assert started, "the simulator runs processes of its own"
    proc.send_signal(signum)
    t0 = time.monotonic()
    code = proc.wait(timeout=STOP_SECONDS)
    _, alive = psutil.wait_procs(started, timeout=max(0.0, STOP_SECONDS - (time.monotonic() - t0)))
    assert not alive, [p.cmdline() for p in alive]
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(job_dir) in " ".join(p.info["cmdline"] or [])]
    return code


def write_label_value_3(label: Path) -> None:
    """Turn the case's ET label (4) into 3, a value BraTS 2018 labels never hold."""
    import nibabel as nib
    import numpy as np

    seg = nib.load(label)
    values = np.asarray(seg.dataobj).copy()
    values[values == 4] = 3
    nib.save(nib.Nifti1Image(values, seg.affine), label)


def rounds_of(paths: JobPaths) -> list[int]:
    return [r.round for r in read_round_metrics(paths.round_metrics)]


def assert_every_round_once(paths: JobPaths, num_rounds: int) -> None:
    """The round records and the validating site's curve hold rounds 0..num_rounds-1, each once; best model kept."""
    assert rounds_of(paths) == list(range(num_rounds))
    curves = read_site_scalars(paths.tb_events)
    assert [step for step, _ in curves["site-1"]["val_dice"]] == list(range(num_rounds))
    assert paths.best_model.is_file() and paths.last_global_model.is_file()


def test_signals_stop_every_process_and_resume_completes_with_the_svt_ledger_intact(tiny_federation, tmp_path):
    data_dir, datalist_dir = tiny_federation
    argv = tiny_args(data_dir, datalist_dir, tmp_path / "ws", "--n_clients", "2", "--num_rounds", "4", "--enable_dp")
    paths = JobPaths(tmp_path / "ws", "brats18_2_dp")

    first = start_job(argv, tmp_path / "first.log")
    wait_for_text(tmp_path / "first.log", "[site-1] round 1:", first)  # round 0 is complete
    assert stop_with(first, signal.SIGINT, paths.job_dir) == 130
    printed = (tmp_path / "first.log").read_text()
    assert "Stopped by SIGINT after round " in printed
    assert f"resume with: python job.py --resume {paths.job_dir}" in printed

    second = start_job(["--resume", str(paths.job_dir), "--no_final_eval"], tmp_path / "second.log")
    wait_for_text(tmp_path / "second.log", "Resuming job brats18_2_dp at round ", second)
    wait_for_text(tmp_path / "second.log", "[site-1] round ", second)
    assert stop_with(second, signal.SIGTERM, paths.job_dir) == 143
    assert "Stopped by SIGTERM after round " in (tmp_path / "second.log").read_text()

    done = subprocess.run(
        [sys.executable, "job.py", "--resume", str(paths.job_dir), "--no_final_eval"],
        capture_output=True, text=True, cwd=REPO_DIR,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Job brats18_2_dp finished: 4 rounds" in done.stdout
    assert_every_round_once(paths, 4)
    report = privacy_report.load_report(paths.privacy_report)
    privacy_report.check_report(report, list(SITES), 4)
    for site in SITES:
        rows = report["sites"][site]["rounds"]
        assert {r["round"] for r in rows} == {0, 1, 2, 3}  # a release repeated after a stop stays counted too
        assert report["sites"][site]["epsilon"] == pytest.approx(sum(r["epsilon"] for r in rows), rel=1e-12)


def test_stop_after_round_then_resume_spends_exactly_the_uninterrupted_dpsgd_epsilon(tiny_federation, tmp_path):
    data_dir, datalist_dir = tiny_federation
    dp = ("--enable_dp", "--dp_mechanism", "dpsgd", "--dp_target_epsilon", "6")
    argv = tiny_args(data_dir, datalist_dir, tmp_path / "ws", "--n_clients", "2", "--num_rounds", "4", *dp)
    paths = JobPaths(tmp_path / "ws", "brats18_2_dpsgd")

    first = subprocess.run(
        [sys.executable, "job.py", *argv, "--stop_after_round", "1"], capture_output=True, text=True, cwd=REPO_DIR
    )
    assert first.returncode == 0, first.stderr[-3000:]
    assert "Stopped as --stop_after_round asked after round 1 of rounds 0-3" in first.stdout
    assert rounds_of(paths) == [0, 1]

    resumed = subprocess.run(
        [sys.executable, "job.py", "--resume", str(paths.job_dir), "--no_final_eval"],
        capture_output=True, text=True, cwd=REPO_DIR,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_every_round_once(paths, 4)
    report = privacy_report.load_report(paths.privacy_report)
    privacy_report.check_report(report, list(SITES), 4)
    plan = dpsgd.plan_dpsgd(4, 4, 1, 6.0, None, 1.0)  # 4 training cases per tiny site, 4 rounds of 1 epoch
    for site in SITES:
        assert report["sites"][site]["epsilon"] == dpsgd.dpsgd_round_record(plan, 3)["epsilon"]
        assert [r["noise_multiplier"] for r in report["sites"][site]["rounds"]] == [plan.noise_multiplier] * 4


def test_a_site_crash_is_resumed_once_fixed_and_early_stopping_ends_the_job(tiny_federation, tmp_path):
    data_dir, datalist_dir = tiny_federation
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    argv = tiny_args(
        data, data / "datalist", tmp_path / "ws", "--n_clients", "2", "--num_rounds", "6", "--no_cache",
        "--stop_dice", "0.2",
    )  # fmt: skip
    paths = JobPaths(tmp_path / "ws", "brats18_2")
    first = subprocess.run(
        [sys.executable, "job.py", *argv, "--stop_after_round", "0"], capture_output=True, text=True, cwd=REPO_DIR
    )
    assert first.returncode == 0, first.stderr[-3000:]

    label = data / json.loads((data / "datalist" / "site-2.json").read_text())["training"][0]["label"]
    original = label.read_bytes()
    write_label_value_3(label)  # passes job.py's checks, fails the site's preprocessing at round 1
    resume = [sys.executable, "job.py", "--resume", str(paths.job_dir)]
    crashed = subprocess.run(resume, capture_output=True, text=True, cwd=REPO_DIR)
    assert crashed.returncode == EXIT_FAILED, crashed.stderr[-3000:]
    assert "error: job brats18_2 failed: site-2: ValueError:" in crashed.stderr and label.name in crashed.stderr
    assert f"after round 0 of rounds 0-5; last global model: {paths.last_global_model}" in crashed.stderr
    assert f"resume with: python job.py --resume {paths.job_dir}" in crashed.stderr

    label.write_bytes(original)
    fixed = subprocess.run([*resume, "--no_final_eval"], capture_output=True, text=True, cwd=REPO_DIR)
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    assert "stopped early by --stop_dice (val_dice >= 0.2) at round 1" in fixed.stdout  # round 1's Dice: 0.36
    assert not paths.final_evaluation_table.exists()  # a flag given to --resume is honoured
    assert_every_round_once(paths, 2)
    again = subprocess.run(resume, capture_output=True, text=True, cwd=REPO_DIR)
    assert again.returncode == EXIT_BAD_INPUT and "stopped early at round 1" in again.stderr
