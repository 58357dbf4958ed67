"""What job.py adds to its NVFlare recipes, and the evaluation job.

Training (built in job.py): NVFlare's FedAvg recipe around BratsSegResNet, to which this module adds the files every
site runs (:func:`ship_app_files`), the early-stopping condition, and with --enable_dp the chosen mechanism and the
server filter that writes the privacy report (:func:`add_privacy`).

Evaluation: NVFlare's FedEvalRecipe sends one checkpoint to the sites; each scores it on its own validation cases
(client.py) and only the per-case scores come back, which a server filter keeps.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

from brats_fl.settings import KEY_METRIC, REPO_DIR, SETTINGS_FILE, TrainingSettings, site_names

PACKAGE_DIR = REPO_DIR / "brats_fl"


def stage_app_files(settings: TrainingSettings) -> Path:
    """A fresh folder holding what every site runs besides client.py: the brats_fl package, model.py and the
    settings document. NVFlare copies a folder's contents into the app's custom/ folder, so one call ships it."""
    staged = Path(tempfile.mkdtemp(prefix="brats_app_"))
    shutil.copytree(PACKAGE_DIR, staged / PACKAGE_DIR.name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(REPO_DIR / "model.py", staged / "model.py")
    settings.write(staged / SETTINGS_FILE)
    return staged


def ship_app_files(recipe, settings: TrainingSettings) -> None:
    """Send the brats_fl package, model.py and the settings to every site and to the server (whose components are in
    brats_fl), next to the script."""
    app_files = stage_app_files(settings)
    recipe.add_client_file(str(app_files))
    recipe.add_server_file(str(app_files))


def stop_condition(settings: TrainingSettings) -> str | None:
    """NVFlare's stop_cond for --stop_dice / --patience. NVFlare counts patience only with a stop condition, so
    patience alone gets one that no Dice meets."""
    if settings.stop_dice is not None:
        return f"{KEY_METRIC} >= {settings.stop_dice}"
    if settings.patience is not None:
        return f"{KEY_METRIC} > 1"
    return None


def send_to_named_sites(recipe, n_clients: int) -> None:
    """Send the job to site-1 ... site-N only (each gets the same app): a deployment may have more hospitals than the
    job uses, and the centralised baseline (--n_clients 1) must run at site-1, not at whichever site connects first.
    For deployments only (the simulator runs exactly site-1 ... site-N anyway); must come right after the recipe is
    built, before any client file or filter is added."""
    from nvflare.recipe import set_per_site_config

    set_per_site_config(recipe, {site: {} for site in site_names(n_clients)})


def add_tracking(recipe, trackers: tuple[str, ...], tracking_uri: str | None) -> None:
    """NVFlare's experiment tracking at the server: what the sites log with nvflare.client.tracking.SummaryWriter
    reaches TensorBoard (tb_events/) and/or MLflow (NVFlare's MLflowReceiver turns the TensorBoard-style scalars into
    MLflow metrics; one MLflow run per site, in the experiment named after the job)."""
    from nvflare.recipe.utils import add_experiment_tracking

    from brats_fl.nvflare_compat import add_mlflow_receiver

    if "tensorboard" in trackers:
        add_experiment_tracking(recipe, "tensorboard")  # the sites' SummaryWriter scalars reach tb_events/
    if "mlflow" in trackers:
        add_mlflow_receiver(recipe, tracking_uri, experiment_name=recipe.name)


def add_privacy(recipe, settings: TrainingSettings, n_clients: int, previous_report: Path | None) -> None:
    """The chosen mechanism (SVT: a filter on each site's output; DP-SGD: lives in client.py) and the server filter
    that writes the privacy report."""
    from brats_fl.privacy.report_filter import PrivacyReportCollector
    from brats_fl.privacy.svt import make_svt_filter

    if settings.dp_mechanism == "svt":
        recipe.add_client_output_filter(make_svt_filter(svt_settings(settings)), tasks=["train"])
    collector = PrivacyReportCollector(
        settings.dp_mechanism,
        privacy_report_settings(settings, n_clients),
        previous_report=str(previous_report) if previous_report else None,
    )
    recipe.add_server_input_filter(collector, tasks=["train"])


def svt_settings(settings: TrainingSettings):
    from brats_fl.privacy.svt import SVTSettings

    return SVTSettings(settings.dp_fraction, settings.dp_epsilon, settings.dp_noise_var, settings.dp_gamma)


def privacy_report_settings(settings: TrainingSettings, n_clients: int) -> dict:
    """The settings that fix the guarantee, copied into privacy_report.json."""
    from brats_fl.privacy.dpsgd import DPSGD_ACCOUNTANT

    common = {
        "num_rounds": settings.num_rounds,
        "aggregation_epochs": settings.aggregation_epochs,
        "n_clients": n_clients,
    }
    if settings.dp_mechanism == "svt":
        return {**common, **asdict(svt_settings(settings))}
    return {
        **common,
        "target_epsilon": settings.dp_target_epsilon,
        "delta": settings.dp_delta,
        "max_grad_norm": settings.dp_max_grad_norm,
        "accountant": DPSGD_ACCOUNTANT,
    }


def build_evaluation_recipe(
    settings: TrainingSettings, model, name: str, n_clients: int, checkpoint: Path, named_sites: bool = False
):
    """Every site scores the checkpoint on its validation cases (the validating site alone when the sites share
    them); the server keeps the per-case scores in final_evaluation.json."""
    from nvflare.app_opt.pt.recipes.fedeval import FedEvalRecipe
    from nvflare.client.config import ExchangeFormat

    from brats_fl.fl_components import FinalEvaluationCollector, SiteFailureWatcher

    recipe = FedEvalRecipe(
        name=name,
        model=model,
        eval_ckpt=str(checkpoint),  # absolute: read on the server where it is; relative: carried in the job
        min_clients=n_clients,
        eval_script="client.py",
        server_expected_format=ExchangeFormat.PYTORCH,
    )
    if named_sites:
        send_to_named_sites(recipe, n_clients)
    ship_app_files(recipe, settings)
    recipe.add_server_input_filter(SiteFailureWatcher(), tasks=["validate"])
    recipe.add_server_input_filter(FinalEvaluationCollector(), tasks=["validate"])
    return recipe
