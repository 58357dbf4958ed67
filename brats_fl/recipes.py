"""The two NVFlare jobs job.py runs, built from one TrainingSettings: training (FedAvg) and evaluation at the sites.

Training: NVFlare's FedAvg recipe around BratsSegResNet. Sites send weight differences with their validation Dice,
the server keeps the global model with the best val_dice, TensorBoard tracking is on, and the server also keeps the
last global model after every round (what a resumed job continues from). With --enable_dp the chosen mechanism and
the server filter that writes the privacy report are added.

Evaluation: NVFlare's FedEvalRecipe sends one checkpoint to the sites; each scores it on its own validation cases
(client.py) and only the per-case scores come back, which a server filter keeps.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from brats_fl.settings import KEY_METRIC, REPO_DIR, SETTINGS_FILE, TrainingSettings, site_names

PACKAGE_DIR = REPO_DIR / "brats_fl"


@dataclass(frozen=True)
class StartPoint:
    """Where a training run starts: round 0 from fresh weights, or a later round of a resumed job."""

    round: int = 0
    initial_ckpt: Path | None = None  # the global model to start from
    privacy_report: Path | None = None  # the releases already spent, which the new report keeps counting
    best_value: float | None = None  # best val_dice of the earlier rounds (early stopping goes on from it)
    rounds_without_improvement: int = 0


def stage_app_files(settings: TrainingSettings) -> Path:
    """A fresh folder holding what every site runs besides client.py: the brats_fl package, model.py and the
    settings document. NVFlare copies a folder's contents into the app's custom/ folder, so one call ships it."""
    staged = Path(tempfile.mkdtemp(prefix="brats_app_"))
    shutil.copytree(PACKAGE_DIR, staged / PACKAGE_DIR.name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(REPO_DIR / "model.py", staged / "model.py")
    settings.write(staged / SETTINGS_FILE)
    return staged


def stop_condition(settings: TrainingSettings) -> str | None:
    """NVFlare's stop_cond for --stop_dice / --patience. NVFlare counts patience only with a stop condition, so
    patience alone gets one that no Dice meets."""
    if settings.stop_dice is not None:
        return f"{KEY_METRIC} >= {settings.stop_dice}"
    if settings.patience is not None:
        return f"{KEY_METRIC} > 1"
    return None


def build_training_recipe(
    settings: TrainingSettings,
    model,
    name: str,
    n_clients: int,
    rounds_to_run: int,
    start: StartPoint = StartPoint(),
    named_sites: bool = False,
):
    """FedAvg of model (the server rebuilds it from its constructor arguments) over n_clients sites, running rounds
    start.round ... start.round + rounds_to_run - 1; named_sites: for site-1 ... site-N only (deployments)."""
    from nvflare.client.config import TransferType
    from nvflare.recipe.utils import add_experiment_tracking

    from brats_fl.fl_components import (
        LastGlobalModelKeeper,
        ResumableFedAvgRecipe,
        SiteFailureWatcher,
        add_server_component,
    )

    recipe = ResumableFedAvgRecipe(
        name=name,
        model=model,
        initial_ckpt=str(start.initial_ckpt) if start.initial_ckpt else None,
        min_clients=n_clients,
        num_rounds=rounds_to_run,
        train_script="client.py",  # relative: shipped in the job, so an exported job runs anywhere
        params_transfer_type=TransferType.DIFF,
        key_metric=KEY_METRIC,
        stop_cond=stop_condition(settings),
        patience=settings.patience,
        start_round=start.round,
        best_value=start.best_value,
        rounds_without_improvement=start.rounds_without_improvement,
    )
    if named_sites:
        deploy_to_named_sites(recipe, n_clients)
    app_files = stage_app_files(settings)
    recipe.add_client_file(str(app_files))
    recipe.add_server_file(str(app_files))  # the server components below are in brats_fl
    add_experiment_tracking(recipe, "tensorboard")
    add_server_component(recipe, LastGlobalModelKeeper())
    recipe.add_server_input_filter(SiteFailureWatcher(), tasks=["train"])
    if settings.dp_mechanism:
        add_privacy(recipe, settings, n_clients, start.privacy_report)
    return recipe


def deploy_to_named_sites(recipe, n_clients: int) -> None:
    """Send the job to site-1 ... site-N only (each gets the same app): a deployment may have more hospitals than the
    job uses, and the centralised baseline (--n_clients 1) must run at site-1, not at whichever site connects first.
    job.py uses it in deployments only: the simulator runs exactly site-1 ... site-N anyway.
    Must come right after the recipe is built, before any client file or filter is added."""
    from nvflare.recipe import set_per_site_config

    set_per_site_config(recipe, {site: {} for site in site_names(n_clients)})


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
        deploy_to_named_sites(recipe, n_clients)
    app_files = stage_app_files(settings)
    recipe.add_client_file(str(app_files))
    recipe.add_server_file(str(app_files))
    recipe.add_server_input_filter(SiteFailureWatcher(), tasks=["validate"])
    recipe.add_server_input_filter(FinalEvaluationCollector(), tasks=["validate"])
    return recipe
