"""The audit's statistics (brats_fl/privacy/audit_estimators.py) on hand-made inputs with known answers and on
synthetic mechanisms whose epsilon is known: the Gaussian mechanism (mu-GDP) and randomized response (pure DP)."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
from scipy import special, stats

from brats_fl.privacy import audit_estimators as est

DELTA = est.AUDIT_DELTA


def gaussian_mechanism(mu: float, m: int, seed: int, inserted: bool = True):
    """m canaries, each included with probability 1/2; an included canary's score is N(mu, 1), an excluded one's
    N(0, 1): each canary's inclusion is exactly mu-GDP."""
    rng = np.random.default_rng(seed)
    included = rng.random(m) < 0.5
    return rng.normal(size=m) + (mu * included if inserted else 0.0), included


def randomized_response(epsilon: float, m: int, seed: int):
    """Each canary reports its inclusion bit, flipped with probability 1 / (1 + e^eps): pure epsilon-DP, and the
    mechanism for which the one-run bound is tightest."""
    rng = np.random.default_rng(seed)
    included = rng.random(m) < 0.5
    truthful = rng.random(m) < special.expit(epsilon)
    return np.where(truthful, included, ~included).astype(float), included


# ---------------------------------------------------------------------------------------------------------------
# Gaussian DP and the estimate
# ---------------------------------------------------------------------------------------------------------------
def test_gdp_delta_by_hand():
    assert est.gdp_delta(1.0, 0.0) == pytest.approx(2 * stats.norm.cdf(0.5) - 1)  # Phi(mu/2) - Phi(-mu/2)
    assert est.gdp_delta(0.0, 1.0) == 0.0
    assert est.gdp_delta(2.0, 1.0) == pytest.approx(stats.norm.cdf(0.5) - math.e * stats.norm.cdf(-1.5))


@pytest.mark.parametrize("epsilon", [0.5, 1.0, 4.0, 8.0])
def test_gdp_epsilon_inverts_the_gaussian_mechanism_of_google_dp_accounting(epsilon):
    sigma = dp_accounting.get_sigma_gaussian(epsilon, DELTA)  # the Gaussian mechanism's sd for (epsilon, DELTA)
    assert est.gdp_epsilon(1 / sigma, DELTA) == pytest.approx(epsilon, rel=1e-3)


def test_gdp_epsilon_edges():
    assert est.gdp_epsilon(0.0, DELTA) == 0.0 and est.gdp_epsilon(-1.0, DELTA) == 0.0
    assert est.gdp_epsilon(math.inf, DELTA) == math.inf
    assert est.gdp_epsilon(1e-6, DELTA) == 0.0  # delta(0) is below DELTA already
    assert math.isfinite(est.gdp_epsilon(200.0, DELTA))  # large mu: no overflow


@pytest.mark.parametrize("mu", [0.5, 1.0, 2.0])
def test_gaussian_fit_estimate_lands_near_the_true_epsilon(mu):
    scores, included = gaussian_mechanism(mu, 4000, seed=1)
    estimate = est.gaussian_fit_estimate(scores[included], scores[~included])
    truth = est.gdp_epsilon(mu, DELTA)
    assert estimate.mu == pytest.approx(mu, abs=0.08)
    assert estimate.epsilon == pytest.approx(truth, rel=0.1)
    assert estimate.delta == DELTA


def test_gaussian_fit_estimate_without_signal_is_near_zero():
    scores, included = gaussian_mechanism(1.0, 4000, seed=2, inserted=False)
    assert est.gaussian_fit_estimate(scores[included], scores[~included]).epsilon < 0.5


def test_gaussian_fit_estimate_of_constant_groups_is_infinite_not_an_error():
    estimate = est.gaussian_fit_estimate([1.0, 1.0], [0.0, 0.0])
    assert estimate.mu == math.inf and estimate.epsilon == math.inf
    with pytest.raises(ValueError, match=">= 2 scores"):
        est.gaussian_fit_estimate([1.0], [0.0, 0.0])


# ---------------------------------------------------------------------------------------------------------------
# The one-run lower bound
# ---------------------------------------------------------------------------------------------------------------
def test_p_value_without_delta_is_the_binomial_tail():
    q = special.expit(1.0)
    assert est.one_run_p_value(100, 10, 8, 1.0, 0.0) == pytest.approx(stats.binom.sf(7, 10, q))
    assert est.one_run_p_value(100, 10, 0, 1.0, 0.0) == 1.0


def test_p_value_delta_term_by_hand():
    """m=4, r=v=2, eps=0 (q=1/2): tail P[B>=2] = 1/4; max over i of P[2 > B >= 2-i]/i = max(1/2, (3/4)/2) = 1/2;
    p = 1/4 + 2 * 4 * delta * 1/2."""
    assert est.one_run_p_value(4, 2, 2, 0.0, 0.01) == pytest.approx(0.25 + 4 * 0.01)
    assert est.one_run_p_value(4, 2, 2, 0.0, 0.5) == 1.0  # capped


def test_epsilon_with_every_guess_right_and_no_delta_is_closed_form():
    """v = r and delta 0: p = q^r, so the boundary is q = significance^(1/r)."""
    for r in (5, 20, 64):
        q = 0.05 ** (1 / r)
        assert est.one_run_epsilon(128, r, r, 0.0, 0.05) == pytest.approx(math.log(q / (1 - q)), abs=1e-6)


