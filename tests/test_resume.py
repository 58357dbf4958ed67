"""The pieces of long runs on hand-made inputs: folding a resumed part into its job, where a job resumes, which
flags a resume refuses, early-stopping state and log lines, the watchdog, and stopping a process tree."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from torch.utils.tensorboard import SummaryWriter

import job
from brats_fl import resume
from brats_fl.fl_components import BratsFedAvg
from brats_fl.job_results import JobPaths, early_stop_of, read_round_metrics
from brats_fl.runner import JobInterrupted, Watchdog, stoppable
from brats_fl.settings import TrainingSettings
from result_stat.tb_events import read_site_scalars


# --- hand-made job folders ------------------------------------------------------------------------------------------
def write_rounds(paths: JobPaths, dice: dict[int, float]) -> None:
    """round_metrics.jsonl as NVFlare 2.9 writes it: the aggregated val_dice and site-1's own value."""
    paths.round_metrics.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        json.dumps(
            {
                "round": r,
                "aggregated_metrics": [{"name": "val_dice", "value": v}],
                "sites": [{"name": "site-1", "metrics": [{"name": "val_dice", "value": v}]}],
            }
        )
        for r, v in dice.items()
    ]
    paths.round_metrics.write_text("\n".join(lines) + "\n")


def write_curve(paths: JobPaths, dice: dict[int, float]) -> None:
    writer = SummaryWriter(log_dir=str(paths.tb_events / "site-1"))
    for r, v in dice.items():
        writer.add_scalar("val_dice", v, global_step=r)
    writer.close()


def write_model(path: Path, marker: float, round_num: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"w": torch.tensor([marker], dtype=torch.float64)}
    torch.save({"model": state, "round": round_num} if round_num is not None else {"model": state}, path)


def model_marker(path: Path) -> float:
    return float(torch.load(path, weights_only=True)["model"]["w"][0])


def make_part(job_paths: JobPaths, start: int, dice: dict[int, float]) -> JobPaths:
    part = resume.part_paths(job_paths, start)
    write_rounds(part, dice)
    write_curve(part, dice)
    best = max((r for r in dice if r > 0), key=lambda r: dice[r])
    write_model(part.best_model, dice[best])
    write_model(part.last_global_model, dice[max(dice)], max(dice))
    return part


@pytest.fixture
def stopped_job(tmp_path) -> JobPaths:
    """A job stopped during round 2: rounds 0 and 1 complete (best round 1, 0.5), and site-1's point of round 2
    already in the curve."""
    paths = JobPaths(tmp_path, "brats18_2")
    write_rounds(paths, {0: 0.1, 1: 0.5})
    write_curve(paths, {0: 0.1, 1: 0.5, 2: 0.45})
    write_model(paths.best_model, 0.5)
    write_model(paths.last_global_model, 1.0, 1)
    return paths


def test_a_part_is_folded_in_with_every_round_once_and_the_better_best_model(stopped_job):
    part = make_part(stopped_job, 2, {2: 0.45, 3: 0.7})
    resume.fold_part_into_job(stopped_job, part, 2)
    assert [r.round for r in read_round_metrics(stopped_job.round_metrics)] == [0, 1, 2, 3]
    curve = read_site_scalars(stopped_job.tb_events)["site-1"]["val_dice"]
    assert [step for step, _ in curve] == [0, 1, 2, 3]  # the interrupted round's point is gone, no step twice
    assert [v for _, v in curve] == pytest.approx([0.1, 0.5, 0.45, 0.7])
    assert model_marker(stopped_job.best_model) == 0.7  # round 3 beat round 1
    assert torch.load(stopped_job.last_global_model, weights_only=True)["round"] == 3
    assert (part.job_dir / resume.FOLDED_MARKER).is_file()


def test_an_earlier_best_model_stays_when_no_later_round_beats_it(stopped_job):
    part = make_part(stopped_job, 2, {2: 0.3, 3: 0.4})
    resume.fold_part_into_job(stopped_job, part, 2)
    assert model_marker(stopped_job.best_model) == 0.5


