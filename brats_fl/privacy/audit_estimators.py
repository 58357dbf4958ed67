"""The statistics of the privacy audit: from canary scores to epsilon figures, and how well scores separate.

Inputs are plain arrays: one score per canary (or per patient) and whether it was really included. Nothing here
imports torch or NVFlare, so every function is tested on synthetic mechanisms whose epsilon is known
(tests/test_audit_estimators.py).

- :func:`gaussian_fit_estimate`: an *estimate* of epsilon, after Andrew et al., "One-shot Empirical Privacy
  Estimation for Federated Learning" (ICLR 2024, arXiv:2302.03098). They fit Gaussians to the cosine scores of
  inserted and never-inserted canaries and report the epsilon of the mechanism that outputs those two Gaussians.
  This module implements the equal-variance variant: mu = (mean_in - mean_out) / sd with sd the pooled standard
  deviation sqrt((var_in + var_out) / 2), and the epsilon of mu-Gaussian DP at delta (Dong, Roth, Su 2019,
  Corollary 2.13). It is a point estimate, not a guarantee: it assumes Gaussian scores and can land on either side
  of the truth.
- :func:`one_run_lower_bound`: a *rigorous* lower bound at 95% confidence, after Steinke, Nasr, Jagielski,
  "Privacy Auditing with One (1) Training Run" (NeurIPS 2023, arXiv:2305.08846), Theorem 5.2: for m canaries each
  included independently with probability 1/2, an auditor that makes r guesses of which were included, v of them
  right, has under (epsilon, delta)-DP  P[v' >= v] <= P[Bin(r, q) >= v] + 2 m delta max_{i=1..v} P[v > Bin(r, q) >=
  v - i] / i  with q = e^eps / (1 + e^eps). The bound is the largest epsilon that this p-value rejects. It saturates:
  with m canaries no outcome can certify more than :func:`one_run_cap`.
- :func:`auc`, :func:`roc_curve`, :func:`tpr_at_fpr` and :func:`bootstrap_interval`: how well the scores separate
  included from excluded, with stratified bootstrap intervals.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
from scipy import optimize, special, stats

AUDIT_DELTA = 1e-5  # the delta at which the audit states every epsilon (estimate, bound and formal)
CONFIDENCE = 0.95  # of the lower bound, and of the bootstrap intervals
GUESS_FRACTIONS = (1 / 32, 1 / 16, 1 / 8, 1 / 4)  # guesses on the k = fraction x m most confident canaries, each way
LOW_FPRS = (0.01, 0.05)
BOOTSTRAP_SAMPLES = 1000


# ---------------------------------------------------------------------------------------------------------------
# The estimate: Gaussian fit (Andrew et al. 2024), epsilon of mu-GDP
# ---------------------------------------------------------------------------------------------------------------
def gdp_delta(mu: float, epsilon: float) -> float:
    """delta(epsilon) of mu-Gaussian DP: Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2), the exact privacy profile
    of the Gaussian mechanism with sensitivity/sd = mu (Balle and Wang 2018; Dong, Roth, Su 2019). Log space for the
    second term, which overflows for large mu."""
    if mu <= 0:
        return 0.0
    first = stats.norm.cdf(-epsilon / mu + mu / 2)
    second = math.exp(epsilon + stats.norm.logcdf(-epsilon / mu - mu / 2))
    return max(0.0, float(first - second))


def gdp_epsilon(mu: float, delta: float) -> float:
    """The smallest epsilon with gdp_delta(mu, epsilon) <= delta (0 when mu <= 0; inf when mu is inf)."""
    if not mu > 0:
        return 0.0
    if math.isinf(mu):
        return math.inf
    if gdp_delta(mu, 0.0) <= delta:
        return 0.0
    high = max(1.0, mu * mu)
    while gdp_delta(mu, high) > delta:
        high *= 2
    return float(optimize.brentq(lambda e: gdp_delta(mu, e) - delta, 0.0, high, xtol=1e-10, rtol=1e-12))


@dataclass(frozen=True)
class GaussianEstimate:
    """Andrew et al.'s estimate, equal-variance variant: what the scores look like if they were Gaussian."""

    epsilon: float
    mu: float
    mean_in: float
    mean_out: float
    sd: float
    delta: float


