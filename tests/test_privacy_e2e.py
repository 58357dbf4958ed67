"""End-to-end privacy in the real NVFlare simulator (tiny synthetic data, 2 sites x 2 rounds): the accounting, and
that nothing computed from training data arrives at the server unprotected."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from recording_filter import AnalyticsRecorder, UpdateRecorder
from test_e2e import assert_complete_job, load_update, tiny_args

import client
import job
from brats_fl import recipes
from brats_fl.job_results import JobPaths, read_round_metrics
from brats_fl.nvflare_compat import add_server_component
from brats_fl.privacy import dpsgd, svt
from brats_fl.privacy import report as privacy_report
from brats_fl.reporting import job_summary
from brats_fl.run_options import run_from_argv
from result_stat.tb_events import read_job_scalars, read_scalars, read_site_scalars

pytestmark = pytest.mark.e2e
SITES = ("site-1", "site-2")
VALIDATION_METRICS = {"val_dice", "val_dice_tc", "val_dice_wt", "val_dice_et"}
# what may reach the server from a site under DP: the protected update, and metadata that depends on no training case
ALLOWED_META = {
    "NUM_STEPS_CURRENT_ROUND",  # fixed by the plan: training cases x epochs
    "initial_metrics",  # the validation Dice of the received global model
    "svt_privacy_budget",  # privacy metadata, written by NVFlare's SVT filter ...
    "svt_privacy_accountant",
    "dpsgd_privacy",  # ... or by the site's DP-SGD accountant
    "filter_history",  # NVFlare's list of the filters the update went through
}


def record_arrivals(recipe, record_dir: Path) -> None:
    """Record every task result and analytics event that reaches the server."""
    recipe.add_server_input_filter(UpdateRecorder(str(record_dir), "received"), tasks=["train"])
    add_server_component(recipe, AnalyticsRecorder(str(record_dir)))


def assert_nothing_unprotected_arrived(record_dir: Path, rounds: int = 2) -> None:
    """Every analytics stream is the validation Dice or the privacy figure the server itself derives; every task
    result carries only validation metrics and data-independent metadata next to the protected update."""
    events = [json.loads(line) for line in (record_dir / "events.jsonl").read_text().splitlines()]
    tags = {(e["site"], e["tag"]) for e in events}
    assert ("site-1", "val_dice") in tags  # the recorder saw the validating site's stream
    assert {t for _, t in tags} <= VALIDATION_METRICS | {privacy_report.TB_TAG}, tags
    for site in SITES:
        for r in range(rounds):
            meta = json.loads((record_dir / f"received_{site}_round{r}.json").read_text())
            assert set(meta["meta_keys"]) <= ALLOWED_META, set(meta["meta_keys"]) - ALLOWED_META
            assert set(meta["meta"].get("initial_metrics") or {}) <= VALIDATION_METRICS


def run_svt_recorded(argv: list[str], record_dir: Path, monkeypatch):
    """The job exactly as job.py builds it, with a recorder before the SVT filter and one at the server's input."""
    run = run_from_argv(argv)
    add_privacy = recipes.add_privacy
    monkeypatch.setattr(recipes, "add_privacy", lambda *_: None)  # added below, after the raw recorder
    recipe = job.training_recipe(run)
    recipe.add_client_output_filter(UpdateRecorder(str(record_dir), "raw"), tasks=["train"])
    add_privacy(recipe, run.settings, run.n_clients, None)
    record_arrivals(recipe, record_dir)
    outcome = run.env.run(recipe, run.job, run.n_clients, run.threads, run.gpu)
    assert outcome.error is None and outcome.interrupted is None, outcome
    return run


