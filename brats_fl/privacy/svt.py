"""SVT accounting: the budget NVFlare's ``SVTPrivacy`` filter spends on one site's update, from its formula.

The filter itself reports the budget of every call in the update's metadata and the job's report only *reads* those
numbers (:mod:`brats_fl.privacy.report`). The formula here re-derives them from the filter's settings, to predict a
run's figures before it starts (``python -m brats_fl.privacy svt``) and to test that NVFlare reports what its code
does. :func:`make_svt_filter` builds the filter with the same settings, so both stay in step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


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
    gamma: float | None = None  # the clipping bound; only the noise scales need it

    @property
    def epsilon_total(self) -> float:
        """What NVFlare reports for the call: the textbook SVT figure, valid if selection stopped at the c-th value."""
        return self.epsilon_threshold + self.epsilon_query + self.epsilon_release

    @property
    def epsilon_bound(self) -> float:
        """What the call spends at most: NVFlare finishes its pass after the c-th acceptance and every accepted value
        costs epsilon_query / c, so with at most n_values accepted (the worst case) this bound holds."""
        return self.epsilon_threshold + self.epsilon_query * self.n_values / self.n_upload + self.epsilon_release

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
        "epsilon_per_round_nvflare": b.epsilon_total,
        "epsilon_per_round": b.epsilon_bound,
        "num_rounds": num_rounds,
        "epsilon_all_rounds": b.epsilon_bound * num_rounds,
        "gamma": settings.gamma,
        "threshold_noise_scale": b.threshold_noise_scale,
        "query_noise_scale": b.query_noise_scale,
        "release_noise_scale": b.release_noise_scale,
        "release_noise_sd_over_gamma": math.sqrt(2.0) * b.release_noise_scale / settings.gamma,
        "selection_bias": svt_selection_bias(b),
        "released_nonzero_fraction_low": low,
        "released_nonzero_fraction_high": high,
    }


def make_svt_filter(settings: SVTSettings):
    """NVFlare's SVTPrivacy for each site's outgoing train result, restricted to the weight difference (the update
    only: full weights are never perturbed, nor let through by it)."""
    from nvflare.apis.dxo import DataKind
    from nvflare.app_common.filters.svt_privacy import SVTPrivacy

    return SVTPrivacy(
        fraction=settings.fraction,
        epsilon=settings.epsilon,
        noise_var=settings.noise_var,
        gamma=settings.gamma,
        tau=settings.tau,
        replace=settings.replace,
        data_kinds=[DataKind.WEIGHT_DIFF],
    )