def test_parts_left_unfolded_by_a_killed_job_py_are_folded_once_in_order(stopped_job):
    make_part(stopped_job, 2, {2: 0.45, 3: 0.6})
    later = make_part(stopped_job, 4, {4: 0.65, 5: 0.8})
    resume.fold_pending_parts(stopped_job)
    resume.fold_pending_parts(stopped_job)  # nothing left to do: no duplicate records or curve points
    assert [r.round for r in read_round_metrics(stopped_job.round_metrics)] == list(range(6))
    assert [s for s, _ in read_site_scalars(stopped_job.tb_events)["site-1"]["val_dice"]] == list(range(6))
    assert model_marker(stopped_job.best_model) == 0.8
    assert (later.job_dir / resume.FOLDED_MARKER).is_file()


def test_the_job_resumes_after_its_last_model_with_the_early_stopping_state(stopped_job):
    write_rounds(stopped_job, {0: 0.1, 1: 0.5, 2: 0.4, 3: 0.45})
    write_model(stopped_job.last_global_model, 3.0, 3)
    start = resume.start_point(stopped_job)
    assert (start.round, start.initial_ckpt) == (4, stopped_job.last_global_model)
    assert (start.best_value, start.rounds_without_improvement) == (0.5, 2)  # rounds 2 and 3 did not beat round 1
    assert start.privacy_report is None


def test_a_job_without_a_saved_model_cannot_resume(tmp_path):
    with pytest.raises(resume.ResumeError, match="last_global_model.pt is missing"):
        resume.start_point(JobPaths(tmp_path, "empty"))


# --- what a resume may change ---------------------------------------------------------------------------------------
def test_flags_that_change_the_meaning_of_the_run_are_refused_and_hardware_flags_are_not():
    settings = TrainingSettings(init_filters=8, dp_mechanism="svt", num_rounds=10)
    check = lambda **given: resume.refuse_changed_settings(
        given, settings, 4, resume.RESUME_MAY_SET, "--resume x", "why"
    )
    check(init_filters=8, n_clients=4, enable_dp=True, num_workers=3, gpu="0", stop_dice=0.9)  # same or allowed
    for given, shown in (
        ({"init_filters": 16}, "--init_filters 16 differs from the job's 8: why"),
        ({"n_clients": 2}, "--n_clients 2 differs from the job's 4"),
        ({"dp_mechanism": "dpsgd"}, "--dp_mechanism dpsgd differs from the job's svt"),
        ({"roi_size": [96, 96, 64]}, "--roi_size 96 96 64 differs from the job's 224 224 144"),
        ({"job_name": "other"}, "--job_name cannot be given here"),
    ):
        with pytest.raises(resume.ResumeError, match=shown):
            check(**given)


def test_resume_keeps_the_jobs_settings_but_takes_this_machines_hardware_and_stopping_rules():
    settings = TrainingSettings(num_workers=4, cache_dir="/old", stop_dice=None)
    changed = resume.apply_resume_flags(settings, {"num_workers": 0, "no_cache": True, "patience": 5}, torch_threads=3)
    assert (changed.num_workers, changed.cache_dir, changed.patience, changed.torch_threads) == (0, None, 5, 3)
    assert changed.num_rounds == settings.num_rounds and changed.stop_dice is None


def test_the_resume_command_repeats_only_what_the_job_folder_does_not_keep(tmp_path):
    explicit = {"gpu": "0,1", "threads": 2, "no_final_eval": True, "init_filters": 8, "stop_after_round": 3}
    assert resume.resume_command(tmp_path / "my job", explicit) == (
        f"python job.py --resume '{tmp_path}/my job' --gpu 0,1 --threads 2 --no_final_eval"
    )


@pytest.mark.parametrize(
    "argv, pattern",
    [
        (["--resume", "/nonexistent/job"], "not the folder of a job made by job.py"),
        (["--resume", "/x", "--checkpoint", "/y.pt"], "--resume and --checkpoint: give one"),
        (["--stop_after_round", "-1"], "--stop_after_round -1: need a round number >= 0"),
        (["--stop_dice", "1.5"], "--stop_dice 1.5: need a Dice in (0, 1]"),
        (["--patience", "0"], "--patience 0: need >= 1 round"),
        (["--checkpoint", "/nonexistent.pt"], "--checkpoint /nonexistent.pt: no such file"),
    ],
)
def test_bad_long_run_flags_exit_2_with_one_line(argv, pattern, capsys, tmp_path):
    assert job.main([*argv, "--workspace", str(tmp_path / "ws")]) == job.EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and pattern in err, err