def assert_mlflow_store_holds_the_validation_curves(summary) -> None:
    """--tracking both under DP: MLflow's own client reads back one run per site holding val_dice of every round (as
    the server logged it), the validation Dice and the privacy figure only, the same curves as TensorBoard; the
    summary names the store; result_stat reads it as it reads TensorBoard's events."""
    from mlflow.tracking import MlflowClient

    paths = summary.paths
    uri = f"sqlite:///{paths.mlflow_db}"
    assert paths.mlflow_db.is_file() and f"mlflow ui --backend-store-uri {uri}" in summary.render()
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(paths.job_name)
    runs = {re.match(r"site-\d+", r.info.run_name)[0]: r for r in client.search_runs([experiment.experiment_id])}
    assert sorted(runs) == list(SITES)
    history = client.get_metric_history(runs["site-1"].info.run_id, "val_dice")
    logged = {r.round: r.sites["site-1"]["val_dice"] for r in read_round_metrics(paths.round_metrics)}
    assert sorted(m.step for m in history) == [0, 1]  # every round
    for m in history:
        assert m.value == pytest.approx(logged[m.step], abs=1e-6)
    for site, run in runs.items():  # under DP: nothing from training
        assert set(run.data.metrics) <= VALIDATION_METRICS | {privacy_report.TB_TAG}, (site, run.data.metrics)
        assert privacy_report.TB_TAG in run.data.metrics
    assert set(runs["site-2"].data.metrics) == {privacy_report.TB_TAG}  # site-1 validates for all
    tensorboard = read_site_scalars(paths.tb_events)
    mlflow = read_job_scalars(paths, uri)
    assert sorted(mlflow) == sorted(tensorboard) == list(SITES)
    for site in tensorboard:
        assert set(mlflow[site]) == set(tensorboard[site])
        for tag, series in tensorboard[site].items():
            assert [s for s, _ in mlflow[site][tag]] == [s for s, _ in series]
            assert [v for _, v in mlflow[site][tag]] == pytest.approx([v for _, v in series], rel=1e-6)


def test_svt_report_holds_nvflares_figures_for_every_site_and_round(tiny_federation, tmp_path, monkeypatch):
    data_dir, datalist_dir = tiny_federation
    tracking = ("--tracking", "both")  # the MLflow store is checked on this job too
    argv = tiny_args(data_dir, datalist_dir, tmp_path / "ws", "--n_clients", "2", "--enable_dp", *tracking)
    run = run_svt_recorded(argv, tmp_path / "rec", monkeypatch)
    summary = assert_complete_job(run, 2, training_tags=set())  # under DP the training statistics stay at the sites
    report = privacy_report.load_report(summary.paths.privacy_report)
    privacy_report.check_report(report, list(SITES), 2)  # one record per site and round, none unprotected
    settings = recipes.svt_settings(run.settings)
    assert report["mechanism"] == "svt" and report["settings"]["noise_var"] == settings.noise_var
    tb = read_site_scalars(summary.paths.tb_events)
    for site in SITES:
        rows = report["sites"][site]["rounds"]
        for row in rows:
            raw, raw_meta = load_update(tmp_path / "rec", "raw", site, row["round"])
            received, received_meta = load_update(tmp_path / "rec", "received", site, row["round"])
            # the filter saw the weight difference, never full weights, and ran on this very update
            assert raw_meta["data_kind"] == "WEIGHT_DIFF" == row["data_kind"]
            assert row["filter_history"] == ["UpdateRecorder", "SVTPrivacy"]  # the client chain, in order
            # the report holds what NVFlare reported, which is the formula for this model size
            nvflare = received_meta["svt_privacy_budget"]
            expected = svt.svt_round_budget(sum(v.size for v in raw.values()), settings)
            for part in ("epsilon_threshold", "epsilon_query", "epsilon_release"):
                assert row[part] == nvflare[part] == pytest.approx(getattr(expected, part), rel=1e-12)
            assert row["epsilon_nvflare"] == nvflare["epsilon_total"] and row["n_upload"] == expected.n_upload
            # counted at the bound that holds whatever the filter accepted: every value accepted at worst
            assert row["n_values"] == expected.n_values
            assert row["epsilon"] == pytest.approx(expected.epsilon_bound, rel=1e-12)
            assert row["epsilon"] > row["epsilon_nvflare"]
            assert row["acceptance_passes"] >= 1
            # every tensor of the update was perturbed, and what arrived is what the filter produced
            assert all(not np.array_equal(raw[k], received[k]) for k in raw)
            assert all(np.abs(received[k]).max() > 0 for k in raw if raw[k].size > 100)
            # how many values really left the site non-zero
            nonzero = sum(int(np.count_nonzero(v)) for v in received.values()) / expected.n_values
            low, high = svt.svt_distinct_fraction_range(expected)
            assert low - 0.01 < nonzero < high + 0.01
        assert [r["cumulative_epsilon"] for r in rows] == pytest.approx(
            [rows[0]["epsilon"], rows[0]["epsilon"] + rows[1]["epsilon"]]
        )
        assert [step for step, _ in tb[site][privacy_report.TB_TAG]] == [0, 1]
        assert [v for _, v in tb[site][privacy_report.TB_TAG]] == pytest.approx(
            [r["cumulative_epsilon"] for r in rows], rel=1e-6
        )  # float32 in TensorBoard
    assert_nothing_unprotected_arrived(tmp_path / "rec")
    assert set(tb["site-1"]) == VALIDATION_METRICS | {privacy_report.TB_TAG}  # no train_loss at the server
    assert set(tb["site-2"]) == {privacy_report.TB_TAG}  # site-1 validates for all
    lines = job_summary(run, 2).extra_lines
    assert "privacy (SVT; pure DP, delta 0" in lines[0] and f"{report['max_epsilon']:.4g}" in lines[0]
    assert_mlflow_store_holds_the_validation_curves(job_summary(run, 2))


