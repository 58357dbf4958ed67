"""job.py --tracking: NVFlare's experiment tracking sends the sites' curves to TensorBoard, MLflow or both; under DP
neither store receives a training statistic. One real job (2 sites x 2 rounds, SVT, both trackers), read back through
MLflow's own client; the rest on hand-made inputs."""

from __future__ import annotations

import re

import pytest
from test_e2e import tiny_args
from test_privacy_e2e import VALIDATION_METRICS

import job
from brats_fl import recipes
from brats_fl.job_results import JobPaths, read_round_metrics
from brats_fl.nvflare_compat import MLFLOW_RECEIVER_ID
from brats_fl.privacy import report as privacy_report
from brats_fl.run_options import tracking_options
from brats_fl.settings import InputError
from result_stat.tb_events import read_job_scalars, read_site_scalars


class RecordingJob:
    """Stands in for a recipe's job: records the server components it is given."""

    def __init__(self):
        self.server = []

    def to_server(self, component, id=None):
        self.server.append((type(component).__name__, id))


class RecordingRecipe:
    name = "brats18_2"

    def __init__(self):
        self._job = RecordingJob()


@pytest.mark.parametrize(
    ("tracking", "receivers"),
    [
        ("tensorboard", [("TBAnalyticsReceiver", "receiver")]),
        ("mlflow", [("MLflowReceiver", MLFLOW_RECEIVER_ID)]),
        ("both", [("TBAnalyticsReceiver", "receiver"), ("MLflowReceiver", MLFLOW_RECEIVER_ID)]),
    ],
)
def test_each_tracking_choice_adds_nvflares_receivers_at_the_server(tracking, receivers):
    recipe = RecordingRecipe()
    options = tracking_options(tracking, None)
    recipes.add_tracking(recipe, options["trackers"], options["tracking_uri"])
    assert recipe._job.server == receivers


def test_tracking_uri_needs_mlflow_and_a_uri():
    with pytest.raises(InputError, match="--tracking_uri .* only MLflow takes it"):
        tracking_options("tensorboard", "sqlite:////tmp/x.db")
    with pytest.raises(InputError, match="give an MLflow tracking URI"):
        tracking_options("mlflow", "/tmp/mlflow.db")
    assert tracking_options("both", "http://host:5000") == {
        "trackers": ("tensorboard", "mlflow"),
        "tracking_uri": "http://host:5000",
    }


def test_curves_are_read_from_a_jobs_mlflow_store_when_it_has_no_tensorboard_events(tmp_path, capsys):
    """A store laid out as NVFlare's MLflowReceiver writes it: one run per site named <site>-<job id>-<job>-<name>."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from result_stat import plot_tensorboard_events as plots

    paths = JobPaths(tmp_path / "ws", "brats18_2")
    paths.server_job_dir.mkdir(parents=True)
    client = MlflowClient(tracking_uri=f"sqlite:///{paths.mlflow_db}")
    experiment = client.create_experiment(paths.job_name, artifact_location=(tmp_path / "artifacts").as_uri())
    values = {"site-1": [0.2, 0.5, 0.4], "site-2": [0.3, 0.6, 0.7]}
    for site, series in values.items():
        run = client.create_run(experiment, run_name=f"{site}-179621-brats18_2-brats-fl", tags={"job_id": "1796211"})
        metrics = [Metric("val_dice", v, 1000 + step, step) for step, v in enumerate(series)]
        client.log_batch(run.info.run_id, metrics=[*metrics, Metric("val_dice", 0.9, 999, 0)])  # an earlier log
    scalars = read_job_scalars(paths)
    assert scalars == {site: {"val_dice": list(enumerate(series))} for site, series in values.items()}
    assert (
        plots.main(
            [
                "--workspace",
                str(tmp_path / "ws"),
                "--job_names",
                "brats18_2",
                "--tags",
                "val_dice",
                "--output_dir",
                str(tmp_path / "figs"),
                "--formats",
                "png",
            ]
        )
        == 0
    )
    assert (tmp_path / "figs" / "val_dice.png").is_file()
    assert "val_dice brats18_2: 3 rounds, last 0.5500" in capsys.readouterr().out  # the mean of the two sites


@pytest.mark.e2e
def test_mlflow_store_holds_val_dice_of_every_round_and_no_training_statistic_under_dp(
    tiny_federation, tmp_path, capsys
):
    from mlflow.tracking import MlflowClient

    data_dir, datalist_dir = tiny_federation
    argv = tiny_args(data_dir, datalist_dir, tmp_path / "ws", "--n_clients", "2", "--enable_dp", "--tracking", "both")
    assert job.main(argv) == 0
    out = capsys.readouterr().out
    paths = JobPaths(tmp_path / "ws", "brats18_2_dp")
    assert paths.mlflow_db.is_file() and f"mlflow ui --backend-store-uri sqlite:///{paths.mlflow_db}" in out
    # read back through MLflow's own client: one run per site in the experiment named after the job
    client = MlflowClient(tracking_uri=f"sqlite:///{paths.mlflow_db}")
    experiment = client.get_experiment_by_name(paths.job_name)
    runs = {re.match(r"site-\d+", r.info.run_name)[0]: r for r in client.search_runs([experiment.experiment_id])}
    assert sorted(runs) == ["site-1", "site-2"]
    history = client.get_metric_history(runs["site-1"].info.run_id, "val_dice")
    logged = {r.round: r.sites["site-1"]["val_dice"] for r in read_round_metrics(paths.round_metrics)}
    assert sorted(m.step for m in history) == [0, 1]  # every round
    for m in history:
        assert m.value == pytest.approx(logged[m.step], abs=1e-6)
    # under DP: the validation Dice of the global model and the server's own privacy figure, nothing from training
    for site, run in runs.items():
        metrics = set(run.data.metrics)
        assert metrics <= VALIDATION_METRICS | {privacy_report.TB_TAG}, (site, metrics)
        assert privacy_report.TB_TAG in metrics
    assert set(runs["site-2"].data.metrics) == {privacy_report.TB_TAG}  # site-1 validates for all
    # the two stores hold the same curves, and result_stat reads the MLflow one as it reads TensorBoard's
    tensorboard = read_site_scalars(paths.tb_events)
    mlflow = read_job_scalars(paths, f"sqlite:///{paths.mlflow_db}")
    assert sorted(mlflow) == sorted(tensorboard) == ["site-1", "site-2"]
    for site in tensorboard:
        assert set(mlflow[site]) == set(tensorboard[site])
        for tag, series in tensorboard[site].items():
            assert [s for s, _ in mlflow[site][tag]] == [s for s, _ in series]
            assert [v for _, v in mlflow[site][tag]] == pytest.approx([v for _, v in series], rel=1e-6)
