"""job.py's privacy flags: bad values stop the job before anything runs (exit 2, one line naming the flag)."""

from __future__ import annotations

import pytest

import job
from brats_fl import cli
from brats_fl.privacy import dpsgd
from brats_fl.recipes import stage_app_files
from brats_fl.run_options import new_job_name, run_from_argv
from brats_fl.settings import EXIT_BAD_INPUT, SETTINGS_FILE, TrainingSettings

TINY = ["--roi_size", "32", "32", "24", "--infer_roi_size", "32", "32", "24", "--num_rounds", "2", "--n_clients", "2"]


def base_argv(tiny_federation, workspace) -> list[str]:
    data_dir, datalist_dir = tiny_federation
    return [
        "--dataset_base_dir",
        str(data_dir),
        "--datalist_json_path",
        str(datalist_dir),
        "--workspace",
        str(workspace),
        *TINY,
    ]


@pytest.mark.parametrize(
    "flags, pattern",
    [
        (["--dp_target_epsilon", "0"], "--dp_target_epsilon 0.0: need a finite value > 0"),
        (["--dp_target_epsilon", "-3"], "--dp_target_epsilon"),
        (["--dp_delta", "0"], "--dp_delta 0.0: need a value in (0, 1)"),
        (["--dp_delta", "1"], "--dp_delta"),
        (["--dp_delta", "0.3"], "delta must be below 1/4"),  # the tiny sites have 4 training cases each
        (["--dp_max_grad_norm", "0"], "--dp_max_grad_norm 0.0: need a finite value > 0"),
        (["--dp_max_grad_norm", "-1"], "--dp_max_grad_norm"),
        (["--dp_target_epsilon", "1e-6", "--dp_delta", "1e-9", "--num_rounds", "100"], "finds no noise level"),
    ],
)
def test_bad_dpsgd_values_are_stopped_before_anything_runs(capsys, tiny_federation, tmp_path, flags, pattern):
    workspace = tmp_path / "ws"
    code = job.main(base_argv(tiny_federation, workspace) + ["--enable_dp", "--dp_mechanism", "dpsgd", *flags])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_BAD_INPUT
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert pattern in err, err
    assert not workspace.exists()


def test_svt_flags_are_still_checked_and_dpsgd_flags_ignored_under_svt(capsys, tiny_federation, tmp_path):
    argv = base_argv(tiny_federation, tmp_path / "ws") + ["--enable_dp", "--dp_noise_var", "0"]
    assert job.main(argv) == EXIT_BAD_INPUT
    assert "--dp_noise_var" in capsys.readouterr().err
    run = run_from_argv(base_argv(tiny_federation, tmp_path / "ws") + ["--enable_dp", "--dp_target_epsilon", "-1"])
    assert run.settings.dp_mechanism == "svt" and run.dpsgd_plans == {}


def test_dpsgd_plans_every_site_before_the_job_and_hands_the_flags_to_the_clients(tiny_federation, tmp_path):
    argv = base_argv(tiny_federation, tmp_path / "ws") + [
        "--enable_dp",
        "--dp_mechanism",
        "dpsgd",
        "--dp_target_epsilon",
        "4",
        "--dp_max_grad_norm",
        "0.5",
    ]
    inputs = run_from_argv(argv)
    assert inputs.job.job_name == "brats18_2_dpsgd"
    assert sorted(inputs.dpsgd_plans) == ["site-1", "site-2"]
    expected = dpsgd.plan_dpsgd(4, 2, 1, 4.0, None, 0.5)
    assert inputs.dpsgd_plans["site-1"] == expected
    sent = TrainingSettings.read(stage_app_files(inputs.settings) / SETTINGS_FILE)  # what every site reads
    assert (sent.dp_mechanism, sent.dp_target_epsilon, sent.dp_max_grad_norm, sent.num_rounds) == ("dpsgd", 4.0, 0.5, 2)
    assert sent.dp_delta is None  # each site derives the same per-site default


def test_job_names_per_mechanism():
    def name(*argv):
        return new_job_name(cli.build_parser().parse_args(list(argv)))

    assert name("--n_clients", "4", "--enable_dp") == "brats18_4_dp"
    assert name("--n_clients", "4", "--enable_dp", "--dp_mechanism", "svt") == "brats18_4_dp"
    assert name("--n_clients", "4", "--enable_dp", "--dp_mechanism", "dpsgd") == "brats18_4_dpsgd"
    assert name("--n_clients", "4", "--dp_mechanism", "dpsgd") == "brats18_4"  # without --enable_dp: no DP


def test_sites_read_back_every_setting_the_job_sends(tiny_federation, tmp_path):
    argv = base_argv(tiny_federation, tmp_path / "ws") + [
        "--enable_dp",
        "--dp_mechanism",
        "dpsgd",
        "--dp_delta",
        "0.01",
    ]
    inputs = run_from_argv(argv)
    sent = TrainingSettings.read(stage_app_files(inputs.settings) / SETTINGS_FILE)
    assert sent == inputs.settings
    assert (sent.dp_mechanism, sent.dp_delta, sent.num_rounds) == ("dpsgd", 0.01, 2)


def test_svt_noise_generator_is_reseeded_from_the_os():
    import numpy as np

    import client

    np.random.seed(0)
    seeded = np.random.laplace(size=4)
    np.random.seed(0)
    client.keep_dp_noise_secret()
    assert not np.array_equal(np.random.laplace(size=4), seeded)
