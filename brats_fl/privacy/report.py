"""The privacy report of a run: one record per site and round, added up into what each site has spent.

Both mechanisms write one record per site and round into ``privacy_report.json`` in the server's job folder (see
:mod:`brats_fl.privacy.report_filter`, which reads them off the updates as they arrive). This module builds, checks
and summarises that report without importing NVFlare or torch, so it is cheap to test.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from brats_fl.privacy import DPSGD_META, MECHANISMS, SVT_ACCOUNTANT_META, SVT_BUDGET_META
from brats_fl.privacy.dpsgd import DPSGD_ACCOUNTANT

REPORT_FILE = "privacy_report.json"
TB_TAG = "privacy_epsilon"  # cumulative epsilon of the site after each round, TensorBoard global step = FL round


GUARANTEES = {
    "svt": (
        "pure epsilon-DP (delta 0) of each client's whole weight-difference update per round, i.e. site-level: the "
        "unit of privacy is everything the site sent that round. Rounds compose by basic composition (the sum). No "
        "amplification by subsampling is claimed. Not covered: the validation metrics and the step count sent "
        "beside the update."
    ),
    "dpsgd": (
        "(epsilon, delta)-DP of each training case (one patient's MRI study) at each site, over all of that site's "
        "local steps so far, from Opacus's RDP accountant for the Poisson-sampled Gaussian mechanism (sampling "
        "rate 1/n per step). Every later use of the updates is post-processing. Not covered: the site's number of "
        "training cases (public, it sets the sampling rate), and patients who appear in several cases."
    ),
}


class PrivacyLedger:
    """Collects the privacy records of received updates; thread-safety is the caller's job."""

    def __init__(self, mechanism: str, settings: dict) -> None:
        if mechanism not in MECHANISMS:
            raise ValueError(f"mechanism must be one of {MECHANISMS}, got {mechanism!r}")
        self.mechanism = mechanism
        self.settings = dict(settings)
        self.records: dict[str, dict[int, dict]] = {}
        self.unprotected: list[dict] = []

    def add_update(
        self, site: str, round_num: int, data_kind: str, meta: dict, filter_history: list[str] | None = None
    ) -> dict | None:
        """Record one received update; returns the record, or None (and notes it) if it carries no privacy meta."""
        record = self._record_from_meta(meta)
        if record is None:
            self.unprotected.append({"site": site, "round": int(round_num), "data_kind": data_kind})
            return None
        record.update(round=int(round_num), data_kind=data_kind, filter_history=list(filter_history or []))
        self.records.setdefault(site, {})[int(round_num)] = record  # a re-sent round replaces the earlier one
        return record

    def _record_from_meta(self, meta: dict) -> dict | None:
        if self.mechanism == "svt":
            budget = meta.get(SVT_BUDGET_META)
            if not budget:
                return None
            record = {
                k: budget.get(k)
                for k in (
                    "epsilon_threshold",
                    "epsilon_query",
                    "epsilon_release",
                    "n_upload",
                    "acceptance_passes",
                    "delta",
                )
            }
            record["epsilon"] = float(budget["epsilon_total"])  # this round's spend, as NVFlare reports it
            filter_total = (meta.get(SVT_ACCOUNTANT_META) or {}).get("epsilon_total")
            record["filter_cumulative_epsilon"] = filter_total  # NVFlare's own running sum (resets with the client)
            return record
        dp = meta.get(DPSGD_META)
        return dict(dp) if dp else None

    def site_rounds(self, site: str) -> list[dict]:
        """The site's records in round order, each with the cumulative epsilon after that round."""
        rows, running = [], 0.0
        for round_num in sorted(self.records.get(site, {})):
            row = dict(self.records[site][round_num])
            if self.mechanism == "svt":
                running += row["epsilon"]  # basic composition of pure-DP rounds
                row["cumulative_epsilon"] = running
            else:
                row["cumulative_epsilon"] = row["epsilon"]  # the accountant's figure is already cumulative
            rows.append(row)
        return rows

    def report(self) -> dict:
        sites = {}
        for site in sorted(self.records):
            rows = self.site_rounds(site)
            sites[site] = {
                "epsilon": rows[-1]["cumulative_epsilon"],
                "delta": float(rows[-1].get("delta") or 0.0),
                "rounds_recorded": len(rows),
                "rounds": rows,
            }
        return {
            "mechanism": self.mechanism,
            "guarantee": GUARANTEES[self.mechanism],
            "accounting": "sum of NVFlare's per-call epsilon (pure DP, delta 0)"
            if self.mechanism == "svt"
            else f"Opacus {DPSGD_ACCOUNTANT} accountant, recomputed from the plan after every round",
            "settings": self.settings,
            "sites": sites,
            "max_epsilon": max((s["epsilon"] for s in sites.values()), default=0.0),
            "updates_without_privacy_metadata": list(self.unprotected),
        }


def write_report(path: str | Path, report: dict) -> None:
    """Write atomically, so a reader never sees half a file while the job is running."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def load_report(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def check_report(report: dict, sites: list[str], num_rounds: int) -> None:
    """ValueError unless every site has exactly one record per round and no update came without privacy meta."""
    if report.get("updates_without_privacy_metadata"):
        bad = report["updates_without_privacy_metadata"]
        raise ValueError(f"{len(bad)} update(s) reached the server without privacy metadata, first: {bad[0]}")
    for site in sites:
        rounds = [r["round"] for r in report["sites"].get(site, {}).get("rounds", [])]
        if rounds != list(range(num_rounds)):
            raise ValueError(f"privacy report of {site} covers rounds {rounds}, expected 0..{num_rounds - 1}")


def summary_lines(report: dict, path: str | Path) -> list[str]:
    """Lines for job.py's end-of-run summary."""
    sites = report["sites"]
    per_site = ", ".join(f"{s} {v['epsilon']:.4g}" for s, v in sites.items())
    if report["mechanism"] == "svt":
        head = "  privacy (SVT; pure DP, delta 0, per site update, summed over rounds): epsilon"
    else:
        deltas = sorted({v["delta"] for v in sites.values()})
        target = report["settings"].get("target_epsilon")
        head = (
            f"  privacy (DP-SGD; per patient, delta {', '.join(f'{d:.3g}' for d in deltas)}, "
            f"target epsilon {target}): epsilon"
        )
    return [f"{head} {per_site}", f"  privacy report: {path}"]
