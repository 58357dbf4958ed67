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
from brats_fl.privacy.dpsgd import DPSGD_ACCOUNTANT, dpsgd_epsilon
from brats_fl.privacy.svt import SVTRoundBudget

REPORT_FILE = "privacy_report.json"
TB_TAG = "privacy_epsilon"  # cumulative epsilon of the site after each round, TensorBoard global step = FL round


WHAT_LEAVES_A_SITE = (
    "Besides the protected update, a site sends: the validation Dice of the global model it received (computed on "
    "the validation cases, which no mechanism protects: a shared set in the paper's setting, the site's own patients "
    "in a real federation), the number of local steps (fixed by the plan: training cases x epochs), and this privacy "
    "metadata. The training loss and step count are logged into the site's own job folder (local_tb_events/) and "
    "its log, which stay at the site."
)
GUARANTEES = {
    "svt": (
        "pure epsilon-DP (delta 0) of each site's whole weight-difference update per round, i.e. site-level: the "
        "unit of privacy is everything the site's update says about its training data that round. Rounds compose by "
        "basic composition (the sum). Each round is counted at the bound epsilon_threshold + epsilon_query x "
        "n_values / n_upload + epsilon_release, because NVFlare's filter finishes its pass over the update after "
        "the c-th accepted value and does not report how many it accepted (the worst case, every value, is used); "
        "NVFlare's own figure is kept as epsilon_nvflare. No amplification by subsampling is claimed. "
        + WHAT_LEAVES_A_SITE
    ),
    "dpsgd": (
        "(epsilon, delta)-DP of each training case (one patient's MRI study) at each site, over all of that site's "
        "local steps so far, from Opacus's RDP accountant for the Poisson-sampled Gaussian mechanism (sampling "
        "rate 1/n per step). Every later use of the updates is post-processing. Not covered: the site's number of "
        "training cases (public, it sets the sampling rate), and patients who appear in several cases. "
        + WHAT_LEAVES_A_SITE
    ),
}
ACCOUNTING = {
    "svt": "sum over every release of the bound above (pure DP, delta 0)",
    "dpsgd": f"Opacus {DPSGD_ACCOUNTANT} accountant, recomputed from the plan after every round",
}


def dpsgd_cumulative_epsilon(record: dict, steps_released: int) -> float:
    """The site's epsilon after a release: the plan's figure in the record (which assumes one release per round so
    far), or, when the site released more steps than that (a round released twice), the accountant over all of
    them; the larger of the two, so that neither a repeated nor a missing round is under-counted."""
    if steps_released <= int(record["steps_so_far"]):
        return float(record["epsilon"])
    return max(
        float(record["epsilon"]),
        dpsgd_epsilon(
            record["noise_multiplier"], record["sample_rate"], steps_released, record["delta"], record["accountant"]
        ),
    )