def test_epsilon_is_zero_when_chance_explains_the_guesses():
    assert est.one_run_epsilon(128, 20, 10, DELTA, 0.05) == 0.0  # half right: what a coin gives
    assert est.one_run_epsilon(128, 0, 0, DELTA, 0.05) == 0.0


def test_the_bound_grows_with_m_and_saturates_at_the_cap():
    caps = [est.one_run_cap(m) for m in (128, 256, 1024, 4096)]
    assert caps == sorted(caps) and all(math.isfinite(c) for c in caps)
    assert 3.0 < est.one_run_cap(256) < 3.6  # m = 256: no outcome certifies more than about 3.3
    assert est.guess_counts(256) == (8, 16, 32, 64)


def test_perfect_separation_gives_the_cap_not_infinity():
    included = np.arange(256) % 2 == 0
    bound = est.one_run_lower_bound(np.where(included, 10.0, 0.0), included)
    assert bound.epsilon == pytest.approx(est.one_run_cap(256)) and bound.saturated
    assert bound.guesses == 128 and bound.correct == 128 and math.isfinite(bound.epsilon)


def test_reversed_scores_certify_nothing():
    included = np.arange(256) % 2 == 0
    assert est.one_run_lower_bound(np.where(included, 0.0, 10.0), included).epsilon == 0.0


def test_no_canaries_inserted_gives_a_bound_of_zero_and_auc_near_one_half():
    bounds, aucs = [], []
    for seed in range(100):
        scores, included = gaussian_mechanism(1.0, 1000, seed, inserted=False)
        bounds.append(est.one_run_lower_bound(scores, included).epsilon)
        aucs.append(est.auc(scores[included], scores[~included]))
    assert np.mean(np.array(bounds) == 0.0) >= 0.95  # a positive bound on nothing is a 5% event at most
    assert abs(np.mean(aucs) - 0.5) < 0.01 and max(abs(a - 0.5) for a in aucs) < 0.1


@pytest.mark.parametrize("mu", [0.5, 1.0])
def test_gaussian_mechanism_bound_is_below_the_true_epsilon_in_95_percent_of_seeds(mu):
    truth = est.gdp_epsilon(mu, DELTA)
    bounds = []
    for seed in range(200):
        scores, included = gaussian_mechanism(mu, 1000, seed)
        bounds.append(est.one_run_lower_bound(scores, included, DELTA).epsilon)
    assert np.mean(np.array(bounds) <= truth) >= 0.95, (truth, max(bounds))
    assert np.median(bounds) > 0.3 * min(truth, est.one_run_cap(1000))  # and it is not vacuous


@pytest.mark.parametrize("epsilon", [0.5, 1.0, 2.0])
def test_randomized_response_bound_is_below_its_epsilon_in_95_percent_of_seeds(epsilon):
    """The tight case: the bound is close to epsilon, so a wrong constant in the p-value would show here."""
    bounds = []
    for seed in range(200):
        scores, included = randomized_response(epsilon, 1000, seed)
        bounds.append(est.one_run_lower_bound(scores, included, delta=0.0).epsilon)
    assert np.mean(np.array(bounds) <= epsilon) >= 0.95, (epsilon, max(bounds))
    assert np.median(bounds) > 0.5 * epsilon


# ---------------------------------------------------------------------------------------------------------------
# Separation
# ---------------------------------------------------------------------------------------------------------------
def test_auc_by_hand():
    assert est.auc([3, 4], [1, 2]) == 1.0
    assert est.auc([1, 2], [3, 4]) == 0.0
    assert est.auc([1], [1]) == 0.5  # a tie counts half
    assert est.auc([2, 0], [1]) == 0.5
    assert est.auc([2, 1], [1, 0]) == pytest.approx((1 + 1 + 0.5 + 1) / 4)


def test_roc_curve_and_tpr_at_fpr_by_hand():
    fpr, tpr = est.roc_curve([5, 4, 3], [4, 1])
    assert fpr.tolist() == [0.0, 0.0, 0.5, 0.5, 1.0] and tpr.tolist() == pytest.approx([0, 1 / 3, 2 / 3, 1, 1])
    assert est.tpr_at_fpr([5, 4, 3], [4, 1], 0.01) == pytest.approx(1 / 3)  # no false positive allowed
    assert est.tpr_at_fpr([5, 4, 3], [4, 1], 0.5) == 1.0
    in_scores = np.arange(100, 200)
    out_scores = np.arange(0, 100)
    assert est.tpr_at_fpr(in_scores, out_scores, 0.01) == 1.0


def test_bootstrap_interval_is_seeded_and_brackets_the_statistic():
    scores, included = gaussian_mechanism(1.0, 400, seed=3)
    a, b = scores[included], scores[~included]
    low, high = est.bootstrap_interval(est.auc, a, b)
    assert low < est.auc(a, b) < high and high - low < 0.2
    assert est.bootstrap_interval(est.auc, a, b) == (low, high)


def test_separation_and_its_json_form():
    scores, included = gaussian_mechanism(3.0, 400, seed=4)
    sep = est.separation(scores[included], scores[~included], samples=200)
    assert sep.auc > 0.95 and set(sep.tpr_at_fpr) == {"0.01", "0.05"}
    assert sep.tpr_at_fpr["0.01"] <= sep.tpr_at_fpr["0.05"]
    as_json = est.as_dict(est.gaussian_fit_estimate([1.0, 1.0], [0.0, 0.0]))
    assert as_json["epsilon"] == "inf" and as_json["mu"] == "inf"
