"""The memory model (brats_fl/memory.py) against its measurements, and the pre-flight check on hand-made machines."""

from __future__ import annotations

import csv
from types import SimpleNamespace

import pytest

import job
from brats_fl import memory
from brats_fl.memory import AtOnce, Machine, SiteWork, check_memory, gpu_placement, sites_at_once
from brats_fl.settings import DEMO_OVERRIDES, DEMO_SHAPE, EXIT_BAD_INPUT, REPO_DIR, TrainingSettings

CSV = REPO_DIR / "figs" / "memory_points_cpu.csv"
GB = 1024.0
SITES = ["site-1", "site-2", "site-3", "site-4"]
PAPER = SiteWork(16, (224, 224, 144), (240, 240, 160), memory.BRATS_VOLUME)
DEMO = SiteWork(8, (32, 32, 32), (64, 64, 48), DEMO_SHAPE)


def measured_rows() -> list[dict]:
    with open(CSV, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------------------------
# The model and its fit
# ---------------------------------------------------------------------------------------------------------------
def test_coefficients_in_the_code_are_the_least_squares_fit_of_the_measured_csv():
    train, val = memory.fit_coefficients(measured_rows())
    assert train == pytest.approx(memory.TRAIN_FIT, rel=1e-3)
    assert val == pytest.approx(memory.VAL_FIT, rel=1e-3)


def test_the_model_reproduces_every_measured_point_within_its_stated_error():
    for row in measured_rows():
        measured = float(row["peak_rss_mb"])
        assert memory.predicted_mb(row) == pytest.approx(measured, rel=memory.FIT_MAX_RELATIVE_ERROR), row


def test_the_estimate_grows_with_the_crop_the_width_and_the_window():
    assert PAPER.host_mb() > SiteWork(16, (128, 128, 96), (240, 240, 160), memory.BRATS_VOLUME).host_mb()
    assert SiteWork(8, (224, 224, 144), (64, 64, 48), DEMO_SHAPE).train_mb() < PAPER.train_mb()
    assert SiteWork(16, (32, 32, 32), (128, 128, 96), memory.BRATS_VOLUME).val_mb() < PAPER.val_mb()
    assert DEMO.host_mb() < 2 * GB < PAPER.host_mb()


def test_mixed_precision_lowers_only_the_gpu_estimate_and_a_validating_site_needs_no_training_step():
    amp = SiteWork(16, (224, 224, 144), (240, 240, 160), memory.BRATS_VOLUME, amp=True)
    assert amp.gpu_mb() < PAPER.gpu_mb() and amp.host_mb() == PAPER.host_mb()
    scoring = SiteWork(16, (224, 224, 144), (240, 240, 160), memory.BRATS_VOLUME, trains=False)
    assert scoring.train_mb() == 0 and scoring.host_mb() == pytest.approx(memory.SITE_OVERHEAD_MB + PAPER.val_mb())
    assert PAPER.host_mb(validating=True) - PAPER.host_mb() == pytest.approx(PAPER.val_mb() - memory.VAL_FIT[0])


def test_site_work_of_settings_uses_the_demo_volume_only_for_the_demo_data():
    demo = TrainingSettings(**DEMO_OVERRIDES, dataset_base_dir=f"/tmp/ws/{memory.DEMO_DATA_FOLDER}")
    assert SiteWork.of(demo, on_gpu=False).volume == DEMO_SHAPE
    real = TrainingSettings(dataset_base_dir="/data/brats18")
    assert SiteWork.of(real, on_gpu=False) == PAPER
    assert SiteWork.of(real, on_gpu=True).amp and not SiteWork.of(real, on_gpu=False).amp


# ---------------------------------------------------------------------------------------------------------------
# Where the sites run
# ---------------------------------------------------------------------------------------------------------------
def test_sites_are_dealt_round_robin_over_the_gpus():
    assert gpu_placement(SITES, [0, 1]) == {0: ["site-1", "site-3"], 1: ["site-2", "site-4"]}
    assert gpu_placement(SITES[:3], [2, 5]) == {2: ["site-1", "site-3"], 5: ["site-2"]}
    assert gpu_placement(SITES, [0]) == {0: SITES}


@pytest.mark.parametrize(
    "threads, gpus, env, expected",
    [
        (4, [], "sim", AtOnce(4, {})),
        (2, [], "sim", AtOnce(2, {})),
        (4, [0], "sim", AtOnce(4, {0: 4})),
        (4, [0, 1], "sim", AtOnce(2, {0: 1, 1: 1})),  # the simulator: one site per GPU group at a time
        (1, [0, 1], "poc", AtOnce(4, {0: 2, 1: 2})),  # POC: every site its own process, all running
        (1, [], "poc", AtOnce(4, {})),
    ],
)
def test_sites_running_at_once(threads, gpus, env, expected):
    assert sites_at_once(SITES, threads, gpus, env) == expected


# ---------------------------------------------------------------------------------------------------------------
# The check, on machines passed in
# ---------------------------------------------------------------------------------------------------------------
def test_the_demo_fits_a_small_machine_and_says_so():
    check = check_memory(DEMO, AtOnce(4, {}), Machine(8 * GB, {}), on_gpu=False)
    assert check.problem is None
    assert "each site that trains needs about" in check.lines[0] and "available 8.0 GB" in check.lines[1]


def test_four_paper_sites_at_once_do_not_fit_24_gb_and_the_line_gives_the_ways_out():
    check = check_memory(PAPER, AtOnce(4, {}), Machine(24 * GB, {}), on_gpu=False)
    # one site validating while it trains, three training: the job's processes besides
    need = memory.JOB_OVERHEAD_MB + PAPER.host_mb(validating=True) + 3 * PAPER.host_mb()
    assert check.problem.startswith(f"memory: 4 site(s) at once need about {memory.gb(need)}, 24.0 GB of memory")
    for way in ("--threads 2", "--gpu 0,1", "--roi_size 128 128 96", "no --no_amp", "--skip_memory_check"):
        assert way in check.problem
    assert "\n" not in check.problem
    assert check_memory(PAPER, AtOnce(2, {}), Machine(24 * GB, {}), on_gpu=False).problem is None
    assert check_memory(PAPER, AtOnce(3, {}), Machine(24 * GB, {}), on_gpu=False).problem is not None


def test_on_gpus_each_card_is_checked_with_the_sites_it_runs_at_once():
    amp = SiteWork(16, (224, 224, 144), (240, 240, 160), memory.BRATS_VOLUME, amp=True)
    small_cards = Machine(200 * GB, {0: 20 * GB, 1: 20 * GB})
    assert check_memory(amp, AtOnce(2, {0: 1, 1: 1}), small_cards, on_gpu=True).problem is None
    crowded = check_memory(amp, AtOnce(4, {0: 4}), Machine(200 * GB, {0: 20 * GB}), on_gpu=True)
    assert crowded.problem.startswith("memory: GPU 0: 4 site(s) at once need about")
    big_card = Machine(200 * GB, {0: 140 * GB})
    assert check_memory(amp, AtOnce(4, {0: 4}), big_card, on_gpu=True).problem is None
    unseen = check_memory(amp, AtOnce(1, {3: 1}), Machine(200 * GB, {}), on_gpu=True)
    assert "  GPU 3: not visible to torch here; not checked" in unseen.lines


def fake_run(env: str = "sim", gpu: str | None = None, threads: int = 4, given: dict | None = None):
    return SimpleNamespace(
        settings=TrainingSettings(dataset_base_dir="/data/brats18"),
        checkpoint=None,
        gpu=gpu,
        env=SimpleNamespace(name=env),
        sites=SITES,
        threads=threads,
        given=given or {},
    )


def test_preflight_stops_a_run_that_does_not_fit_unless_skipped(monkeypatch, capsys):
    monkeypatch.setattr(memory, "machine_now", lambda gpu_ids: Machine(24 * GB, {}))
    monkeypatch.setattr(memory, "cuda_visible", lambda: False)
    assert memory.memory_preflight(fake_run()).startswith("memory: 4 site(s) at once")
    assert "Memory estimate" in capsys.readouterr().out
    assert memory.memory_preflight(fake_run(given={"skip_memory_check": True})) is None
    assert "starting anyway: --skip_memory_check" in capsys.readouterr().err
    assert memory.memory_preflight(fake_run(threads=1)) is None


def test_preflight_in_prod_prints_the_estimate_per_site_only(monkeypatch, capsys):
    monkeypatch.setattr(memory, "machine_now", lambda gpu_ids: pytest.fail("prod's sites are other machines"))
    assert memory.memory_preflight(fake_run(env="prod")) is None
    assert "the sites are other machines: not checked here" in capsys.readouterr().out


def test_preflight_checks_the_gpus_given(monkeypatch):
    monkeypatch.setattr(memory, "machine_now", lambda gpu_ids: Machine(200 * GB, {g: 20 * GB for g in gpu_ids}))
    assert memory.memory_preflight(fake_run(gpu="0,1")) is None  # one AMP paper site per card at a time
    assert memory.memory_preflight(fake_run(gpu="0")).startswith("memory: GPU 0: 4 site(s) at once")


def test_job_py_stops_with_exit_2_and_one_line_before_anything_runs(capsys, tiny_federation, tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "machine_now", lambda gpu_ids: Machine(0.5 * GB, {}))
    monkeypatch.setattr(memory, "cuda_visible", lambda: False)
    data_dir, datalist_dir = tiny_federation
    workspace = tmp_path / "ws"
    code = job.main(
        ["--dataset_base_dir", str(data_dir), "--datalist_json_path", str(datalist_dir), "--workspace", str(workspace)]
        + ["--n_clients", "2", "--roi_size", "32", "32", "24", "--infer_roi_size", "32", "32", "24"]
    )
    captured = capsys.readouterr()
    assert code == EXIT_BAD_INPUT
    assert captured.err.startswith("error: memory: 2 site(s) at once need about") and captured.err.count("\n") == 1
    assert "0.5 GB of memory is available" in captured.err and "--skip_memory_check" in captured.err
    assert "Memory estimate" in captured.out
    assert not workspace.exists(), "the check runs before anything is written"
