"""The privacy audit's figures, from what the auditor observed (brats_fl/privacy/audit_observer.py) and the seed.

After an audited job, :func:`audit_job` reads ``privacy_audit_observations.json``, re-derives from the audit's seed
which canaries were included and which patients were held out (to grade the auditor's guesses, never to make them),
and writes ``privacy_audit.json`` next to it:

- per site and for all sites together: each canary's score (the sum over rounds of its cosine with the update the
  server received), the epsilon estimate (Gaussian fit), the one-run lower bound at 95% with its cap, and the
  separation of included from excluded canaries (AUC, TPR at 1% and 5% FPR, bootstrap intervals);
- real patients: each training case's score (the sum over rounds of the loss decrease the site's update causes on
  it, standardized within its site), and the separation of trained from held-out cases;
- the formal guarantee of the job's mechanism, at its own delta and at the audit's delta (1e-5), and the Dice.

The statistics are in brats_fl/privacy/audit_estimators.py; this module only gathers and formats. No torch, no
NVFlare: job.py and the comparison benchmark call it after the run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from brats_fl.job_results import JobResultError
from brats_fl.privacy import audit
from brats_fl.privacy import audit_estimators as est
from brats_fl.privacy.audit import OBSERVATIONS_FILE

AUDIT_FILE = "privacy_audit.json"
MECHANISM_NAMES = {"none": "no privacy", "svt": "SVT", "dpsgd": "DP-SGD"}
THREAT_MODEL = (
    "An honest-but-curious server that knows the canaries (the audit's seed gives their directions) and the "
    "candidate patients, and sees exactly the updates it receives from each site after the site's filters, every "
    "round. It does not know which canaries were inserted, when they entered a step, or which patients were trained "
    "on; those are used only to grade its guesses."
)


class AuditError(JobResultError):
    """The observations are missing or incomplete; the message says what and where."""


def _site_observations(observations: dict, site: str, rounds: int) -> list[dict]:
    per_round = observations["sites"].get(site, {})
    missing = [r for r in range(rounds) if str(r) not in per_round]
    if missing:
        raise AuditError(f"the auditor saw no update of {site} for round(s) {missing}")
    return [per_round[str(r)] for r in range(rounds)]


def site_scores(observations: dict, settings, site: str, rounds: int) -> dict[str, np.ndarray]:
    """A site's canary scores with their inclusion, and its patients' scores with whether each was held out."""
    records = _site_observations(observations, site, rounds)
    # A canary enters as a gradient and a step moves the weights against the gradient: the update leans towards
    # minus the canary. Score = sum over rounds of cos(canary, -update).
    canary = -np.sum([r["cosines"] for r in records], axis=0)
    out = {
        "canary": canary,
        "included": audit.included_canaries(settings.audit_seed, site, canary.size),
    }
    if all("loss_change" in r for r in records):
        patients = np.sum([r["loss_change"] for r in records], axis=0)
        out["patients"] = standardized(patients)
        out["held_out"] = audit.held_out_cases(settings.audit_seed, site, patients.size)
    return out


def canary_share(observations: dict, settings, sites: list[str], rounds: int) -> dict:
    """How much of each received update's squared norm lies along the site's included canaries: the sum of their
    squared cosines (the canaries are nearly orthogonal), less what as many excluded canaries explain by chance.
    Median and range over sites and rounds: how loud the canaries are next to the patients' signal and the noise."""
    shares = []
    for site in sites:
        included = audit.included_canaries(settings.audit_seed, site, settings.audit_canaries)
        for record in _site_observations(observations, site, rounds):
            squared = np.square(record["cosines"])
            chance = squared[~included].mean() * included.sum() if (~included).any() else 0.0
            shares.append(float(squared[included].sum() - chance))
    return {"median": float(np.median(shares)), "min": min(shares), "max": max(shares)}


def standardized(scores: np.ndarray) -> np.ndarray:
    """A site's patient scores minus their mean, over their sd: each site's update moves every loss by its own
    amount, so raw scores of different sites are not comparable; the auditor knows each candidate's site."""
    sd = scores.std()
    return (scores - scores.mean()) / sd if sd > 0 else scores - scores.mean()


