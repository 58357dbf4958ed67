"""NVFlare side of the privacy report: a server input filter that reads the privacy metadata of every received update.

It changes nothing in the update. For each train result it records the site's privacy figures for that round (for
SVT the numbers NVFlare's filter wrote into the update's metadata, for DP-SGD the ones the client's accountant
wrote), rewrites ``privacy_report.json`` in the server's job folder, and logs the site's cumulative epsilon to the
job's experiment tracking (TensorBoard: tag ``privacy_epsilon`` under ``tb_events/<site>``, step = FL round), as if
the site had logged it. An update without privacy metadata is logged as an error and listed in the report, which
makes job.py fail the run.

Travels to the server inside the job, with the rest of the brats_fl package.
"""

from __future__ import annotations

from pathlib import Path
from threading import Lock

import numpy as np
from nvflare.apis.analytix import ANALYTIC_EVENT_TYPE, AnalyticsDataType
from nvflare.apis.dxo import DXO, DataKind, MetaKey
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import EventScope, FLContextKey, ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.apis.utils.analytix_utils import create_analytic_dxo
from nvflare.app_common.app_constant import AppConstants

from brats_fl.privacy import SVT_BUDGET_META
from brats_fl.privacy.report import REPORT_FILE, TB_TAG, PrivacyLedger, load_report, write_report


def n_values_of(dxo: DXO) -> int:
    """Numbers in the update (what SVT's worst-case selection bound needs)."""
    return int(sum(np.size(v) for v in (dxo.data or {}).values()))


class PrivacyReportCollector(DXOFilter):
    def __init__(
        self,
        mechanism: str,
        settings: dict,
        report_file: str = REPORT_FILE,
        tb_tag: str = TB_TAG,
        previous_report: str | None = None,
    ):
        """Server input filter for "train" results.

        Args:
            mechanism: "svt" or "dpsgd", the mechanism every update must carry metadata of.
            settings: the job's privacy flags, copied into the report.
            report_file: file name of the report, written in the server's job folder.
            tb_tag: experiment-tracking tag of the cumulative epsilon.
            previous_report: a resumed job's report so far; its releases stay counted.
        """
        super().__init__(supported_data_kinds=[DataKind.WEIGHTS, DataKind.WEIGHT_DIFF], data_kinds_to_filter=None)
        self.mechanism = mechanism
        self.settings = dict(settings)
        self.report_file = report_file
        self.tb_tag = tb_tag
        self.previous_report = previous_report
        self._lock = Lock()
        self._ledger = PrivacyLedger(mechanism, settings)
        self._report_path: Path | None = None

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        super().handle_event(event_type, fl_ctx)
        if event_type == EventType.START_RUN:
            run_dir = fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id())
            with self._lock:
                self._ledger = self._starting_ledger()
                self._report_path = Path(run_dir) / self.report_file
                write_report(self._report_path, self._ledger.report())

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        peer = fl_ctx.get_peer_context()
        site = peer.get_identity_name() if peer else "unknown-site"
        round_num = self._round_of(dxo, shareable)
        with self._lock:
            record = self._ledger.add_update(
                site, round_num, dxo.data_kind, dict(dxo.meta), dxo.get_filter_history(), n_values_of(dxo)
            )
            cumulative = max(r["cumulative_epsilon"] for r in self._ledger.site_rounds(site)) if record else None
            if self._report_path is not None:
                write_report(self._report_path, self._ledger.report())
        if record is None:
            self.log_error(
                fl_ctx,
                f"update of {site} for round {round_num} ({dxo.data_kind}) carries no "
                f"{self.mechanism} privacy metadata: it left the site without the expected "
                "protection",
            )
            return None
        self.log_info(
            fl_ctx,
            f"{site} round {round_num}: epsilon {record['epsilon']:.6g}, cumulative "
            f"{cumulative:.6g} ({self.mechanism})",
        )
        self._log_site_scalar(fl_ctx, site, cumulative, round_num)
        return None  # the update passes unchanged

    def _starting_ledger(self) -> PrivacyLedger:
        if self.previous_report and Path(self.previous_report).is_file():
            return PrivacyLedger.from_report(load_report(self.previous_report))
        return PrivacyLedger(self.mechanism, self.settings)

    @staticmethod
    def _round_of(dxo: DXO, shareable: Shareable) -> int:
        """The FL round the update answers (the round NVFlare's SVT filter saw, else the task's round)."""
        budget = dxo.get_meta_prop(SVT_BUDGET_META) or {}
        round_num = budget.get("round")
        if round_num is None:
            round_num = shareable.get_cookie(
                AppConstants.CONTRIBUTION_ROUND,
                shareable.get_header(AppConstants.CURRENT_ROUND, dxo.get_meta_prop(MetaKey.CURRENT_ROUND, -1)),
            )
        return int(round_num)

    def _log_site_scalar(self, fl_ctx: FLContext, site: str, value: float, round_num: int) -> None:
        """Hand the figure to the job's analytics receiver exactly as a site's own logged scalar arrives: the engine
        fires a federation-scope analytics event whose data names the site as its origin, as NVFlare's fed-event
        runner does for events received from a site (FLComponent.fire_event would force local scope, origin server)."""
        data = create_analytic_dxo(
            tag=self.tb_tag, value=float(value), data_type=AnalyticsDataType.SCALAR, global_step=int(round_num)
        ).to_shareable()
        data.set_peer_props({ReservedKey.IDENTITY_NAME: site})
        with fl_ctx.get_engine().new_context() as event_ctx:
            event_ctx.set_prop(FLContextKey.EVENT_DATA, data, private=True, sticky=False)
            event_ctx.set_prop(FLContextKey.EVENT_SCOPE, EventScope.FEDERATION, private=True, sticky=False)
            event_ctx.get_engine().fire_event(f"fed.{ANALYTIC_EVENT_TYPE}", event_ctx)
