"""The trade-off sweep script without running jobs: its flags, the job commands it builds, reading a job's results
back, and the CSV and plot it writes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks import privacy_sweep as sweep
from brats_fl import cli, privacy
from brats_fl.privacy import report
from brats_fl.run_options import new_job_name
from brats_fl.settings import REPO_DIR


def sweep_args(*argv: str):
    return sweep.build_parser().parse_args(list(argv))


@pytest.mark.parametrize(
    "argv, pattern",
    [
        (["--n_clients", "1"], "--n_clients 1"),
        (["--num_rounds", "1"], "--num_rounds 1"),
        (["--init_filters", "12"], "--init_filters 12"),
        (["--dp_noise_var", "1", "0"], "--dp_noise_var 0.0"),
        (["--dp_target_epsilon", "-1"], "--dp_target_epsilon -1.0"),
        (["--dp_target_epsilon", "inf"], "--dp_target_epsilon inf"),
        (["--no_baseline", "--dp_noise_var", "--dp_target_epsilon"], "nothing to run"),
    ],
)
def test_bad_flags_stop_the_sweep_before_any_job(capsys, tmp_path, argv, pattern):
    assert sweep.main([*argv, "--output_dir", str(tmp_path / "out"), "--workspace", str(tmp_path / "ws")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and pattern in err, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "ws").exists()


def test_default_sweep_runs_job_py_with_flags_it_understands(tmp_path):
    args = sweep_args("--workspace", str(tmp_path))
    configs = sweep.build_configs(args)
    assert [c.name for c in configs] == [
        "sweep_no_dp",
        "sweep_svt_noise_var_1",
        "sweep_svt_noise_var_0.1",
        "sweep_svt_noise_var_0.01",
        "sweep_dpsgd_eps_1",
        "sweep_dpsgd_eps_8",
        "sweep_dpsgd_eps_64",
    ]
    for config in configs:
        command = sweep.job_command(config, args)
        assert command[1] == str(REPO_DIR / "job.py")
        parsed = cli.build_parser().parse_args(command[2:])
        assert new_job_name(parsed) == config.name and parsed.num_rounds == 5 and parsed.n_clients == 2
        assert parsed.enable_dp == (config.mechanism != "none")
        if config.mechanism != "none":
            assert parsed.dp_mechanism == config.mechanism
    dpsgd_eps8 = cli.build_parser().parse_args(sweep.job_command(configs[5], args)[2:])
    assert dpsgd_eps8.dp_target_epsilon == 8.0


def fake_job(workspace: Path, name: str, dice_by_round: list[float], ledger: report.PrivacyLedger | None) -> None:
    """The files a finished 2-site simulator job leaves, written by hand."""
    paths = job_paths(workspace, name)
    paths.round_metrics.parent.mkdir(parents=True)
    lines = []
    for r, dice in enumerate(dice_by_round):
        metric = [{"name": "val_dice", "value": dice}]
        lines.append(
            json.dumps(
                {
                    "round": r,
                    "aggregated_metrics": metric,
                    "sites": [{"name": s, "metrics": metric} for s in ("site-1", "site-2")],
                }
            )
        )
    paths.round_metrics.write_text("\n".join(lines) + "\n")
    paths.best_model.parent.mkdir(parents=True)
    paths.best_model.write_bytes(b"model")
    if ledger is not None:
        report.write_report(paths.privacy_report, ledger.report())


def job_paths(workspace: Path, name: str):
    from brats_fl.job_results import JobPaths

    return JobPaths(workspace, name)


def test_rows_read_back_best_final_and_the_largest_site_epsilon(tmp_path):
    args = sweep_args("--workspace", str(tmp_path), "--num_rounds", "3")
    ledger = report.PrivacyLedger("dpsgd", {})
    for site, scale in (("site-1", 1.0), ("site-2", 2.0)):
        for r in range(3):
            record = {"epsilon": scale * (r + 1), "delta": 0.01, "steps_this_round": 1, "steps_so_far": r + 1}
            ledger.add_update(site, r, "WEIGHT_DIFF", {privacy.DPSGD_META: record})
    fake_job(tmp_path, "sweep_dpsgd_eps_8", [0.1, 0.6, 0.5], ledger)
    fake_job(tmp_path, "sweep_no_dp", [0.1, 0.3, 0.7], None)
    configs = {c.name: c for c in sweep.build_configs(args)}
    row = sweep.read_row(configs["sweep_dpsgd_eps_8"], args, 12.3)
    assert (row["best_val_dice"], row["best_round"], row["final_val_dice"]) == (0.6, 1, 0.5)
    assert (row["epsilon"], row["delta"], row["status"]) == (6.0, 0.01, "ok")  # site-2 after round 2
    baseline = sweep.read_row(configs["sweep_no_dp"], args, 1.0)
    assert baseline["epsilon"] == math.inf and baseline["best_val_dice"] == 0.7


def test_a_job_whose_privacy_report_lacks_rounds_is_not_a_result(tmp_path):
    args = sweep_args("--workspace", str(tmp_path), "--num_rounds", "3")
    ledger = report.PrivacyLedger("svt", {})
    for site in ("site-1", "site-2"):
        for r in range(2):  # round 2 missing
            budget = {
                "epsilon_total": 1.0,
                "epsilon_threshold": 0.0,
                "epsilon_query": 0.0,
                "epsilon_release": 1.0,
                "n_upload": 9,
                "delta": 0.0,
            }
            ledger.add_update(site, r, "WEIGHT_DIFF", {privacy.SVT_BUDGET_META: budget}, n_values=10)
    fake_job(tmp_path, "sweep_svt_noise_var_1", [0.1, 0.2, 0.3], ledger)
    config = next(c for c in sweep.build_configs(args) if c.name == "sweep_svt_noise_var_1")
    with pytest.raises(ValueError, match=r"site-1 covers rounds \[0, 1\]"):
        sweep.read_row(config, args, 1.0)


def test_csv_and_plot_from_hand_made_rows(tmp_path):
    config = sweep.SweepConfig("sweep_dpsgd_eps_1", "dpsgd", "target epsilon 1", ())
    rows = [
        {
            "config": "sweep_no_dp",
            "mechanism": "none",
            "setting": "no DP",
            "epsilon": math.inf,
            "delta": 0.0,
            "privacy_unit": "none",
            "best_val_dice": 0.7,
            "best_round": 4,
            "final_val_dice": 0.69,
            "initial_val_dice": 0.1,
            "runtime_s": 90.0,
            "status": "ok",
        },
        {
            "config": "sweep_svt_noise_var_1",
            "mechanism": "svt",
            "setting": "noise_var 1",
            "epsilon": 5.3e6,
            "delta": 0.0,
            "privacy_unit": "site",
            "best_val_dice": 0.4,
            "best_round": 3,
            "final_val_dice": 0.35,
            "initial_val_dice": 0.05,
            "runtime_s": 95.0,
            "status": "ok",
        },
        sweep.failed_row(config, 3.0, "job.py exit 1"),
    ]
    sweep.write_csv(rows, tmp_path / "t.csv")
    back = sweep.read_csv(tmp_path / "t.csv")
    assert back[0]["epsilon"] == math.inf and back[1]["epsilon"] == 5.3e6 and back[1]["best_round"] == 3
    assert math.isnan(back[2]["best_val_dice"]) and back[2]["status"].startswith("failed: job.py exit 1")
    sweep.plot_tradeoff(back, tmp_path / "t.png", tmp_path / "t.svg", "test")
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<svg" in (tmp_path / "t.svg").read_text()[:500]


def test_replot_only_rereads_finished_jobs_and_keeps_recorded_run_times(tmp_path):
    args = sweep_args(
        "--workspace",
        str(tmp_path / "ws"),
        "--num_rounds",
        "2",
        "--dp_noise_var",
        "--dp_target_epsilon",
        "--output_dir",
        str(tmp_path / "out"),
        "--replot_only",
    )
    fake_job(tmp_path / "ws", "sweep_no_dp", [0.2, 0.5], None)
    (tmp_path / "out").mkdir()
    old = sweep.read_row(sweep.build_configs(args)[0], args, 77.0)
    sweep.write_csv([{**old, "best_val_dice": 0.0}], tmp_path / "out" / "privacy_tradeoff.csv")
    assert (
        sweep.main(
            [
                "--workspace",
                str(tmp_path / "ws"),
                "--num_rounds",
                "2",
                "--dp_noise_var",
                "--dp_target_epsilon",
                "--output_dir",
                str(tmp_path / "out"),
                "--replot_only",
            ]
        )
        == 0
    )
    (row,) = sweep.read_csv(tmp_path / "out" / "privacy_tradeoff.csv")
    assert (row["best_val_dice"], row["initial_val_dice"], row["runtime_s"]) == (0.5, 0.2, 77.0)
