"""What a run's differential privacy actually guarantees: accounting and the per-run privacy report.

Two mechanisms, chosen with job.py's ``--dp_mechanism``:

- ``svt`` (the paper's): NVFlare's ``SVTPrivacy`` filter on each client's outgoing weight difference. The filter
  reports the budget of every call in the update's metadata; the job's report only *reads* those numbers. The
  formula below re-derives them from the filter's settings, to predict a run's figures before it starts
  (``python -m privacy svt``) and to test that NVFlare reports what its code does.
- ``dpsgd``: per-case gradient clipping and Gaussian noise in each site's local training (dpsgd.py). The noise
  multiplier is calibrated here, before training, with Opacus's RDP accountant (never a hand-written one).

Both write one record per site and round into ``privacy_report.json`` (see privacy_components.py); this module builds,
checks and summarises that report without importing NVFlare, so it is cheap to test.

Usage: ``python -m privacy svt [--init_filters 16 ...]`` or ``python -m privacy dpsgd --n_train 60 ...``
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

# Metadata keys on a client's update (a DXO's meta). The first two are NVFlare's own (set by SVTPrivacy).
SVT_BUDGET_META = "svt_privacy_budget"
SVT_ACCOUNTANT_META = "svt_privacy_accountant"
DPSGD_META = "dpsgd_privacy"
REPORT_FILE = "privacy_report.json"
TB_TAG = "privacy_epsilon"  # cumulative epsilon of the site after each round, TensorBoard global step = FL round
MECHANISMS = ("svt", "dpsgd")
DPSGD_ACCOUNTANT = "rdp"  # Opacus's Renyi-DP accountant for the sampled Gaussian mechanism
DEFAULT_DELTA_FACTOR = 0.1  # default delta = 0.1 / (training cases at the site): well below 1/n


class PrivacyConfigError(ValueError):
    """Privacy settings that cannot give the promised guarantee; the message names the flag to change."""


# ---------------------------------------------------------------------------------------------------------------
# SVT: the budget NVFlare's SVTPrivacy spends per call, from its formula
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SVTSettings:
    """The SVTPrivacy constructor arguments job.py uses (tau and replace are left at NVFlare's defaults)."""

    fraction: float
    epsilon: float
    noise_var: float
    gamma: float
    tau: float = 1e-6
    replace: bool = True


@dataclass(frozen=True)
class SVTRoundBudget:
    """One call of the filter on an update of n_values numbers (one client, one round)."""

    n_values: int
    n_upload: int  # values to release
    epsilon_threshold: float
    epsilon_query: float
    epsilon_release: float
    gamma: float

    @property
    def epsilon_total(self) -> float:
        return self.epsilon_threshold + self.epsilon_query + self.epsilon_release

    @property
    def threshold_noise_scale(self) -> float:
        """Laplace scale of the noise on the acceptance threshold (drawn once per call)."""
        return self.gamma / self.epsilon_threshold

    @property
    def query_noise_scale(self) -> float:
        """Laplace scale of the noise added to every |clipped value| compared with the threshold."""
        return 2.0 * self.gamma * self.n_upload / self.epsilon_query

    @property
    def release_noise_scale(self) -> float:
        """Laplace scale of the noise added to each released (clipped) value."""
        return 2.0 * self.gamma * self.n_upload / self.epsilon_release


def svt_round_budget(n_values: int, settings: SVTSettings) -> SVTRoundBudget:
    """The per-call budget SVTPrivacy (nvflare 2.9) reports, re-derived from its documented formula.

    n_upload = ceil(fraction * n); epsilon is split threshold : query = 1 : (2 n_upload)^(2/3) (the standard
    allocation for non-monotonic queries); the release phase costs n_upload * noise_var when no explicit
    epsilon_release is given.
    """
    if n_values <= 0:
        raise ValueError(f"n_values must be positive, got {n_values}")
    n_upload = min(math.ceil(n_values * settings.fraction), n_values)
    epsilon_threshold = settings.epsilon / (1.0 + (2.0 * n_upload) ** (2.0 / 3.0))
    return SVTRoundBudget(
        n_values=n_values,
        n_upload=n_upload,
        epsilon_threshold=epsilon_threshold,
        epsilon_query=settings.epsilon - epsilon_threshold,
        epsilon_release=n_upload * settings.noise_var,
        gamma=settings.gamma,
    )


def svt_selection_bias(budget: SVTRoundBudget) -> float:
    """How much a value's size can change its chance of being selected: max P(accept | v) / P(accept | v') - 1.

    A query is |clip(v)| in [0, gamma] plus Laplace(b) noise, compared with one threshold; shifting the query by at
    most gamma changes the acceptance probability by at most a factor exp(gamma / b). When this is ~0, selection
    is a random draw that ignores the values: it is not "top-k by magnitude".
    """
    return math.expm1(budget.gamma / budget.query_noise_scale)


def svt_distinct_fraction_range(budget: SVTRoundBudget, replace: bool = True) -> tuple[float, float]:
    """Expected fraction of the n values that leave the filter non-zero (every other value is sent as 0).

    The filter draws n_upload of its accepted values, with replacement by default, so duplicates collapse. The
    count accepted lies between n_upload and n; the expected number of distinct draws is A (1 - (1 - 1/A)^c) for
    A accepted and c drawn, which grows with A: the two ends give the range.
    """
    c, n = budget.n_upload, budget.n_values
    if not replace:
        return c / n, c / n

    def distinct(accepted: int) -> float:
        return accepted * -math.expm1(c * math.log1p(-1.0 / accepted)) if accepted > 1 else float(accepted)

    return distinct(c) / n, distinct(n) / n


def svt_figures(n_values: int, settings: SVTSettings, num_rounds: int) -> dict[str, float]:
    """The figures a user of these settings gets, per client: per round and over the planned rounds."""
    b = svt_round_budget(n_values, settings)
    low, high = svt_distinct_fraction_range(b, settings.replace)
    return {
        "n_values": b.n_values,
        "n_upload": b.n_upload,
        "epsilon_threshold": b.epsilon_threshold,
        "epsilon_query": b.epsilon_query,
        "epsilon_release": b.epsilon_release,
        "epsilon_per_round": b.epsilon_total,
        "num_rounds": num_rounds,
        "epsilon_all_rounds": b.epsilon_total * num_rounds,
        "gamma": settings.gamma,
        "threshold_noise_scale": b.threshold_noise_scale,
        "query_noise_scale": b.query_noise_scale,
        "release_noise_scale": b.release_noise_scale,
        "release_noise_sd_over_gamma": math.sqrt(2.0) * b.release_noise_scale / settings.gamma,
        "selection_bias": svt_selection_bias(b),
        "released_nonzero_fraction_low": low,
        "released_nonzero_fraction_high": high,
    }


# ---------------------------------------------------------------------------------------------------------------
# DP-SGD: calibration before training and epsilon spent after each round (Opacus accountants)
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DPSGDPlan:
    """Everything that fixes a site's DP-SGD guarantee. Each local step samples every training case independently
    with probability 1/n_train (Poisson sampling, expected batch size 1, as the paper's batch of 1), and an epoch is
    n_train such steps, so the number of steps per round is fixed in advance."""

    n_train: int
    num_rounds: int
    epochs_per_round: int
    target_epsilon: float
    delta: float
    max_grad_norm: float
    noise_multiplier: float
    accountant: str = DPSGD_ACCOUNTANT

    @property
    def sample_rate(self) -> float:
        return 1.0 / self.n_train

    @property
    def steps_per_epoch(self) -> int:
        return self.n_train

    @property
    def steps_per_round(self) -> int:
        return self.epochs_per_round * self.steps_per_epoch

    @property
    def total_steps(self) -> int:
        return self.num_rounds * self.steps_per_round


def default_delta(n_train: int) -> float:
    """0.1 / n: a delta of 1/n or more would allow a mechanism that publishes one patient's record outright."""
    return DEFAULT_DELTA_FACTOR / n_train


def check_dpsgd_values(target_epsilon: float, delta: float | None, max_grad_norm: float) -> None:
    """The values no plan can use, whatever the data."""
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise PrivacyConfigError(f"--dp_target_epsilon {target_epsilon}: need a finite value > 0")
    if delta is not None and not 0.0 < delta < 1.0:
        raise PrivacyConfigError(f"--dp_delta {delta}: need a value in (0, 1), e.g. below 1/(training cases per site)")
    if not (max_grad_norm > 0 and math.isfinite(max_grad_norm)):
        raise PrivacyConfigError(f"--dp_max_grad_norm {max_grad_norm}: need a finite value > 0")


def dpsgd_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                  accountant: str = DPSGD_ACCOUNTANT) -> float:
    """Epsilon spent after `steps` sampled-Gaussian steps, from an Opacus accountant ("rdp" or "prv")."""
    from opacus.accountants import create_accountant

    if steps == 0:
        return 0.0
    acc = create_accountant(mechanism=accountant)
    acc.history = [(noise_multiplier, sample_rate, steps)]
    return float(acc.get_epsilon(delta=delta))


