"""job.py's audit flags: a user error stops the job before anything runs (exit 2, one line naming the flag), and an
audited job's settings are what the sites and the auditor need (a secret seed, DP-SGD planned for the kept half)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import job
from brats_fl.job_results import JobPaths
from brats_fl.privacy import audit
from brats_fl.run_options import run_from_argv
from brats_fl.settings import EXIT_BAD_INPUT, REPO_DIR, TrainingSettings

TINY = ["--roi_size", "32", "32", "24", "--infer_roi_size", "32", "32", "24", "--num_rounds", "2", "--n_clients", "2"]


def base_argv(tiny_federation, workspace) -> list[str]:
    data_dir, datalist_dir = tiny_federation
    return ["--dataset_base_dir", str(data_dir), "--datalist_json_path", str(datalist_dir)] + [
        "--workspace",
        str(workspace),
        *TINY,
    ]


def expect_error(capsys, argv: list[str], pattern: str, workspace) -> None:
    code = job.main(argv)
    err = capsys.readouterr().err.strip()
    assert code == EXIT_BAD_INPUT
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert pattern in err, err
    assert not workspace.exists(), "a run that fails its checks must not create the workspace"


@pytest.mark.parametrize(
    "flags, pattern",
    [
        (["--audit_canaries", "64"], "--audit_canaries is a setting of the privacy audit: add --audit"),
        (["--audit_no_insert"], "--audit_no_insert is a setting of the privacy audit: add --audit"),
        (["--audit", "--audit_canaries", "8"], "--audit_canaries 8: need >= 16 canaries per site"),
        (["--audit", "--env", "poc"], "--audit with --env poc: the audit runs in the simulator only"),
        (["--audit", "--checkpoint", "model.pt"], "--audit with --checkpoint: the audit observes training"),
        (["--audit", "--dp_max_grad_norm", "0"], "--dp_max_grad_norm 0.0: the audit's canary norm"),
    ],
)
def test_bad_audit_flags_are_stopped_before_anything_runs(capsys, tiny_federation, tmp_path, flags, pattern):
    workspace = tmp_path / "ws"
    expect_error(capsys, base_argv(tiny_federation, workspace) + flags, pattern, workspace)


def test_a_site_with_one_training_case_cannot_be_audited(capsys, tiny_federation, tmp_path):
    data_dir, datalist_dir = tiny_federation
    small = tmp_path / "datalist"
    small.mkdir()
    for name in ("site-1", "site-2"):
        datalist = json.loads((datalist_dir / f"{name}.json").read_text())
        datalist["training"] = datalist["training"][:1] if name == "site-2" else datalist["training"]
        (small / f"{name}.json").write_text(json.dumps(datalist))
    argv = base_argv(tiny_federation, tmp_path / "ws") + ["--datalist_json_path", str(small), "--audit"]
    expect_error(capsys, argv, "--audit: site-2 has 1 training case(s); the audit holds out half", tmp_path / "ws")


def test_an_audited_job_gets_a_secret_seed_and_dpsgd_planned_for_the_kept_half(tiny_federation, tmp_path):
    argv = base_argv(tiny_federation, tmp_path / "ws") + ["--seed", "7", "--audit", "--audit_canaries", "64"]
    run = run_from_argv(argv + ["--enable_dp", "--dp_mechanism", "dpsgd"])
    assert run.settings.audit and run.settings.audit_canaries == 64 and not run.settings.audit_no_insert
    assert run.settings.audit_seed not in (None, 7) and run.settings.seed == 7
    assert run_from_argv(argv).settings.audit_seed != run.settings.audit_seed  # a new secret per job
    assert {plan.n_train for plan in run.dpsgd_plans.values()} == {2}  # 4 training cases per tiny site, half kept
    assert TrainingSettings.from_dict(json.loads(run.settings.to_json())) == run.settings  # what the sites read
    assert run_from_argv(base_argv(tiny_federation, tmp_path / "ws")).settings.audit_seed is None


def test_an_audited_job_cannot_be_resumed(capsys, tiny_federation, tmp_path):
    run = run_from_argv(base_argv(tiny_federation, tmp_path / "ws") + ["--audit"])
    paths = JobPaths(tmp_path / "ws", "brats18_2")
    paths.settings_file.parent.mkdir(parents=True)
    run.settings.write(paths.settings_file)
    for site in ("site-1", "site-2"):
        (paths.job_dir / site).mkdir()
    code = job.main(["--resume", str(paths.job_dir)])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_BAD_INPUT and "an audited job cannot be resumed" in err and len(err.splitlines()) == 1


def test_help_explains_the_audit_flags():
    done = subprocess.run([sys.executable, "job.py", "--help"], capture_output=True, text=True, cwd=REPO_DIR)
    text = " ".join(done.stdout.split())
    assert "privacy audit" in text and "docs/privacy.md" in text
    for flag in ("--audit ", "--audit_canaries N", "--audit_no_insert"):
        assert flag in text
    assert f"(default: {audit.DEFAULT_CANARIES})" in text


def test_a_stopped_audited_job_is_not_offered_a_resume_command(tiny_federation, tmp_path, monkeypatch):
    from brats_fl import reporting, resume

    run = run_from_argv(base_argv(tiny_federation, tmp_path / "ws") + ["--audit"])
    monkeypatch.setattr(resume, "last_model_round", lambda job: 3)
    line = reporting.stop_line(run, "Stopped by SIGINT")
    assert line == f"Stopped by SIGINT after round 3; {audit.NOT_RESUMABLE}"
    assert "--resume" not in line
