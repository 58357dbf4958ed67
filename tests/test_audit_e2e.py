"""The privacy audit end to end, in the real NVFlare simulator (tiny SegResNet-8, tiny synthetic volumes, 2 sites x
2 rounds of 4 local epochs, 128 canaries per site): tests that fail when the audit is wrong.

- no privacy saturates the lower bound; DP-SGD's bound never exceeds its accountant's epsilon; DP-SGD with its
  noise switched off (while its accountant still reports the calibrated epsilon) is caught; canaries switched off
  give chance figures; the estimate orders no privacy above DP-SGD;
- the auditor scores what leaves the site: under SVT its input is the update after the SVT filter, not before.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from recording_filter import UpdateRecorder
from test_e2e import load_update, tiny_args

import job
from brats_fl import recipes
from brats_fl.job_results import JobPaths
from brats_fl.privacy import audit, audit_report
from brats_fl.privacy.audit_observer import canary_cosines, vector_fingerprint
from brats_fl.run_options import run_from_argv
from brats_fl.settings import REPO_DIR, TrainingSettings
from result_stat.tb_events import read_site_scalars

pytestmark = pytest.mark.e2e
SITES = ("site-1", "site-2")
CANARIES = 128
AUDIT = ["--n_clients", "2", "--aggregation_epochs", "4", "--audit", "--audit_canaries", str(CANARIES)]
DPSGD = ["--enable_dp", "--dp_mechanism", "dpsgd", "--dp_target_epsilon", "8"]
NOISELESS_DPSGD = Path(__file__).parent / "noiseless_dpsgd"  # its sitecustomize.py switches DP-SGD's noise off
SEGRESNET_8_PARAMETERS = 1_176_843


def run_audited(tiny_federation, workspace: Path, *flags: str) -> tuple[JobPaths, dict]:
    """Run job.py with the audit on the tiny federation; (the job's paths, its privacy_audit.json)."""
    data_dir, datalist_dir = tiny_federation
    assert job.main(tiny_args(data_dir, datalist_dir, workspace, *AUDIT, "--job_name", "audited", *flags)) == 0
    paths = JobPaths(workspace, "audited")
    return paths, json.loads((paths.server_job_dir / audit_report.AUDIT_FILE).read_text())


def pooled(result: dict) -> dict:
    return result["all_sites"]["canaries"]


def number(value) -> float:
    return float("inf") if value == "inf" else float(value)


@pytest.fixture(scope="module")
def no_privacy(tiny_federation, tmp_path_factory):
    return run_audited(tiny_federation, tmp_path_factory.mktemp("audit_none"))


@pytest.fixture(scope="module")
def dpsgd(tiny_federation, tmp_path_factory):
    return run_audited(tiny_federation, tmp_path_factory.mktemp("audit_dpsgd"), *DPSGD)


@pytest.fixture(scope="module")
def noiseless_dpsgd(tiny_federation, tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:  # every process the simulator starts imports the sitecustomize
        path = [str(NOISELESS_DPSGD), str(REPO_DIR), os.environ.get("PYTHONPATH", "")]
        patch.setenv("PYTHONPATH", os.pathsep.join(path))
        return run_audited(tiny_federation, tmp_path_factory.mktemp("audit_noiseless"), *DPSGD)


def test_no_privacy_saturates_the_lower_bound(no_privacy):
    paths, result = no_privacy
    canaries = pooled(result)
    assert result["mechanism"] == "none" and canaries["lower_bound"]["m"] == 2 * CANARIES
    assert canaries["lower_bound"]["saturated"], canaries["lower_bound"]
    assert number(canaries["lower_bound"]["epsilon"]) == pytest.approx(number(canaries["lower_bound"]["cap"]))
    assert canaries["separation"]["auc"] > 0.99 and canaries["separation"]["tpr_at_fpr"]["0.01"] > 0.9
    for site in SITES:
        assert result["sites"][site]["canaries"]["lower_bound"]["saturated"]
    # the audit held out half of each site's 4 training cases: 2 cases x 4 epochs = 8 steps per round
    steps = read_site_scalars(paths.tb_events)
    assert all([v for _, v in steps[site]["train_steps"]] == [8.0, 8.0] for site in SITES)
    assert result["all_sites"]["patients"]["n_in"] == result["all_sites"]["patients"]["n_out"] == 4
    observations = json.loads((paths.server_job_dir / audit.OBSERVATIONS_FILE).read_text())
    assert {r["d"] for s in observations["sites"].values() for r in s.values()} == {SEGRESNET_8_PARAMETERS}


def test_dpsgd_lower_bound_never_exceeds_its_accountants_epsilon(dpsgd):
    _, result = dpsgd
    formal, bound = result["formal"], pooled(result)["lower_bound"]
    assert result["mechanism"] == "dpsgd" and formal["unit"] == "patient (training case)"
    assert number(bound["epsilon"]) <= number(formal["epsilon_at_audit_delta"])  # both at delta 1e-5
    assert number(bound["epsilon"]) <= number(formal["epsilon"]) <= 8.0 + 0.02
    for site in SITES:
        assert number(result["sites"][site]["canaries"]["lower_bound"]["epsilon"]) <= formal["epsilon_at_audit_delta"]


def test_the_estimate_orders_no_privacy_above_dpsgd(no_privacy, dpsgd):
    none_estimate = number(pooled(no_privacy[1])["estimate"]["epsilon"])
    dpsgd_estimate = number(pooled(dpsgd[1])["estimate"]["epsilon"])
    assert none_estimate > dpsgd_estimate, (none_estimate, dpsgd_estimate)
    assert pooled(no_privacy[1])["separation"]["auc"] > pooled(dpsgd[1])["separation"]["auc"]


def test_dpsgd_with_its_noise_switched_off_is_caught(noiseless_dpsgd, dpsgd):
    _, result = noiseless_dpsgd
    bound = pooled(result)["lower_bound"]
    assert bound["saturated"], bound  # the same job with its noise: see the test above
    assert pooled(result)["separation"]["auc"] > 0.99
    # while its accountant, which cannot see the bug, reports what the honest job reports
    assert number(result["formal"]["epsilon"]) == pytest.approx(number(dpsgd[1]["formal"]["epsilon"]))


def test_canaries_switched_off_give_chance_figures(tiny_federation, tmp_path):
    paths, result = run_audited(tiny_federation, tmp_path / "ws", "--audit_no_insert")
    canaries = pooled(result)
    assert not result["canaries_inserted"]
    # about 0: at 95% confidence a positive bound on nothing happens up to 5% of the time, but only just above 0
    # (certifying 0.5 by chance has a probability of about 1e-3 with 256 canaries)
    assert number(canaries["lower_bound"]["epsilon"]) < 0.5
    assert abs(canaries["separation"]["auc"] - 0.5) < 0.15  # 256 canaries: sd of a chance AUC about 0.036
    assert number(canaries["estimate"]["epsilon"]) < 1.5
    assert audit_report.table_row(result)[0] == "no privacy (no canaries)"


def test_the_auditor_scores_the_update_after_the_svt_filter(tiny_federation, tmp_path, monkeypatch):
    """A recorder before the SVT filter (at the site) and one at the server's input: the auditor's vector is the
    received one, bit for bit, and differs from what the site computed."""
    data_dir, datalist_dir = tiny_federation
    record = tmp_path / "rec"
    run = run_from_argv(tiny_args(data_dir, datalist_dir, tmp_path / "ws", *AUDIT, "--enable_dp"))
    add_privacy = recipes.add_privacy
    monkeypatch.setattr(recipes, "add_privacy", lambda *_: None)  # added below, after the raw recorder
    recipe = job.training_recipe(run)  # with the auditor
    recipe.add_client_output_filter(UpdateRecorder(str(record), "raw"), tasks=["train"])
    add_privacy(recipe, run.settings, run.n_clients, None)  # the SVT filter, after the raw recorder
    recipe.add_server_input_filter(UpdateRecorder(str(record), "received"), tasks=["train"])
    outcome = run.env.run(recipe, run.job, run.n_clients, run.threads, run.gpu)
    assert outcome.error is None and outcome.interrupted is None, outcome
    observations = json.loads((run.job.server_job_dir / audit.OBSERVATIONS_FILE).read_text())
    settings = TrainingSettings.read(run.job.settings_file)
    for site in SITES:
        for r in (0, 1):
            raw, _ = load_update(record, "raw", site, r)
            received, meta = load_update(record, "received", site, r)
            assert meta["svt_privacy_budget"]  # the received update went through the SVT filter
            seen = observations["sites"][site][str(r)]
            received_vector = audit.ParameterLayout.of_arrays(received).flatten(received)
            raw_vector = audit.ParameterLayout.of_arrays(raw).flatten(raw)
            assert seen["update_sha256"] == vector_fingerprint(received_vector)
            assert seen["update_sha256"] != vector_fingerprint(raw_vector)
            assert np.allclose(seen["cosines"], canary_cosines(settings.audit_seed, site, CANARIES, received_vector))
    result = audit_report.audit_job(run.job.server_job_dir, settings, list(SITES), 2, None, None, samples=50)
    assert result["mechanism"] == "svt"