def gaussian_fit_estimate(scores_in, scores_out, delta: float = AUDIT_DELTA) -> GaussianEstimate:
    """Fit a Gaussian to each group, take mu = (mean_in - mean_out) / pooled sd, and report epsilon of mu-GDP at
    delta. Needs at least 2 scores per group."""
    scores_in, scores_out = np.asarray(scores_in, float), np.asarray(scores_out, float)
    if scores_in.size < 2 or scores_out.size < 2:
        raise ValueError(f"need >= 2 scores in each group, got {scores_in.size} and {scores_out.size}")
    mean_in, mean_out = float(scores_in.mean()), float(scores_out.mean())
    sd = math.sqrt((scores_in.var(ddof=1) + scores_out.var(ddof=1)) / 2)
    diff = mean_in - mean_out
    mu = diff / sd if sd > 0 else (math.inf if diff > 0 else 0.0)
    return GaussianEstimate(gdp_epsilon(mu, delta), mu, mean_in, mean_out, sd, delta)


# ---------------------------------------------------------------------------------------------------------------
# The lower bound: one-run audit (Steinke, Nasr, Jagielski 2023)
# ---------------------------------------------------------------------------------------------------------------
def one_run_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Upper bound on P[at least v of r guesses right] for an (epsilon, delta)-DP mechanism over m canaries, each
    included independently with probability 1/2 (Steinke et al. 2023, Theorem 5.2)."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    q = float(special.expit(epsilon))  # the accuracy of epsilon-DP randomized response
    tail = float(stats.binom.sf(v - 1, r, q))  # P[Bin(r, q) >= v]
    if delta == 0 or v == 0:
        return min(1.0, tail)
    i = np.arange(1, v + 1)
    between = stats.binom.cdf(v - 1, r, q) - stats.binom.cdf(v - i - 1, r, q)  # P[v > Bin(r, q) >= v - i]
    return min(1.0, tail + 2 * m * delta * float(np.max(between / i)))


def one_run_epsilon(m: int, r: int, v: int, delta: float, significance: float) -> float:
    """The largest epsilon whose null hypothesis '(epsilon, delta)-DP' v right guesses out of r reject at the given
    significance; 0 when even epsilon 0 is not rejected. The p-value grows with epsilon, so the boundary is found by
    root finding."""
    reject = lambda eps: significance - one_run_p_value(m, r, v, eps, delta)  # > 0: rejected
    if r == 0 or reject(0.0) <= 0:
        return 0.0
    high = 1.0
    while reject(high) > 0:
        high *= 2
        if high > 1e4:  # cannot happen for v <= r: P[Bin(r, q) >= v] -> 1
            return math.inf
    return float(optimize.brentq(reject, 0.0, high, xtol=1e-9))


def guess_counts(m: int) -> tuple[int, ...]:
    """The numbers k of canaries guessed each way (k most confident 'in', k least confident 'out'), fixed in advance
    from m alone, as the bound's validity needs; the significance is split over them (Bonferroni)."""
    return tuple(sorted({max(1, int(f * m)) for f in GUESS_FRACTIONS}))


def one_run_cap(m: int, delta: float = AUDIT_DELTA, confidence: float = CONFIDENCE) -> float:
    """The largest lower bound any outcome can give with m canaries: every guess right at the largest k."""
    ks = guess_counts(m)
    significance = (1 - confidence) / len(ks)
    return max(one_run_epsilon(m, 2 * k, 2 * k, delta, significance) for k in ks if 2 * k <= m)


@dataclass(frozen=True)
class LowerBound:
    """Steinke et al.'s one-run bound: epsilon is a lower bound at `confidence`; cap is the most any outcome could
    certify with these m canaries at this delta (the bound saturates there)."""

    epsilon: float
    cap: float
    m: int
    guesses: int  # r of the guess count that gave the bound
    correct: int  # v
    delta: float
    confidence: float

    @property
    def saturated(self) -> bool:
        return self.epsilon >= self.cap * (1 - 1e-6)


def one_run_lower_bound(scores, included, delta: float = AUDIT_DELTA, confidence: float = CONFIDENCE) -> LowerBound:
    """Guess 'included' for the k highest scores and 'excluded' for the k lowest, for each k of guess_counts(m);
    each k is tested at significance (1 - confidence) / len(ks), so the largest of their bounds holds at
    `confidence`. Ties are broken by canary order, which is independent of inclusion."""
    scores, included = np.asarray(scores, float), np.asarray(included, bool)
    m = scores.size
    if m < 2 or included.size != m:
        raise ValueError(f"need >= 2 scores and one inclusion flag per score, got {m} and {included.size}")
    ks = [k for k in guess_counts(m) if 2 * k <= m]
    significance = (1 - confidence) / len(ks)
    order = np.argsort(-scores, kind="stable")  # most confident 'in' first
    outcomes = []  # (epsilon, r, v) per guess count
    for k in ks:
        correct = int(included[order[:k]].sum() + (~included[order[-k:]]).sum())
        outcomes.append((one_run_epsilon(m, 2 * k, correct, delta, significance), 2 * k, correct))
    best = max(outcomes, key=lambda outcome: outcome[0])  # the first of the largest
    return LowerBound(best[0], one_run_cap(m, delta, confidence), m, best[1], best[2], delta, confidence)


