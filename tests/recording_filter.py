"""Test-only NVFlare components that save what passes through them: a filter on task results (what the sites
computed, what the server received) and a receiver of the analytics events the sites stream to the server. Together
they record everything that arrives at the server from the sites. They travel inside the job's custom folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from nvflare.apis.analytix import ANALYTIC_EVENT_TYPE, AnalyticsData
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.widgets.streaming import AnalyticsReceiver


class UpdateRecorder(DXOFilter):
    def __init__(self, out_dir: str, tag: str):
        super().__init__(supported_data_kinds=[DataKind.WEIGHTS, DataKind.WEIGHT_DIFF], data_kinds_to_filter=None)
        self.out_dir = out_dir
        self.tag = tag

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO:
        peer = fl_ctx.get_peer_context()
        site = peer.get_identity_name() if self.tag == "received" and peer else fl_ctx.get_identity_name()
        round_num = shareable.get_cookie(
            AppConstants.CONTRIBUTION_ROUND, shareable.get_header(AppConstants.CURRENT_ROUND)
        )
        stem = Path(self.out_dir) / f"{self.tag}_{site}_round{round_num}"
        stem.parent.mkdir(parents=True, exist_ok=True)
        arrays = {k: np.asarray(v.detach().cpu() if hasattr(v, "detach") else v) for k, v in dxo.data.items()}
        np.savez(str(stem) + ".npz", **arrays)
        meta = {
            "data_kind": dxo.data_kind,
            "task": shareable.get_header(ReservedKey.TASK_NAME),
            "meta_keys": sorted(dxo.meta.keys()),
            "meta": dxo.meta,
            "svt_privacy_budget": dxo.get_meta_prop("svt_privacy_budget"),
        }
        Path(str(stem) + ".json").write_text(json.dumps(meta, default=str))
        return dxo


class AnalyticsRecorder(AnalyticsReceiver):
    """Appends (origin site, tag, step) of every analytics event that reaches the server to events.jsonl."""

    def __init__(self, out_dir: str):
        super().__init__(events=[f"fed.{ANALYTIC_EVENT_TYPE}"])
        self.out_dir = out_dir

    def initialize(self, fl_ctx: FLContext):
        Path(self.out_dir).mkdir(parents=True, exist_ok=True)

    def save(self, fl_ctx: FLContext, shareable: Shareable, record_origin: str):
        data = AnalyticsData.from_dxo(from_shareable(shareable))
        row = {"site": record_origin, "tag": data.tag, "step": data.step}
        with open(Path(self.out_dir) / "events.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    def finalize(self, fl_ctx: FLContext):
        pass