def plan_dpsgd(n_train: int, num_rounds: int, epochs_per_round: int, target_epsilon: float, delta: float | None,
               max_grad_norm: float, site: str = "the site") -> DPSGDPlan:
    """Calibrate the noise multiplier so that after all planned steps every training case is (target, delta)-DP."""
    from opacus.accountants.utils import get_noise_multiplier

    check_dpsgd_values(target_epsilon, delta, max_grad_norm)
    if num_rounds < 1 or epochs_per_round < 1:
        raise PrivacyConfigError(f"--num_rounds {num_rounds} / --aggregation_epochs {epochs_per_round}: need >= 1 each")
    if n_train < 2:
        raise PrivacyConfigError(
            f"{site} has {n_train} training case(s): DP-SGD samples each case with probability 1/n per step and "
            "needs at least 2 cases to protect any of them; use --dp_mechanism svt or more data"
        )
    if delta is None:
        delta = default_delta(n_train)
    elif delta >= 1.0 / n_train:
        raise PrivacyConfigError(
            f"--dp_delta {delta}: {site} has {n_train} training cases, so delta must be below 1/{n_train} = "
            f"{1.0 / n_train:.3g} (leave it out for the default 0.1/n)"
        )
    steps = num_rounds * epochs_per_round * n_train
    try:
        sigma = get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=1.0 / n_train,
                                     steps=steps, accountant=DPSGD_ACCOUNTANT)
    except ValueError as e:
        raise PrivacyConfigError(
            f"--dp_target_epsilon {target_epsilon}: the {DPSGD_ACCOUNTANT} accountant finds no noise level reaching "
            f"it for {site} ({steps} steps at sampling rate 1/{n_train}, delta {delta:.3g}): {e} Raise the target "
            "or plan fewer rounds/epochs"
        ) from None
    return DPSGDPlan(n_train, num_rounds, epochs_per_round, target_epsilon, delta, max_grad_norm, float(sigma))