def test_dpsgd_job_spends_its_target_and_keeps_training_statistics_at_the_sites(
    tiny_federation, tmp_path, monkeypatch, capsys
):
    data_dir, datalist_dir = tiny_federation
    argv = tiny_args(
        data_dir,
        datalist_dir,
        tmp_path / "ws",
        "--n_clients",
        "2",
        "--enable_dp",
        "--dp_mechanism",
        "dpsgd",
        "--dp_target_epsilon",
        "6",
        "--fedproxloss_mu",
        "0.01",
        "--validate_every_site",  # the paper's repeated validation: every site scores the same global model
    )
    build = job.training_recipe

    def build_and_record(*args):
        recipe = build(*args)
        record_arrivals(recipe, tmp_path / "rec")
        return recipe

    monkeypatch.setattr(job, "training_recipe", build_and_record)
    assert job.main(argv) == 0
    done = capsys.readouterr()  # out: what job.py printed
    paths = JobPaths(tmp_path / "ws", "brats18_2_dpsgd")
    report = privacy_report.load_report(paths.privacy_report)
    privacy_report.check_report(report, list(SITES), 2)
    plan = dpsgd.plan_dpsgd(4, 2, 1, 6.0, None, 1.0)  # 4 training cases per tiny site
    assert f"noise multiplier {plan.noise_multiplier:.4g} for epsilon 6.0 at delta 0.025" in done.out
    tb = read_site_scalars(paths.tb_events)
    for site in SITES:
        rows = report["sites"][site]["rounds"]
        assert [r["noise_multiplier"] for r in rows] == [plan.noise_multiplier] * 2
        assert [r["epsilon"] for r in rows] == pytest.approx(
            [dpsgd.dpsgd_round_record(plan, r)["epsilon"] for r in (0, 1)]
        )
        assert rows[0]["epsilon"] < rows[1]["epsilon"] <= 6.0 and math.isclose(rows[1]["epsilon"], 6.0, abs_tol=0.02)
        assert [v for _, v in tb[site][privacy_report.TB_TAG]] == pytest.approx([r["epsilon"] for r in rows], rel=1e-6)
    line = next(x for x in done.out.splitlines() if "privacy (DP-SGD" in x)
    assert "delta 0.025, target epsilon 6.0" in line
    for site in SITES:
        assert f"{site} {report['sites'][site]['epsilon']:.4g}" in line
    assert str(paths.privacy_report) in done.out
    assert json.loads(paths.privacy_report.read_text())["updates_without_privacy_metadata"] == []
    # nothing computed from the training cases reached the server unprotected: the loss stayed at the sites
    assert_nothing_unprotected_arrived(tmp_path / "rec")
    # repeated validation gives every site the same figures, and FedAvg's weighted mean of them is that figure too
    rounds = read_round_metrics(paths.round_metrics)
    for r in rounds:
        assert sorted(r.sites) == list(SITES)
        for key in VALIDATION_METRICS:
            assert r.sites["site-1"][key] == pytest.approx(r.sites["site-2"][key], abs=1e-6)
            assert r.metrics[key] == pytest.approx(r.sites["site-1"][key], abs=1e-6)
    for site in SITES:
        assert set(tb[site]) == VALIDATION_METRICS | {privacy_report.TB_TAG}
        local = read_scalars(paths.job_dir / site / "simulate_job" / client.LOCAL_EVENTS_DIR)
        assert [v for _, v in local["train_steps"]] == [4.0, 4.0] and len(local["train_loss"]) == 2