# --- early stopping -------------------------------------------------------------------------------------------------
class Metrics:
    def __init__(self, dice: float):
        self.metrics = {"val_dice": dice}


def controller(**kwargs) -> BratsFedAvg:
    return BratsFedAvg(num_clients=2, num_rounds=10, **kwargs)


def test_patience_counts_on_from_the_rounds_before_a_resume():
    fedavg = controller(stop_cond="val_dice > 1", patience=3, best_value=0.5, rounds_without_improvement=2)
    fedavg.current_round = 7
    assert not fedavg.is_curr_model_better(Metrics(0.49))  # a third round without improvement
    assert fedavg.should_stop({"val_dice": 0.49})


def test_round_zero_neither_sets_the_best_value_nor_stops_the_job():
    fedavg = controller(stop_cond="val_dice >= 0.2")
    fedavg.current_round = 0
    assert not fedavg.is_curr_model_better(Metrics(0.9)) and not fedavg.should_stop({"val_dice": 0.9})
    fedavg.current_round = 1
    assert fedavg.is_curr_model_better(Metrics(0.3)) and fedavg.should_stop({"val_dice": 0.3})


def test_the_rule_that_stopped_a_job_is_read_from_nvflares_log(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text(
        "... FedAvg - INFO - Round 3 global metrics: {'val_dice': 0.4}\n"
        "... FedAvg - INFO - Exceeded the number of FL rounds (2) without improvements\n"
        "... FedAvg - INFO - Stopping at round=3 out of total_rounds=10.\n"
    )
    assert early_stop_of(log) == ("--patience (2 rounds without a better val_dice)", 3)
    log.write_text(
        "x - Early stop condition satisfied: val_dice >= 0.8\nx - Stopping at round=5 out of total_rounds=600.\n"
    )
    assert early_stop_of(log) == ("--stop_dice (val_dice >= 0.8)", 5)
    log.write_text("x - Round 5 started.\n")
    assert early_stop_of(log) is None and early_stop_of(tmp_path / "absent.txt") is None


# --- the watchdog and process-tree stopping -------------------------------------------------------------------------
FATAL = "2026-01-01 - ClientRunner - ERROR - Stopped ClientRunner due to FATAL_SYSTEM_ERROR: cannot find client.py\n"


def test_the_watchdog_reports_a_fatal_site_error_once_its_line_is_complete(tmp_path):
    old = tmp_path / "site-1" / "log.txt"
    old.parent.mkdir()
    old.write_text(FATAL)  # an earlier run's log: written before the watchdog started
    os.utime(old, (time.time() - 60, time.time() - 60))
    watchdog = Watchdog(tmp_path)
    assert watchdog.fatal_error() is None
    log = tmp_path / "site-2" / "log.txt"
    log.parent.mkdir()
    log.write_text("a normal line\n" + FATAL[:40])  # the fatal line is still being written
    assert watchdog.fatal_error() is None
    with open(log, "a") as f:
        f.write(FATAL[40:])
    assert watchdog.fatal_error() == "site-2: Stopped ClientRunner due to FATAL_SYSTEM_ERROR: cannot find client.py"


def test_leaving_the_block_stops_descendants_even_those_in_sessions_of_their_own(tmp_path):
    marker = tmp_path / "job"
    marker.mkdir()
    script = (
        "import subprocess, sys, time; "
        f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)', '{marker}'], "
        "start_new_session=True); "
        "time.sleep(300)"
    )  # a child, and a grandchild in a session of its own (as NVFlare's simulator starts its processes); a Python
    # sleeper because coreutils' sleep refuses the extra argument that names the job
    with pytest.raises(JobInterrupted) as stopped, stoppable(marker):
        child = subprocess.Popen([sys.executable, "-c", script])
        deadline = time.monotonic() + 20
        while len(psutil.Process(child.pid).children()) < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        tree = [psutil.Process(child.pid), *psutil.Process(child.pid).children(recursive=True)]
        assert len(tree) == 2
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the signal interrupts this
    assert stopped.value.exit_code == 143
    _, alive = psutil.wait_procs(tree, timeout=1)
    assert not alive
    assert signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN  # handlers restored