class PrivacyLedger:
    """Every privacy-relevant release the server received, per site; thread-safety is the caller's job.

    A site that sends two results for one round (a round repeated after a job was resumed, say) has released twice,
    and both count: under SVT by adding the second release's epsilon, under DP-SGD by running the accountant over all
    the local steps the site's releases took (which then exceeds the plan's figure). Nothing is dropped."""

    def __init__(self, mechanism: str, settings: dict) -> None:
        if mechanism not in MECHANISMS:
            raise ValueError(f"mechanism must be one of {MECHANISMS}, got {mechanism!r}")
        self.mechanism = mechanism
        self.settings = dict(settings)
        self.records: dict[str, list[dict]] = {}
        self.unprotected: list[dict] = []
        self.problems: list[str] = []

    def add_update(
        self,
        site: str,
        round_num: int,
        data_kind: str,
        meta: dict,
        filter_history: list[str] | None = None,
        n_values: int | None = None,
    ) -> dict | None:
        """Record one received update of n_values numbers; returns the record, or None (and notes the update as
        unprotected) if it carries no privacy metadata or parts of it passed the mechanism unprotected."""
        record = self._record_from_meta(meta, n_values)
        where = {"site": site, "round": int(round_num), "data_kind": data_kind}
        if record is None:
            self.unprotected.append(where)
            return None
        if record.pop("unprotected_part", False):
            self.unprotected.append({**where, "why": "SVTPrivacy passed scalar values through without noise"})
        record.update(round=int(round_num), data_kind=data_kind, filter_history=list(filter_history or []))
        self.records.setdefault(site, []).append(record)
        return record

    @classmethod
    def from_report(cls, report: dict) -> PrivacyLedger:
        """The ledger a report was written from, to go on adding releases to it (a resumed job)."""
        ledger = cls(report["mechanism"], report["settings"])
        for site, summary in report["sites"].items():
            ledger.records[site] = [
                {k: v for k, v in row.items() if k != "cumulative_epsilon"} for row in summary["rounds"]
            ]
        ledger.unprotected = list(report.get("updates_without_privacy_metadata", []))
        ledger.problems = list(report.get("accounting_problems", []))
        return ledger

    def _record_from_meta(self, meta: dict, n_values: int | None) -> dict | None:
        if self.mechanism == "dpsgd":
            dp = meta.get(DPSGD_META)
            return dict(dp) if dp else None
        budget = meta.get(SVT_BUDGET_META)
        if not budget:
            return None
        keys = ("epsilon_threshold", "epsilon_query", "epsilon_release", "n_upload", "acceptance_passes", "delta")
        record = {k: budget.get(k) for k in keys}
        record["epsilon_nvflare"] = float(budget["epsilon_total"])  # NVFlare's figure for the call
        if not n_values:
            raise ValueError("an SVT release is counted at its worst-case bound, which needs the update's size")
        record["n_values"] = n_values = int(n_values)
        call = SVTRoundBudget(n_values, int(budget["n_upload"]), *(float(budget[k]) for k in keys[:3]))
        record["epsilon"] = call.epsilon_bound  # what this release is counted at: the bound that holds
        record["filter_cumulative_epsilon"] = (meta.get(SVT_ACCOUNTANT_META) or {}).get("epsilon_total")
        record["unprotected_part"] = bool(budget.get("has_scalar_passthrough"))
        return record

    def site_rounds(self, site: str) -> list[dict]:
        """The site's releases in round order, each with the site's cumulative epsilon after it."""
        rows, running, steps = [], 0.0, 0
        for row in sorted(self.records.get(site, []), key=lambda r: r["round"]):
            row = dict(row)
            if self.mechanism == "svt":
                running += row["epsilon"]  # basic composition of pure-DP releases
                row["cumulative_epsilon"] = running
            else:
                steps += int(row["steps_this_round"])
                row["cumulative_epsilon"] = dpsgd_cumulative_epsilon(row, steps)
            rows.append(row)
        return rows

    def report(self) -> dict:
        sites = {}
        for site in sorted(self.records):
            rows = self.site_rounds(site)
            sites[site] = {
                "epsilon": max(r["cumulative_epsilon"] for r in rows),
                "delta": float(rows[-1].get("delta") or 0.0),
                "rounds_recorded": len({r["round"] for r in rows}),
                "releases_recorded": len(rows),
                "rounds": rows,
            }
        return {
            "mechanism": self.mechanism,
            "guarantee": GUARANTEES[self.mechanism],
            "accounting": ACCOUNTING[self.mechanism],
            "settings": self.settings,
            "sites": sites,
            "max_epsilon": max((s["epsilon"] for s in sites.values()), default=0.0),
            "updates_without_privacy_metadata": list(self.unprotected),
            "accounting_problems": list(self.problems),
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
    """ValueError unless every site's releases cover every round, no update came without protection and nothing
    made the accounting incomplete."""
    if report.get("updates_without_privacy_metadata"):
        bad = report["updates_without_privacy_metadata"]
        raise ValueError(f"{len(bad)} update(s) reached the server without the expected protection, first: {bad[0]}")
    if report.get("accounting_problems"):
        raise ValueError(f"accounting incomplete: {report['accounting_problems'][0]}")
    for site in sites:
        rounds = sorted({r["round"] for r in report["sites"].get(site, {}).get("rounds", [])})
        if rounds != list(range(num_rounds)):
            raise ValueError(f"privacy report of {site} covers rounds {rounds}, expected 0..{num_rounds - 1}")


def summary_lines(report: dict, path: str | Path) -> list[str]:
    """Lines for job.py's end-of-run summary."""
    sites = report["sites"]
    per_site = ", ".join(f"{s} {v['epsilon']:.4g}" for s, v in sites.items())
    if report["mechanism"] == "svt":
        head = "  privacy (SVT; pure DP, delta 0, per site update, bound summed over rounds): epsilon"
    else:
        deltas = sorted({v["delta"] for v in sites.values()})
        target = report["settings"].get("target_epsilon")
        head = (
            f"  privacy (DP-SGD; per patient, delta {', '.join(f'{d:.3g}' for d in deltas)}, "
            f"target epsilon {target}): epsilon"
        )
    return [f"{head} {per_site}", f"  privacy report: {path}"]