def canary_figures(scores: np.ndarray, included: np.ndarray, samples: int) -> dict:
    return {
        "estimate": est.as_dict(est.gaussian_fit_estimate(scores[included], scores[~included])),
        "lower_bound": {
            **est.as_dict(bound := est.one_run_lower_bound(scores, included)),
            "saturated": bound.saturated,
        },
        "separation": est.as_dict(est.separation(scores[included], scores[~included], samples=samples)),
    }


def patient_figures(scores: np.ndarray, held_out: np.ndarray, samples: int) -> dict:
    return est.as_dict(est.separation(scores[~held_out], scores[held_out], samples=samples))


def formal_privacy(mechanism: str, privacy_report: dict | None) -> dict:
    """The job's formal guarantee, largest over sites: at its own delta and (DP-SGD) at the audit's delta."""
    from brats_fl.privacy.dpsgd import dpsgd_epsilon

    if mechanism == "none" or privacy_report is None:
        return {"epsilon": "inf", "delta": 0.0, "epsilon_at_audit_delta": "inf", "unit": "none"}
    sites = privacy_report["sites"]
    if mechanism == "svt":
        epsilon = privacy_report["max_epsilon"]
        return {"epsilon": epsilon, "delta": 0.0, "epsilon_at_audit_delta": epsilon, "unit": "site update, per round"}
    at_audit = []
    for summary in sites.values():
        last = summary["rounds"][-1]
        at_audit.append(
            dpsgd_epsilon(
                last["noise_multiplier"], last["sample_rate"], int(last["steps_so_far"]), est.AUDIT_DELTA,
                last["accountant"],
            )
        )  # fmt: skip
    return {
        "epsilon": privacy_report["max_epsilon"],
        "delta": max(s["delta"] for s in sites.values()),
        "epsilon_at_audit_delta": max(at_audit),
        "unit": "patient (training case)",
    }


def audit_job(
    server_job_dir: Path,
    settings,
    sites: list[str],
    rounds: int,
    dice: float | None,
    privacy_report: dict | None,
    samples: int = est.BOOTSTRAP_SAMPLES,
) -> dict:
    """Compute the audit's figures from the job's observations; writes and returns privacy_audit.json's content."""
    path = Path(server_job_dir) / OBSERVATIONS_FILE
    if not path.is_file():
        raise AuditError(f"no audit observations in {path}: did the job run with --audit?")
    observations = json.loads(path.read_text())
    per_site = {site: site_scores(observations, settings, site, rounds) for site in sites}
    mechanism = settings.dp_mechanism or "none"
    result = {
        "mechanism": mechanism,
        "canaries_inserted": not settings.audit_no_insert,
        "canaries_per_site": settings.audit_canaries,
        "canary_norm": settings.dp_max_grad_norm,
        "rounds": rounds,
        "delta": est.AUDIT_DELTA,
        "confidence": est.CONFIDENCE,
        "threat_model": THREAT_MODEL,
        "formal": formal_privacy(mechanism, privacy_report),
        "dice": dice,
        "sites": {},
        "scores": {},
    }
    for site, s in per_site.items():
        result["sites"][site] = {"canaries": canary_figures(s["canary"], s["included"], samples)}
        result["scores"][site] = {"canary": s["canary"].tolist(), "included": s["included"].tolist()}
        if "patients" in s:
            result["sites"][site]["patients"] = patient_figures(s["patients"], s["held_out"], samples)
            result["scores"][site].update(patients=s["patients"].tolist(), held_out=s["held_out"].tolist())
    result["canary_share_of_update"] = canary_share(observations, settings, sites, rounds)
    records = [r for site in sites for r in observations["sites"][site].values()]
    result["auditor_seconds"] = {
        "canaries": sum(r.get("canary_seconds", 0.0) for r in records),
        "patients": sum(r.get("patient_seconds", 0.0) for r in records),
        "updates": len(records),
    }
    pooled = {key: np.concatenate([s[key] for s in per_site.values()]) for key in ("canary", "included")}
    result["all_sites"] = {"canaries": canary_figures(pooled["canary"], pooled["included"], samples)}
    if all("patients" in s for s in per_site.values()):
        patients = np.concatenate([s["patients"] for s in per_site.values()])
        held_out = np.concatenate([s["held_out"] for s in per_site.values()])
        result["all_sites"]["patients"] = patient_figures(patients, held_out, samples)
    (Path(server_job_dir) / AUDIT_FILE).write_text(json.dumps(result, indent=1) + "\n")
    return result


