"""The NVFlare pieces job.py adds to NVFlare's FedAvg for long runs; they run on the server, inside the job.

- :class:`ResumableFedAvgRecipe` and its controller :class:`BratsFedAvg`: NVFlare's FedAvg that can start at a later
  round (a resumed job) with the early-stopping state the earlier rounds left, and that never stops at round 0 (round
  0 validates the untrained model, and the best-model selection skips it).
- :class:`LastGlobalModelKeeper`: writes the global model after every aggregation, atomically, with its round, so a
  stopped or crashed job can continue from it (NVFlare's own checkpoint is written in place, and only when the model
  improves once early stopping is on).
- :class:`SiteFailureWatcher`: ends the job when a site reports the error that stopped it, and logs it where job.py
  finds it, so that a deployment fails at once with the site's reason instead of waiting for ever.
- :class:`FinalEvaluationCollector`: keeps the per-case scores the sites send for the final evaluation of the best
  model, in ``final_evaluation.json`` of the server's job folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from threading import Lock

import torch
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.event_type import EventType
from nvflare.apis.filter import Filter
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.abstract.model import ModelLearnableKey
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_common.workflows.fedavg import FedAvg
from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe
from nvflare.widgets.widget import Widget

from brats_fl.evaluation import CASES_KEY
from brats_fl.job_results import FINAL_EVALUATION_FILE, LAST_MODEL_FILE
from brats_fl.settings import SITE_FAILURE_MARK, SITE_FAILURE_META


class BratsFedAvg(FedAvg):
    def __init__(self, *args, best_value: float | None = None, rounds_without_improvement: int = 0, **kwargs):
        """NVFlare's FedAvg controller, its early-stopping state seeded from the rounds a resumed job already ran.

        Args:
            best_value: the best value of the stop condition's metric in the earlier rounds (None: none yet).
            rounds_without_improvement: rounds since that best value, which --patience counts on from.
            args, kwargs: NVFlare's FedAvg arguments (NVFlare's job configuration looks for them in the base
                classes only when the constructor takes both *args and **kwargs).
        """
        super().__init__(*args, **kwargs)
        self.best_value = best_value
        self.rounds_without_improvement = rounds_without_improvement
        self.best_target_metric_value = best_value
        self.num_fl_rounds_without_improvement = rounds_without_improvement

    def is_curr_model_better(self, curr_model: FLModel) -> bool:
        if self.current_round == 0:
            return False  # the untrained model's Dice is no best value to improve on
        return super().is_curr_model_better(curr_model)

    def should_stop(self, metrics: dict | None = None) -> bool:
        return self.current_round != 0 and super().should_stop(metrics)


class ResumableFedAvgRecipe(FedAvgRecipe):
    def __init__(
        self, *, start_round: int = 0, best_value: float | None = None, rounds_without_improvement: int = 0, **kwargs
    ) -> None:
        """NVFlare's PyTorch FedAvg recipe, its controller a :class:`BratsFedAvg` that runs ``num_rounds`` rounds
        numbered start_round, start_round + 1, ...

        Args:
            start_round: the first round to run.
            best_value, rounds_without_improvement: the early-stopping state of the earlier rounds.
            kwargs: FedAvgRecipe's arguments.
        """
        self._resume_state = {
            "start_round": start_round,
            "best_value": best_value,
            "rounds_without_improvement": rounds_without_improvement,
        }
        super().__init__(**kwargs)

    def _create_controller(self, persistor_id: str, model_params, model_aggregator) -> FedAvg:
        """FedAvgRecipe's controller, as NVFlare 2.9's recipe builds it, but a BratsFedAvg."""
        return BratsFedAvg(
            num_clients=self.min_clients,
            num_rounds=self.num_rounds,
            persistor_id=persistor_id,
            model=model_params,
            save_filename=self.save_filename,
            aggregator=model_aggregator,
            stop_cond=self.stop_cond,
            patience=self.patience,
            task_name="train",
            exclude_vars=self.exclude_vars,
            aggregation_weights=self.aggregation_weights,
            memory_gc_rounds=self.server_memory_gc_rounds,
            enable_tensor_disk_offload=self.enable_tensor_disk_offload,
            **self._resume_state,
        )


def add_server_component(recipe, component) -> None:
    """Add a component to the server app (NVFlare's own recipe helpers, e.g. add_experiment_tracking, do it so)."""
    recipe._job.to_server(component)


def write_atomically(path: Path, write) -> None:
    """write(tmp_path), then rename into place: a reader sees the old file or the whole new one, never half."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class LastGlobalModelKeeper(Widget):
    def __init__(self, file_name: str = LAST_MODEL_FILE):
        """Saves the global model after every aggregation as {"model": state dict, "round": the round that made it}.

        Args:
            file_name: file in the server's job folder.
        """
        super().__init__()
        self.file_name = file_name

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type != AppEventType.AFTER_SHAREABLE_TO_LEARNABLE:
            return
        learnable = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
        round_num = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        if learnable is None or round_num is None:
            return
        weights = {k: torch.as_tensor(v) for k, v in learnable[ModelLearnableKey.WEIGHTS].items()}
        run_dir = Path(fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id()))
        write_atomically(
            run_dir / self.file_name, lambda tmp: torch.save({"model": weights, "round": int(round_num)}, tmp)
        )


class FinalEvaluationCollector(DXOFilter):
    def __init__(self, file_name: str = FINAL_EVALUATION_FILE):
        """Server input filter for "validate" results: records each site's per-case scores as {site: {case id:
        {score: value}}}; changes nothing.

        Args:
            file_name: file in the server's job folder.
        """
        super().__init__(supported_data_kinds=[DataKind.METRICS], data_kinds_to_filter=None)
        self.file_name = file_name
        self._lock = Lock()
        self._results: dict[str, dict] = {}
        self._path: Path | None = None

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        super().handle_event(event_type, fl_ctx)
        if event_type == EventType.START_RUN:
            run_dir = fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id())
            self._path = Path(run_dir) / self.file_name

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        peer = fl_ctx.get_peer_context()
        site = peer.get_identity_name() if peer else "unknown-site"
        cases = (dxo.data or {}).get(CASES_KEY)
        if cases:
            with self._lock:
                self._results[site] = cases
                if self._path is not None:
                    write_atomically(self._path, lambda tmp: tmp.write_text(json.dumps(self._results, indent=1)))
        return None


class SiteFailureWatcher(Filter):
    """Server input filter on every task result: a result carrying SITE_FAILURE_META (client.py sends one when an
    exception stops the site) is logged after SITE_FAILURE_MARK and ends the job (NVFlare's system panic)."""

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        try:
            failure = from_shareable(shareable).get_meta_prop(SITE_FAILURE_META)
        except Exception:  # not a DXO: nothing a site of this project sent
            return shareable
        if failure:
            self.log_error(fl_ctx, f"{SITE_FAILURE_MARK} {failure}")
            self.system_panic(f"{SITE_FAILURE_MARK} {failure}", fl_ctx)
        return shareable
