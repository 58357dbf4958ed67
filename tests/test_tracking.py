"""job.py --tracking: NVFlare's experiment tracking sends the sites' curves to TensorBoard, MLflow or both, on
hand-made inputs. The real job (2 sites x 2 rounds, SVT, both trackers, read back through MLflow's own client) is
tests/test_privacy_e2e.py's SVT job, which checks the MLflow store there: one simulator run serves both."""

from __future__ import annotations

import pytest

from brats_fl import recipes
from brats_fl.job_results import JobPaths
from brats_fl.nvflare_compat import MLFLOW_RECEIVER_ID
from brats_fl.run_options import tracking_options
from brats_fl.settings import InputError
from result_stat.tb_events import read_job_scalars


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