def dpsgd_round_record(plan: DPSGDPlan, round_num: int) -> dict:
    """The site's privacy after FL round `round_num` (0-based), recomputed from the plan and the round number.

    Recomputing instead of keeping a running accountant makes the figure survive a restart of the client process
    (the simulator swaps clients when --threads < --n_clients). It assumes the site trained in every round so far,
    which FedAvg here guarantees; were a round skipped, the figure would overstate the spend, never understate it.
    """
    steps_so_far = (round_num + 1) * plan.steps_per_round
    return {
        "round": int(round_num),
        "epsilon": dpsgd_epsilon(plan.noise_multiplier, plan.sample_rate, steps_so_far, plan.delta, plan.accountant),
        "delta": plan.delta,
        "target_epsilon": plan.target_epsilon,
        "noise_multiplier": plan.noise_multiplier,
        "max_grad_norm": plan.max_grad_norm,
        "sample_rate": plan.sample_rate,
        "n_train": plan.n_train,
        "steps_this_round": plan.steps_per_round,
        "steps_so_far": steps_so_far,
        "planned_total_steps": plan.total_steps,
        "accountant": plan.accountant,
    }


# ---------------------------------------------------------------------------------------------------------------
# The report: one record per site and round, read from each update's metadata
# ---------------------------------------------------------------------------------------------------------------
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

    def add_update(self, site: str, round_num: int, data_kind: str, meta: dict,
                   filter_history: list[str] | None = None) -> dict | None:
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
            record = {k: budget.get(k) for k in ("epsilon_threshold", "epsilon_query", "epsilon_release",
                                                 "n_upload", "acceptance_passes", "delta")}
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
            "accounting": "sum of NVFlare's per-call epsilon (pure DP, delta 0)" if self.mechanism == "svt"
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
        head = (f"  privacy (DP-SGD; per patient, delta {', '.join(f'{d:.3g}' for d in deltas)}, "
                f"target epsilon {target}): epsilon")
    return [f"{head} {per_site}", f"  privacy report: {path}"]


