"""Server workflows that keep one model per site: local-only training and scoring several models at the sites.

- :class:`LocalOnlyTraining` (job.py --local_only): every site trains alone. Each round the server sends each site
  its own model, the one that site sent back the round before, and aggregates nothing: a site's model never sees
  another site's update. The server keeps, per site, the model with the best validation Dice on that site's own
  validation cases in ``local_models/<site>.pt`` (the site validates the model it receives, as in FedAvg), and at
  the end each site scores its own best model (the local-only job's final evaluation).
- :class:`ModelsAtSites` (the final evaluation of local models, and the cross-site matrix): each named model is
  sent to the sites it names; each site scores it case by case on its own validation cases (client.py's
  final_evaluation) and the server keeps every score in ``models_at_sites.json`` as {model: {site: {case:
  scores}}}.

Why not NVFlare's CrossSiteEval (``add_cross_site_evaluation``): it takes the local models from a ``submit_model``
task to sites that must still hold them in the running job, and the server's models from this job's persistor; here
the models are files that earlier jobs saved (NVFlare's simulator wipes a job's site folders when it starts again),
so the server reads them and sends each one as a ``validate`` task, which is what CrossSiteEval does next.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.utils.fl_model_utils import FLModelUtils
from nvflare.app_common.workflows.model_controller import ModelController

from brats_fl.evaluation import CASES_KEY
from brats_fl.job_results import FINAL_EVALUATION_FILE, write_atomically
from brats_fl.settings import KEY_METRIC

LOCAL_MODELS_DIR = "local_models"  # <server job folder>/local_models/<site>.pt: each site's best local model
LOCAL_TRAINING_FILE = "local_training.json"  # per site: every round's val_dice, the best round
MODELS_AT_SITES_FILE = "models_at_sites.json"  # {model: {site: {case id: scores}}}


def save_weights(path: Path, params: dict, round_num: int | None = None) -> None:
    """{"model": state dict[, "round": r]}, the checkpoint format of the project's other models, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    weights = {k: torch.as_tensor(v).clone() for k, v in params.items()}
    record = {"model": weights} if round_num is None else {"model": weights, "round": round_num}
    write_atomically(path, lambda tmp: torch.save(record, tmp))


def load_weights(path: Path) -> dict:
    """A checkpoint's weights as NumPy arrays (what NVFlare's PyTorch persistor sends the sites)."""
    data = torch.load(path, map_location="cpu", weights_only=True)
    state = data.get("model", data)
    return {k: v.detach().cpu().numpy() for k, v in state.items()}


class LocalOnlyTraining(ModelController):
    def __init__(self, *args, num_clients: int, num_rounds: int, final_evaluation: bool = True, **kwargs):
        """Local-only training: num_rounds rounds in which each of num_clients sites gets its own model back.

        Args:
            num_clients: the sites (all of them train).
            num_rounds: rounds, as in FedAvg: each site validates the model it receives, then trains its local epochs.
            final_evaluation: then, in the same job, each site scores its own best model case by case on its
                validation cases, into final_evaluation.json as {site: {case id: scores}} (the final evaluation of
                a federated job runs as a job of its own; here it saves a start of the simulator).
            args, kwargs: ModelController's (persistor_id: the initial model, the same for every site).
        """
        super().__init__(*args, **kwargs)
        self.num_clients = num_clients
        self.num_rounds = num_rounds
        self.final_evaluation = final_evaluation

    def run(self) -> None:
        initial = self.load_model()
        sites = sorted(self.sample_clients(self.num_clients))
        models = {site: dict(initial.params) for site in sites}
        record = {site: {"val_dice": {}, "best_round": None, "best_val_dice": None} for site in sites}
        run_dir = Path(self.get_run_dir())
        for round_num in range(self.num_rounds):
            self.fl_ctx.set_prop(AppConstants.CURRENT_ROUND, round_num, private=True, sticky=False)
            results = self.train_one_round(models, round_num)
            if results is None:
                return  # aborted
            for site in sites:
                result = results.get(site)
                if result is None or not result.params:
                    self.system_panic(f"{site} sent no model in round {round_num}", self.fl_ctx)
                    return
                dice = (result.metrics or {}).get(KEY_METRIC)
                if dice is not None:
                    record[site]["val_dice"][str(round_num)] = float(dice)
                    best = record[site]["best_val_dice"]
                    if round_num > 0 and (best is None or dice > best):  # round 0 validated the untrained model
                        save_weights(run_dir / LOCAL_MODELS_DIR / f"{site}.pt", models[site], round_num)
                        record[site].update(best_round=round_num, best_val_dice=float(dice))
                updated = FLModelUtils.update_model(FLModel(params=dict(models[site])), result)
                models[site] = updated.params
            write_atomically(run_dir / LOCAL_TRAINING_FILE, lambda tmp: tmp.write_text(json.dumps(record, indent=1)))
            self.info(f"Local-only round {round_num} done: " + ", ".join(f"{s} {record[s]['val_dice']}" for s in sites))
        if self.final_evaluation:
            self.evaluate_own_models(sites, run_dir)

    def evaluate_own_models(self, sites: list[str], run_dir: Path) -> None:
        """Each site scores its own best local model (the sites that have one) on its validation cases."""
        scores = {}
        for site in sites:
            path = run_dir / LOCAL_MODELS_DIR / f"{site}.pt"
            if not path.is_file():
                continue
            self.info(f"Final evaluation: {site} scores its own best model")
            results = self.send_model_and_wait(
                task_name="validate", data=FLModel(params=load_weights(path)), targets=[site]
            )
            scores[site] = next(((r.metrics or {}).get(CASES_KEY, {}) for r in results), {})
        write_atomically(run_dir / FINAL_EVALUATION_FILE, lambda tmp: tmp.write_text(json.dumps(scores, indent=1)))

    def train_one_round(self, models: dict, round_num: int) -> dict[str, FLModel] | None:
        """Send every site its own model at once (they train in parallel); their results by site, None if aborted."""
        results: dict[str, FLModel] = {}
        for site, params in models.items():
            model = FLModel(params=params, current_round=round_num, total_rounds=self.num_rounds, start_round=0)
            self.send_model(
                task_name="train", targets=[site], data=model, callback=lambda r, s=site: results.__setitem__(s, r)
            )
        while self.get_num_standing_tasks():
            if self.abort_signal.triggered:
                return None
            time.sleep(self._task_check_period)
        return results


class ModelsAtSites(ModelController):
    def __init__(self, *args, models: dict, **kwargs):
        """Score each model at its sites.

        Args:
            models: {model name: {"checkpoint": path on the server, "sites": [site names]}}.
        """
        super().__init__(*args, **kwargs)
        self.models = models

    def run(self) -> None:
        scores: dict[str, dict] = {}
        path = Path(self.get_run_dir()) / MODELS_AT_SITES_FILE
        for name, spec in self.models.items():
            self.info(f"Scoring {name} at {', '.join(spec['sites'])}")
            data = FLModel(params=load_weights(Path(spec["checkpoint"])), meta={"brats_model": name})
            results = self.send_model_and_wait(task_name="validate", data=data, targets=list(spec["sites"]))
            scores[name] = {
                (r.meta or {}).get("client_name", "unknown-site"): (r.metrics or {}).get(CASES_KEY, {}) for r in results
            }
            write_atomically(path, lambda tmp: tmp.write_text(json.dumps(scores, indent=1)))
            if self.abort_signal.triggered:
                return
