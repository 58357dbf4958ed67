"""Bad input is stopped before any simulator starts: exit code 2, one clear line, no workspace touched."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import job
from brats_fl import cli
from brats_fl.run_options import new_job_name, run_from_argv
from brats_fl.settings import DEMO_OVERRIDES, EXIT_BAD_INPUT, REPO_DIR
from dataset_brats18.datalist import brats18_case_entry, write_datalist

TINY = ["--roi_size", "32", "32", "24", "--infer_roi_size", "32", "32", "24", "--num_rounds", "2"]


@pytest.fixture
def dataset(tiny_federation, tmp_path) -> tuple[Path, Path, Path]:
    """A private copy (dataset_dir, datalist_dir, workspace) that a test may break."""
    data_dir, _ = tiny_federation
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    workspace = tmp_path / "ws"
    return copy, copy / "datalist", workspace


def run_main(capsys, *argv: str) -> tuple[int, str]:
    code = job.main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


def expect_error(capsys, dataset, pattern: str, *argv: str, n_clients: str = "2") -> str:
    data_dir, datalist_dir, workspace = dataset
    base = ["--dataset_base_dir", str(data_dir), "--datalist_json_path", str(datalist_dir)]
    base += ["--workspace", str(workspace), "--n_clients", n_clients, *TINY]
    code, err = run_main(capsys, *base, *argv)
    assert code == EXIT_BAD_INPUT
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ")
    assert pattern in err, err
    assert not workspace.exists(), "a run that fails its checks must not create or touch the workspace"
    return err


def test_missing_dataset_folder(capsys, dataset, tmp_path):
    err = expect_error(capsys, dataset, "--dataset_base_dir", "--dataset_base_dir", str(tmp_path / "nope"))
    assert "does not exist" in err


def test_missing_datalist_folder(capsys, dataset, tmp_path):
    expect_error(capsys, dataset, "--datalist_json_path", "--datalist_json_path", str(tmp_path / "nope"))


def test_datalist_folder_lacking_a_site(capsys, dataset):
    err = expect_error(capsys, dataset, "site-3.json", n_clients="3")
    assert "lacks" in err


def test_centralised_needs_site_all(capsys, dataset):
    (dataset[1] / "site-All.json").unlink()
    expect_error(capsys, dataset, "site-All.json", n_clients="1")


def test_malformed_json(capsys, dataset):
    (dataset[1] / "site-2.json").write_text('{"training": [')
    err = expect_error(capsys, dataset, "site-2.json")
    assert "not valid JSON" in err


def test_json_without_validation(capsys, dataset):
    path = dataset[1] / "site-1.json"
    content = json.loads(path.read_text())
    del content["validation"]
    path.write_text(json.dumps(content))
    expect_error(capsys, dataset, "'training' and 'validation'")


def test_listed_files_that_do_not_exist_are_named(capsys, dataset):
    data_dir, datalist_dir, _ = dataset
    for path in data_dir.rglob("*_flair.nii.gz"):
        path.unlink()
    err = expect_error(capsys, dataset, "do not exist")
    first_case = json.loads((datalist_dir / "site-1.json").read_text())["training"][0]
    assert Path(first_case["image"][3]).name in err
    assert "6 file(s)" in err and "(and 3 more)" in err  # site-1: 4 training + 2 validation cases lack FLAIR


def test_case_with_modalities_of_different_shape(capsys, dataset):
    data_dir = dataset[0]
    t2 = sorted(data_dir.rglob("*_t2.nii.gz"))[0]
    nib.save(nib.Nifti1Image(np.zeros((32, 32, 16), dtype=np.int16), np.eye(4)), t2)
    err = expect_error(capsys, dataset, "differ in shape")
    assert t2.parent.name in err


def test_unreadable_nifti(capsys, dataset):
    data_dir = dataset[0]
    t1 = sorted(data_dir.rglob("*_t1.nii.gz"))[0]
    t1.write_bytes(gzip.compress(b"this is not a nifti file"))
    err = expect_error(capsys, dataset, "cannot read NIfTI header")
    assert t1.name in err


@pytest.mark.parametrize(
    "flags, pattern",
    [
        (["--enable_dp", "--dp_fraction", "0"], "--dp_fraction"),
        (["--enable_dp", "--dp_fraction", "1.5"], "--dp_fraction"),
        (["--enable_dp", "--dp_epsilon", "0"], "--dp_epsilon"),
        (["--enable_dp", "--dp_noise_var", "-1"], "--dp_noise_var"),
        (["--enable_dp", "--dp_gamma", "0"], "--dp_gamma"),
        (["--roi_size", "224", "224", "150"], "--roi_size"),
        (["--infer_roi_size", "240", "240", "155"], "--infer_roi_size"),
        (["--gpu", "0,a"], "--gpu"),
        (["--gpu", "cuda:0"], "--gpu"),
        (["--num_rounds", "1"], "--num_rounds"),
        (["--threads", "3"], "--threads"),
        (["--cache_dataset", "2"], "--cache_dataset"),
        (["--learning_rate", "0"], "--learning_rate"),
        (["--init_filters", "12"], "--init_filters"),
        (["--num_workers", "-1"], "--num_workers"),
    ],
)
def test_bad_flag_values(capsys, dataset, flags, pattern):
    expect_error(capsys, dataset, pattern, *flags)


def test_datalist_without_dataset_dir(capsys, tmp_path):
    code, err = run_main(capsys, "--datalist_json_path", str(tmp_path), "--workspace", str(tmp_path / "ws"))
    assert code == EXIT_BAD_INPUT and "--dataset_base_dir" in err


def test_failed_checks_leave_an_existing_job_folder_alone(capsys, dataset):
    data_dir, datalist_dir, workspace = dataset
    previous = workspace / "brats18_2" / "keep.txt"
    previous.parent.mkdir(parents=True)
    previous.write_text("results of an earlier run")
    code, _ = run_main(
        capsys,
        "--dataset_base_dir",
        str(data_dir),
        "--datalist_json_path",
        str(datalist_dir),
        "--workspace",
        str(workspace),
        "--n_clients",
        "2",
        "--enable_dp",
        "--dp_epsilon",
        "-1",
        *TINY,
    )
    assert code == EXIT_BAD_INPUT
    assert previous.read_text() == "results of an earlier run"


def test_label_convention_recorded_in_datalist_must_be_known(capsys, dataset):
    path = dataset[1] / "site-1.json"
    content = json.loads(path.read_text())
    write_datalist(path, content["training"], content["validation"], et_label=5)
    expect_error(capsys, dataset, "'et_label'")


def test_help_explains_every_flag():
    done = subprocess.run([sys.executable, "job.py", "--help"], capture_output=True, text=True, cwd=REPO_DIR)
    assert done.returncode == 0
    for action in cli.build_parser()._actions:
        for flag in action.option_strings:
            assert flag in done.stdout
        if action.dest != "help":
            assert action.help, f"{action.option_strings} has no help text"
    assert "demo" in done.stdout and "--export" in done.stdout


def test_default_job_names():
    def name(*argv):
        return new_job_name(cli.build_parser().parse_args(list(argv)))

    assert name("--n_clients", "1") == "brats18_1"
    assert name("--n_clients", "4") == "brats18_4"
    assert name("--n_clients", "4", "--enable_dp") == "brats18_4_dp"
    assert name("--job_name", "mine", "--enable_dp") == "mine"
    assert name("--checkpoint", "/x/model.pt") == "model_evaluation"


def test_demo_defaults_apply_only_without_data_and_yield_to_explicit_flags():
    def settings(*argv, demo):
        return cli.settings_from_flags(cli.build_parser().parse_args(list(argv)), demo)

    demo = settings("--num_rounds", "3", demo=True)
    assert demo.num_rounds == 3 and demo.roi_size == DEMO_OVERRIDES["roi_size"] and demo.learning_rate == 3e-3
    real = settings("--dataset_base_dir", "/data", demo=False)
    assert real.num_rounds == 600 and real.roi_size == (224, 224, 144) and real.learning_rate == 1e-4
    assert not real.centralised and real.amp and real.dp_mechanism is None
    one = settings("--n_clients", "1", "--no_amp", "--enable_dp", "--dp_mechanism", "dpsgd", demo=False)
    assert one.centralised and not one.amp and one.dp_mechanism == "dpsgd"


def test_brats18_entry_uses_official_layout():
    entry = brats18_case_entry("Brats18_X_1", "LGG")
    assert entry["image"][0] == "training/LGG/Brats18_X_1/Brats18_X_1_t1ce.nii.gz"
    assert entry["label"].endswith("Brats18_X_1_seg.nii.gz")


def admin_kit(folder: Path, content: str = '{"admin": {"username": "lead@study.org"}}') -> Path:
    (folder / "startup").mkdir(parents=True)
    (folder / "startup" / "fed_admin.json").write_text(content)
    return folder


@pytest.mark.parametrize(
    ("flags", "pattern"),
    [
        (["--env", "prod"], "--env prod needs --startup_kit"),
        (["--env", "prod", "--startup_kit", "{tmp}"], "not an admin startup kit (startup/fed_admin.json: FileNotFound"),
        (["--env", "prod", "--startup_kit", "{bad}"], "not an admin startup kit (startup/fed_admin.json: KeyError"),
        (["--env", "sim", "--startup_kit", "{kit}"], "--startup_kit is for --env prod (got --env sim)"),
        (["--env", "poc", "--startup_kit", "{kit}"], "--startup_kit is for --env prod (got --env poc)"),
    ],
)
def test_deployment_flags_are_checked_before_anything_runs(capsys, dataset, tmp_path, flags, pattern):
    kit, bad = admin_kit(tmp_path / "kit"), admin_kit(tmp_path / "bad", '{"admin": {}}')
    argv = [f.format(tmp=tmp_path, kit=kit, bad=bad) for f in flags]
    expect_error(capsys, dataset, pattern, *argv)


def test_prod_refuses_data_paths_because_each_site_reads_its_own(capsys, dataset, tmp_path):
    kit = admin_kit(tmp_path / "kit")
    err = expect_error(
        capsys, dataset, "--env prod: leave --dataset_base_dir", "--env", "prod", "--startup_kit", str(kit)
    )
    assert "docs/deployment.md" in err


def test_prod_job_carries_no_data_path_and_the_papers_settings(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_DIR)
    kit = admin_kit(tmp_path / "kit")
    run = run_from_argv(["--env", "prod", "--startup_kit", str(kit), "--workspace", str(tmp_path / "ws")])
    settings = run.settings
    assert settings.dataset_base_dir is None and settings.datalist_json_path is None
    assert settings.validate_at == "every_site" and settings.cache_dir == "preprocessed"
    assert settings.num_rounds == 600 and settings.roi_size == (224, 224, 144)  # not the demo's
    assert not (tmp_path / "ws").exists()


def test_poc_with_the_sites_own_settings_refuses_data_paths(capsys, dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("BRATS_DATA_CONFIG", str(tmp_path / "{site}.json"))
    expect_error(capsys, dataset, "--env poc with BRATS_DATA_CONFIG set: leave --dataset_base_dir", "--env", "poc")


def deployed_job(tmp_path: Path) -> Path:
    """The folder a --env poc/prod job leaves: settings without data paths, and what job.py recorded at submission."""
    from brats_fl.job_results import JobPaths
    from brats_fl.runner import SUBMITTED_FILE
    from brats_fl.settings import TrainingSettings

    paths = JobPaths(tmp_path / "ws", "brats18_2")
    paths.settings_file.parent.mkdir(parents=True)
    TrainingSettings(dataset_base_dir=None, datalist_json_path=None).write(paths.settings_file)
    (paths.job_dir / SUBMITTED_FILE).write_text(json.dumps({"env": "poc", "job_id": "x", "n_clients": 2}))
    return paths.job_dir


def test_a_deployed_job_is_resumed_in_a_deployment_only(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_DIR)
    monkeypatch.delenv("BRATS_DATA_CONFIG", raising=False)
    job_dir = deployed_job(tmp_path)
    code, err = run_main(capsys, "--resume", str(job_dir))
    assert code == EXIT_BAD_INPUT
    assert err == (
        f"error: --resume {job_dir}: the job's sites read their own data settings (it ran with --env poc or prod): "
        "give --env poc, or --env prod --startup_kit <admin kit>"
    )
    code, err = run_main(capsys, "--resume", str(job_dir), "--env", "poc")  # job.py's POC site settings are gone
    assert code == EXIT_BAD_INPUT
    assert (
        f"--env poc: no site data settings in {tmp_path / 'ws' / 'brats18_2_site_data'}: set BRATS_DATA_CONFIG" in err
    )