# ---------------------------------------------------------------------------------------------------------------
# Command line: predict a configuration's figures before running it
# ---------------------------------------------------------------------------------------------------------------
def _count_model_values(init_filters: int) -> int:
    """Numbers in the update the client sends (its state_dict; SegResNet has no buffers)."""
    from model import BratsSegResNet

    return sum(v.numel() for v in BratsSegResNet(init_filters=init_filters).state_dict().values())


def _print_table(rows: dict) -> None:
    width = max(len(k) for k in rows)
    for key, value in rows.items():
        text = f"{value:,}" if isinstance(value, int) else f"{value:.6g}"
        print(f"  {key:<{width}}  {text}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m privacy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    svt = sub.add_parser("svt", help="per-client budget of NVFlare's SVT filter for a model and settings")
    svt.add_argument("--init_filters", type=int, default=16, help="SegResNet base width (default: 16, 4.7M values)")
    svt.add_argument("--fraction", type=float, default=0.9, help="job.py --dp_fraction (default: 0.9)")
    svt.add_argument("--epsilon", type=float, default=0.001, help="job.py --dp_epsilon (default: 0.001)")
    svt.add_argument("--noise_var", type=float, default=1.0, help="job.py --dp_noise_var (default: 1.0)")
    svt.add_argument("--gamma", type=float, default=1e-4, help="job.py --dp_gamma (default: 1e-4)")
    svt.add_argument("--num_rounds", type=int, default=600, help="FL rounds to sum over (default: 600)")
    dp = sub.add_parser("dpsgd", help="noise multiplier and epsilon per round of a DP-SGD plan")
    dp.add_argument("--n_train", type=int, default=60, help="training cases at the site (default: 60)")
    dp.add_argument("--num_rounds", type=int, default=600, help="FL rounds (default: 600)")
    dp.add_argument("--aggregation_epochs", type=int, default=1, help="local epochs per round (default: 1)")
    dp.add_argument("--target_epsilon", type=float, default=8.0, help="job.py --dp_target_epsilon (default: 8)")
    dp.add_argument("--delta", type=float, help="job.py --dp_delta (default: 0.1 / n_train)")
    dp.add_argument("--max_grad_norm", type=float, default=1.0, help="job.py --dp_max_grad_norm (default: 1.0)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "svt":
        for flag in ("fraction", "epsilon", "noise_var", "gamma"):
            if not getattr(args, flag) > 0 or (flag == "fraction" and args.fraction > 1):
                print(f"error: --{flag} {getattr(args, flag)}: need > 0 (fraction: in (0, 1])", file=sys.stderr)
                return 2
        if args.init_filters < 8 or args.init_filters % 8 or args.num_rounds < 1:
            print("error: --init_filters needs a positive multiple of 8 and --num_rounds >= 1", file=sys.stderr)
            return 2
        settings = SVTSettings(args.fraction, args.epsilon, args.noise_var, args.gamma)
        print(f"NVFlare SVTPrivacy, per client (SegResNet init_filters {args.init_filters}, {asdict(settings)}):")
        _print_table(svt_figures(_count_model_values(args.init_filters), settings, args.num_rounds))
        return 0
    try:
        plan = plan_dpsgd(args.n_train, args.num_rounds, args.aggregation_epochs, args.target_epsilon, args.delta,
                          args.max_grad_norm)
    except PrivacyConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"DP-SGD plan: n_train {plan.n_train}, sampling rate {plan.sample_rate:.4g}, {plan.steps_per_round} "
          f"steps/round x {plan.num_rounds} rounds = {plan.total_steps} steps, delta {plan.delta:.3g}, "
          f"noise multiplier {plan.noise_multiplier:.4f} (noise sd {plan.noise_multiplier * plan.max_grad_norm:.4g} "
          f"on the summed clipped gradients)")
    last = plan.num_rounds - 1
    shown = sorted({r for r in (0, 1, plan.num_rounds // 4, plan.num_rounds // 2, last) if 0 <= r <= last})
    for r in shown:
        print(f"  after round {r:>4}: epsilon {dpsgd_round_record(plan, r)['epsilon']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