# ---------------------------------------------------------------------------------------------------------------
# Presenting it
# ---------------------------------------------------------------------------------------------------------------
def _number(value) -> float:
    return math.inf if value == "inf" else float(value)


def _fmt(value, digits: int = 3) -> str:
    value = _number(value)
    if math.isinf(value):
        return "inf"
    return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.2e}"


def _interval(values) -> str:
    return f"[{_number(values[0]):.2f}, {_number(values[1]):.2f}]"


TABLE_HEADER = (
    "mechanism",
    "formal epsilon (delta)",
    "estimate",
    "lower bound (cap)",
    "canary AUC",
    "TPR@1%FPR",
    "patient AUC",
    "Dice",
)


def table_row(result: dict) -> tuple[str, ...]:
    """One row of the comparison table, all sites pooled (see docs/privacy.md for what each figure means)."""
    formal = result["formal"]
    mechanism = result["mechanism"]
    if mechanism == "none":
        formal_text = "none (no guarantee)"
    elif mechanism == "svt":
        formal_text = f"{_fmt(formal['epsilon'])} (delta 0)"
    else:
        formal_text = (
            f"{_fmt(formal['epsilon'])} (delta {formal['delta']:.2g}); {_fmt(formal['epsilon_at_audit_delta'])} at "
            f"{result['delta']:g}"
        )
    canaries = result["all_sites"]["canaries"]
    estimate, bound, sep = canaries["estimate"], canaries["lower_bound"], canaries["separation"]
    patients = result["all_sites"].get("patients")
    name = MECHANISM_NAMES[mechanism] + ("" if result["canaries_inserted"] else " (no canaries)")
    return (
        name,
        formal_text,
        f"{_fmt(estimate['epsilon'])} (mu {_fmt(estimate['mu'])})",
        f"{_number(bound['epsilon']):.2f} ({_number(bound['cap']):.2f})",
        f"{sep['auc']:.3f} {_interval(sep['auc_interval'])}",
        f"{sep['tpr_at_fpr']['0.01']:.2f} {_interval(sep['tpr_intervals']['0.01'])}",
        f"{patients['auc']:.2f} {_interval(patients['auc_interval'])}" if patients else "-",
        f"{result['dice']:.4f}" if result.get("dice") is not None else "-",
    )


def markdown_table(rows: list[tuple[str, ...]]) -> list[str]:
    return [
        "| " + " | ".join(TABLE_HEADER) + " |",
        "| " + " | ".join("---" for _ in TABLE_HEADER) + " |",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def summary_lines(result: dict, path: Path) -> list[str]:
    """job.py's end-of-run lines on the audit."""
    canaries = result["all_sites"]["canaries"]
    bound, estimate = canaries["lower_bound"], canaries["estimate"]
    n = len(result["scores"]) * result["canaries_per_site"]
    inserted = "inserted with probability 1/2" if result["canaries_inserted"] else "none inserted (--audit_no_insert)"
    saturated = ", saturated" if bound["saturated"] else ""
    return [
        f"  privacy audit ({n} canaries over {len(result['scores'])} sites, {inserted}; epsilons at delta "
        f"{result['delta']:g}; what each figure means: docs/privacy.md, 'The privacy audit'):",
        *(f"    {line}" for line in markdown_table([table_row(result)])),
        f"    the estimate assumes Gaussian scores and is no guarantee; the lower bound holds at 95% and cannot "
        f"exceed {_number(bound['cap']):.2f} with these canaries{saturated}; estimate mu {_fmt(estimate['mu'])}",
        f"    the included canaries make {100 * result['canary_share_of_update']['median']:.1f}% of a received "
        "update's squared norm (median over sites and rounds)",
        *auditor_cost_lines(result),
        f"  privacy audit: {path}",
    ]


def auditor_cost_lines(result: dict) -> list[str]:
    cost = result.get("auditor_seconds")
    if not cost:
        return []
    return [
        f"    the auditor's time at the server: {cost['canaries']:.0f} s scoring canaries, {cost['patients']:.0f} s "
        f"testing patients, over {cost['updates']} updates (in the background, while the sites train)"
    ]
