"""The NVFlare components job.py adds to its jobs; they run on the server, inside the job. (The FedAvg controller
that can start at a later round is with the other NVFlare 2.9 specifics, in brats_fl/nvflare_compat.py.)

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
from pathlib import Path
from threading import Lock

import torch
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.event_type import EventType
from nvflare.apis.filter import Filter
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.model import ModelLearnableKey
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.widgets.widget import Widget

from brats_fl.evaluation import CASES_KEY
from brats_fl.job_results import FINAL_EVALUATION_FILE, LAST_MODEL_FILE, write_atomically
from brats_fl.settings import SITE_FAILURE_MARK, SITE_FAILURE_META


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
