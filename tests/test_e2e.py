"""End-to-end: the real NVFlare simulator on tiny synthetic data (2 clients x 2 rounds; ~1 minute each)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from recording_filter import UpdateRecorder

import job
from brats_fl.job_results import JobPaths, summarize_job
from brats_fl.privacy.report import TB_TAG
from brats_fl.run_options import run_from_argv
from brats_fl.settings import EXIT_FAILED, REPO_DIR
from result_stat.tb_events import read_site_scalars

pytestmark = pytest.mark.e2e
VALIDATION_TAGS = {"val_dice", "val_dice_tc", "val_dice_wt", "val_dice_et"}
TRAINING_TAGS = {"train_loss", "train_steps"}


def tiny_args(data_dir: Path, datalist_dir: Path, workspace: Path, *extra: str) -> list[str]:
    return [
        "--dataset_base_dir",
        str(data_dir),
        "--datalist_json_path",
        str(datalist_dir),
        "--workspace",
        str(workspace),
        "--num_rounds",
        "2",
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
        "--no_final_eval",  # tested with the shared tiny job (tests/test_final_evaluation.py)
        *extra,
    ]


def run_recorded(argv: list[str], record_dir: Path):
    """Run the job as job.py would (without DP), recording what the sites send and what the server receives."""
    run = run_from_argv(argv)
    recipe = job.training_recipe(run)
    recipe.add_client_output_filter(UpdateRecorder(str(record_dir), "raw"), tasks=["train"])
    recipe.add_server_input_filter(UpdateRecorder(str(record_dir), "received"), tasks=["train"])
    outcome = run.env.run(recipe, run.job, run.n_clients, run.threads, run.gpu)
    assert outcome.error is None and outcome.interrupted is None, outcome
    return run


def load_update(record_dir: Path, tag: str, site: str, round_num: int) -> tuple[dict, dict]:
    stem = record_dir / f"{tag}_{site}_round{round_num}"
    with np.load(f"{stem}.npz") as z:
        arrays = {k: z[k] for k in z.files}
    return arrays, json.loads(Path(f"{stem}.json").read_text())


def recorded_updates(record_dir: Path):
    """(site, round, raw update, its meta, update the server received, its meta) of the 2-site, 2-round runs."""
    for site in ("site-1", "site-2"):
        for r in (0, 1):
            yield (site, r, *load_update(record_dir, "raw", site, r), *load_update(record_dir, "received", site, r))


def assert_complete_job(run, n_sites: int, training_tags: set[str] = TRAINING_TAGS):
    """Best model, and TensorBoard curves: the validating site (site-1) logs the Dice, every site its training."""
    summary = summarize_job(run.job.workspace_root, run.job.job_name, 2, ["site-1"])
    assert summary.paths.best_model.is_file()
    assert summary.best_round == 1
    assert 0.0 <= summary.best_metrics["val_dice"] <= 1.0
    scalars = {
        site: {t: v for t, v in tags.items() if t != TB_TAG}
        for site, tags in read_site_scalars(summary.paths.tb_events).items()
    }  # the privacy figure is the server's, not theirs
    assert sorted(scalars) == [f"site-{i}" for i in range(1, n_sites + 1)]
    assert set(scalars["site-1"]) == VALIDATION_TAGS | training_tags
    assert [step for step, _ in scalars["site-1"]["val_dice"]] == [0, 1]  # global step = FL round
    for site in list(scalars)[1:]:
        assert set(scalars[site]) == training_tags  # validated once, at site-1
    return summary


def test_federated_two_clients_without_dp(tiny_federation, tmp_path):
    data_dir, datalist_dir = tiny_federation
    # FedProx on: its proximal term runs inside the clients' training loop (mu small enough not to matter here)
    argv = tiny_args(data_dir, datalist_dir, tmp_path / "ws", "--n_clients", "2", "--fedproxloss_mu", "0.01")
    run = run_recorded(argv, tmp_path / "rec")
    assert run.job.job_name == "brats18_2"
    assert_complete_job(run, 2)
    for _site, _round, raw, raw_meta, received, _ in recorded_updates(tmp_path / "rec"):
        assert raw_meta["data_kind"] == "WEIGHT_DIFF"  # the clients send differences, not weights
        assert all(np.array_equal(raw[k], received[k]) for k in raw)  # no DP: what is sent arrives


def test_centralised_single_client_from_the_command_line(tiny_federation, tmp_path):
    data_dir, datalist_dir = tiny_federation
    argv = tiny_args(data_dir, datalist_dir, tmp_path / "ws", "--n_clients", "1")
    done = subprocess.run([sys.executable, "job.py", *argv], capture_output=True, text=True, cwd=REPO_DIR)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Job brats18_1 finished: 2 rounds" in done.stdout
    assert "best global val_dice" in done.stdout and "tensorboard --logdir" in done.stdout
    paths = JobPaths(tmp_path / "ws", "brats18_1")
    assert paths.best_model.is_file()
    # the single client trained on site-All.json: 8 cases = 8 steps per round
    scalars = read_site_scalars(paths.tb_events)
    assert [v for _, v in scalars["site-1"]["train_steps"]] == [8.0, 8.0]


def test_a_crashing_client_fails_the_job(tiny_federation, tmp_path, capsys):
    """A case that passes the cheap checks but breaks training (label 3 in a BraTS 2018-style case) must make
    job.py exit non-zero with a message, not print a success summary."""
    import shutil

    import nibabel as nib

    data_dir, datalist_dir = tiny_federation
    broken = tmp_path / "data"
    shutil.copytree(data_dir, broken)
    first = json.loads((datalist_dir / "site-2.json").read_text())["training"][0]["label"]
    seg = nib.load(broken / first)
    label = np.asarray(seg.dataobj).copy()
    label[label == 4] = 3
    nib.save(nib.Nifti1Image(label, seg.affine), broken / first)
    argv = tiny_args(broken, broken / "datalist", tmp_path / "ws", "--n_clients", "2")
    code = job.main(argv)
    out, err = capsys.readouterr()
    assert code == EXIT_FAILED
    assert "error: job brats18_2 failed: site-2: ValueError:" in err
    assert Path(first).name in err and "label values [3]" in err  # names the file and the offending value
    assert "finished:" not in out