# ---------------------------------------------------------------------------------------------------------------
# Separation: AUC, ROC, TPR at low FPR, bootstrap intervals
# ---------------------------------------------------------------------------------------------------------------
def auc(scores_in, scores_out) -> float:
    """Area under the ROC curve = P(score_in > score_out) + P(tie) / 2 (the Mann-Whitney statistic)."""
    scores_in, scores_out = np.asarray(scores_in, float), np.asarray(scores_out, float)
    ranks = stats.rankdata(np.concatenate([scores_in, scores_out]))  # ties get their mean rank
    n_in, n_out = scores_in.size, scores_out.size
    return float((ranks[:n_in].sum() - n_in * (n_in + 1) / 2) / (n_in * n_out))


def roc_curve(scores_in, scores_out) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) of the rule 'included if score >= t' at every distinct score t, from the highest down, starting at
    (0, 0); O(n log n), as the bootstrap calls it often."""
    scores_in, scores_out = np.asarray(scores_in, float), np.asarray(scores_out, float)
    scores = np.concatenate([scores_in, scores_out])
    is_in = np.concatenate([np.ones(scores_in.size, bool), np.zeros(scores_out.size, bool)])
    order = np.argsort(-scores, kind="stable")
    ranked, ranked_in = scores[order], is_in[order]
    group_end = np.r_[ranked[1:] != ranked[:-1], True]  # the last of each run of equal scores
    tpr = np.cumsum(ranked_in)[group_end] / max(scores_in.size, 1)
    fpr = np.cumsum(~ranked_in)[group_end] / max(scores_out.size, 1)
    return np.concatenate([[0.0], fpr]), np.concatenate([[0.0], tpr])


def tpr_at_fpr(scores_in, scores_out, fpr: float) -> float:
    """The largest true-positive rate of a threshold whose false-positive rate is at most fpr (with n excluded
    scores, fpr below 1/n allows no false positive at all)."""
    roc_fpr, roc_tpr = roc_curve(scores_in, scores_out)
    return float(roc_tpr[roc_fpr <= fpr + 1e-12].max())


def bootstrap_interval(
    statistic: Callable[[np.ndarray, np.ndarray], float],
    scores_in,
    scores_out,
    confidence: float = CONFIDENCE,
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile interval of statistic(in, out) over stratified resamples (each group resampled with replacement,
    its size kept). Seeded: the same scores give the same interval."""
    scores_in, scores_out = np.asarray(scores_in, float), np.asarray(scores_out, float)
    rng = np.random.default_rng(seed)
    values = [
        statistic(rng.choice(scores_in, scores_in.size), rng.choice(scores_out, scores_out.size))
        for _ in range(samples)
    ]
    tail = (1 - confidence) / 2
    low, high = np.quantile(values, [tail, 1 - tail])
    return float(low), float(high)


@dataclass(frozen=True)
class Separation:
    """How well scores tell included from excluded: AUC and TPR at low FPRs, each with a bootstrap interval."""

    auc: float
    auc_interval: tuple[float, float]
    tpr_at_fpr: dict[str, float]  # "0.01" -> TPR
    tpr_intervals: dict[str, tuple[float, float]]
    n_in: int
    n_out: int


def separation(scores_in, scores_out, fprs=LOW_FPRS, samples: int = BOOTSTRAP_SAMPLES) -> Separation:
    tprs, intervals = {}, {}
    for fpr in fprs:
        at = lambda a, b, fpr=fpr: tpr_at_fpr(a, b, fpr)
        tprs[f"{fpr:g}"] = at(scores_in, scores_out)
        intervals[f"{fpr:g}"] = bootstrap_interval(at, scores_in, scores_out, samples=samples)
    return Separation(
        auc(scores_in, scores_out),
        bootstrap_interval(auc, scores_in, scores_out, samples=samples),
        tprs,
        intervals,
        int(np.size(scores_in)),
        int(np.size(scores_out)),
    )


def as_dict(figure) -> dict:
    """A figure's dataclass as JSON-ready values (tuples as lists, infinities as the string 'inf')."""

    def clean(value):
        if isinstance(value, float) and math.isinf(value):
            return "inf"
        if isinstance(value, (tuple, list)):
            return [clean(v) for v in value]
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        return value

    return clean(asdict(figure))
