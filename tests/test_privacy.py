"""Privacy accounting against independently computed values: SVT's budget formula, the DP-SGD accountant, the report."""

from __future__ import annotations

import math

import numpy as np
import pytest

from brats_fl import cli, privacy, recipes
from brats_fl.privacy import PrivacyConfigError, dpsgd, svt
from brats_fl.privacy import __main__ as privacy_cli
from brats_fl.privacy import report as privacy_report
from brats_fl.privacy.dpsgd import DPSGDPlan
from brats_fl.privacy.svt import SVTSettings

PAPER_SVT = SVTSettings(fraction=0.9, epsilon=0.001, noise_var=1.0, gamma=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# SVT
# ---------------------------------------------------------------------------------------------------------------
def test_svt_budget_of_a_ten_value_update_by_hand():
    b = svt.svt_round_budget(10, SVTSettings(fraction=0.5, epsilon=1.0, noise_var=0.1, gamma=0.01))
    assert b.n_upload == 5
    # threshold : query = 1 : (2 * 5)^(2/3) = 1 : 4.6415888...
    assert b.epsilon_threshold == pytest.approx(1 / 5.641588833612779, rel=1e-12)
    assert b.epsilon_query == pytest.approx(4.641588833612779 / 5.641588833612779, rel=1e-12)
    assert b.epsilon_release == pytest.approx(0.5)  # 5 released values x noise_var 0.1
    assert b.epsilon_total == pytest.approx(1.5)
    assert b.threshold_noise_scale == pytest.approx(0.01 * 5.641588833612779)
    assert b.query_noise_scale == pytest.approx(2 * 0.01 * 5 / (4.641588833612779 / 5.641588833612779))
    assert b.release_noise_scale == pytest.approx(2 * 0.01 / 0.1)  # = 2 gamma / noise_var


def test_svt_upload_count_rounds_up_and_never_exceeds_the_update():
    assert svt.svt_round_budget(7, SVTSettings(0.5, 1.0, 1.0, 1e-4)).n_upload == 4
    assert svt.svt_round_budget(7, SVTSettings(1.0, 1.0, 1.0, 1e-4)).n_upload == 7


def job_svt_filter(*flags: str):
    """The SVTPrivacy instance job.py attaches, and the tasks it is attached to."""

    class Recorder:
        filters = []

        def add_client_output_filter(self, f, tasks=None):
            self.filters.append((f, tasks))

        def add_server_input_filter(self, f, tasks=None):
            pass

    args = cli.build_parser().parse_args(["--enable_dp", *flags])
    recipe = Recorder()
    recipes.add_privacy(recipe, cli.settings_from_flags(args, demo=False), args.n_clients, None)
    ((svt, tasks),) = recipe.filters
    return svt, tasks


def run_filter(svt, data_kind: str, data: dict, num_steps: int = 4):
    from nvflare.apis.dxo import DXO, MetaKey, from_shareable
    from nvflare.apis.fl_context import FLContext

    dxo = DXO(data_kind, data=dict(data), meta={MetaKey.NUM_STEPS_CURRENT_ROUND: num_steps})
    return from_shareable(svt.process(dxo.to_shareable(), FLContext()))


def small_update(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "conv.weight": rng.normal(0, 1e-4, (30, 10)).astype(np.float32),
        "conv.bias": rng.normal(0, 1e-4, 70).astype(np.float32),
    }


def test_nvflare_svt_reports_exactly_the_formula_on_a_small_model():
    svt_filter, tasks = job_svt_filter("--dp_fraction", "0.9", "--dp_epsilon", "0.001", "--dp_noise_var", "1.0")
    assert tasks == ["train"]
    out = run_filter(svt_filter, "WEIGHT_DIFF", small_update())
    reported = out.get_meta_prop(privacy.SVT_BUDGET_META)
    expected = svt.svt_round_budget(370, PAPER_SVT)
    assert reported["n_upload"] == expected.n_upload == 333
    for part in ("epsilon_threshold", "epsilon_query", "epsilon_release", "epsilon_total"):
        assert reported[part] == pytest.approx(getattr(expected, part), rel=1e-12), part
    assert reported["delta"] == 0.0
    assert out.get_meta_prop(privacy.SVT_ACCOUNTANT_META)["epsilon_total"] == pytest.approx(expected.epsilon_total)


def test_svt_released_values_are_noisy_and_their_count_matches_the_prediction():
    svt_filter, _ = job_svt_filter()
    update = small_update(1)
    n = 370
    nonzero = []
    for _ in range(20):
        out = run_filter(svt_filter, "WEIGHT_DIFF", update)
        nonzero.append(sum(int((v != 0).sum()) for v in out.data.values()) / n)
        # every released value is a clipped value (|v/steps| <= gamma) plus Laplace(2 gamma) noise, times steps
        released = np.concatenate([v.ravel() for v in out.data.values()])
        assert np.abs(released).max() > 4 * 1e-4  # noise, not the tiny original values
    low, high = svt.svt_distinct_fraction_range(svt.svt_round_budget(n, PAPER_SVT))
    assert low - 0.03 < float(np.mean(nonzero)) < high + 0.03  # 20 draws of 370 values: sd of the mean ~ 0.006


def test_distinct_fraction_formula_against_sampling():
    rng = np.random.default_rng(0)
    b = svt.svt_round_budget(20000, SVTSettings(0.9, 1.0, 1.0, 1e-4))
    low, high = svt.svt_distinct_fraction_range(b)
    for accepted, expected in ((b.n_upload, low), (b.n_values, high)):
        draws = rng.integers(0, accepted, size=b.n_upload)
        assert len(np.unique(draws)) / b.n_values == pytest.approx(expected, abs=0.005)
    assert svt.svt_distinct_fraction_range(b, replace=False) == (0.9, 0.9)


def test_job_svt_filter_never_touches_full_weights():
    """data_kinds=[WEIGHT_DIFF]: a full-weights result would pass unperturbed, so the clients must send differences
    (the e2e test checks they do) and the server's report flags any update without SVT metadata."""
    svt_filter, _ = job_svt_filter()
    update = small_update()
    out = run_filter(svt_filter, "WEIGHTS", update)
    assert out.get_meta_prop(privacy.SVT_BUDGET_META) is None
    assert all(np.array_equal(out.data[k], update[k]) for k in update)


def test_default_settings_figures_printed_by_the_cli(capsys):
    """The figures docs/privacy.md quotes for the paper's settings on the 4.7M-value SegResNet."""
    assert privacy_cli.main(["svt"]) == 0
    out = capsys.readouterr().out
    f = svt.svt_figures(4_702_227, PAPER_SVT, 600)
    assert f["n_upload"] == 4_232_005
    assert f["epsilon_release"] == 4_232_005.0
    assert f["epsilon_per_round_nvflare"] == pytest.approx(4_232_005.001, abs=1e-6)
    # the bound that holds: every one of the 4,702,227 values accepted, each costing epsilon_query / 4,232,005
    assert f["epsilon_per_round"] == pytest.approx(4_232_005.001 + 0.000999976 * (4_702_227 / 4_232_005 - 1), abs=1e-8)
    assert f["epsilon_all_rounds"] == pytest.approx(2.539203e9, rel=1e-6)
    assert f["release_noise_scale"] == pytest.approx(2e-4)
    assert f["release_noise_sd_over_gamma"] == pytest.approx(2 * math.sqrt(2))
    assert f["query_noise_scale"] == pytest.approx(846_421, rel=1e-5)
    assert f["selection_bias"] < 1e-9
    for text in ("4,702,227", "4,232,005", "4.23201e+06", "2.5392e+09", "846421"):
        assert text in out


def test_cli_rejects_bad_values(capsys):
    assert privacy_cli.main(["svt", "--dp_fraction", "1.5"]) == 2
    assert privacy_cli.main(["dpsgd", "--dp_target_epsilon", "0"]) == 2
    assert "--dp_target_epsilon" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# DP-SGD accountant
# ---------------------------------------------------------------------------------------------------------------
def gaussian_epsilon_exact(mu: float, delta: float) -> float:
    """Exact epsilon of a Gaussian mechanism with sensitivity/sd = mu (Balle & Wang 2018), by bisection."""

    def phi(x: float) -> float:
        return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))

    def delta_of(eps: float) -> float:
        return phi(-eps / mu + mu / 2) - math.exp(eps) * phi(-eps / mu - mu / 2)

    lo, hi = 0.0, 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_of(mid) > delta else (lo, mid)
    return hi


def test_accountant_without_subsampling_bounds_the_exact_gaussian_epsilon():
    # 4 full-batch steps at noise multiplier 2 compose to one Gaussian mechanism with mu = sqrt(4) / 2 = 1
    exact = gaussian_epsilon_exact(1.0, 1e-5)
    assert exact == pytest.approx(4.3772, abs=1e-3)
    rdp = dpsgd.dpsgd_epsilon(2.0, 1.0, 4, 1e-5, "rdp")
    prv = dpsgd.dpsgd_epsilon(2.0, 1.0, 4, 1e-5, "prv")
    assert exact <= rdp <= 1.1 * exact  # RDP is an upper bound, here within 8 %
    assert prv == pytest.approx(exact, rel=0.01)  # PRV is numerically near-exact


def test_accountant_without_subsampling_matches_the_rdp_conversion_formula():
    # Gaussian RDP at order a is T a / (2 sigma^2); Opacus converts with eps = min_a rdp - (ln delta + ln a)/(a - 1)
    # + ln((a - 1)/a) (Balle et al. 2020) over its default orders.
    sigma, steps, delta = 3.0, 10, 1e-6
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    by_hand = min(
        steps * a / (2 * sigma**2) - (math.log(delta) + math.log(a)) / (a - 1) + math.log((a - 1) / a) for a in orders
    )
    assert dpsgd.dpsgd_epsilon(sigma, 1.0, steps, delta) == pytest.approx(by_hand, rel=1e-9)


@pytest.mark.parametrize("q, sigma, steps, delta", [(0.01, 1.1, 6000, 1e-5), (1 / 60, 1.7444, 36000, 1 / 600)])
def test_subsampled_accountant_agrees_with_googles_dp_accounting(q, sigma, steps, delta):
    import dp_accounting
    from dp_accounting.rdp import rdp_privacy_accountant

    google = rdp_privacy_accountant.RdpAccountant()
    google.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    assert dpsgd.dpsgd_epsilon(sigma, q, steps, delta) == pytest.approx(google.get_epsilon(delta), rel=1e-3)


def test_plan_reaches_the_target_after_all_planned_steps():
    plan = dpsgd.plan_dpsgd(60, num_rounds=600, epochs_per_round=1, target_epsilon=8.0, delta=None, max_grad_norm=1.0)
    assert plan.sample_rate == pytest.approx(1 / 60)
    assert plan.steps_per_round == 60 and plan.total_steps == 36000
    assert plan.delta == pytest.approx(0.1 / 60)
    final = dpsgd.dpsgd_round_record(plan, 599)
    assert 7.95 <= final["epsilon"] <= 8.0
    assert final["steps_so_far"] == plan.total_steps
    # less noise would overspend: the calibration is tight
    assert dpsgd.dpsgd_epsilon(0.97 * plan.noise_multiplier, plan.sample_rate, plan.total_steps, plan.delta) > 8.0


def test_epsilon_recomputed_from_the_round_equals_a_running_accountant():
    """What a client process that never restarted would have counted step by step, a restarted one recomputes."""
    from opacus.accountants import RDPAccountant

    plan = DPSGDPlan(
        n_train=5,
        num_rounds=3,
        epochs_per_round=2,
        target_epsilon=8.0,
        delta=1e-3,
        max_grad_norm=1.0,
        noise_multiplier=1.3,
    )
    running = RDPAccountant()
    for round_num in range(plan.num_rounds):
        for _ in range(plan.steps_per_round):
            running.step(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate)
        recomputed = dpsgd.dpsgd_round_record(plan, round_num)
        assert recomputed["steps_so_far"] == (round_num + 1) * 10
        assert recomputed["epsilon"] == pytest.approx(running.get_epsilon(delta=plan.delta), rel=1e-9)


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        ({"target_epsilon": 0.0}, "--dp_target_epsilon"),
        ({"target_epsilon": -1.0}, "--dp_target_epsilon"),
        ({"target_epsilon": math.inf}, "--dp_target_epsilon"),
        ({"delta": 0.0}, "--dp_delta"),
        ({"delta": 1.0}, "--dp_delta"),
        ({"delta": 0.2}, "--dp_delta"),  # not below 1/8
        ({"max_grad_norm": 0.0}, "--dp_max_grad_norm"),
        ({"n_train": 1}, "training case"),
        ({"num_rounds": 0}, "--num_rounds 0"),
        ({"target_epsilon": 1e-6, "delta": 1e-9, "num_rounds": 100}, "finds no noise level"),
    ],
)
def test_plans_the_accountant_cannot_cover_are_refused(kwargs, flag):
    args = {
        "n_train": 8,
        "num_rounds": 10,
        "epochs_per_round": 1,
        "target_epsilon": 8.0,
        "delta": None,
        "max_grad_norm": 1.0,
        **kwargs,
    }
    with pytest.raises(PrivacyConfigError, match=flag):
        dpsgd.plan_dpsgd(**args)


# ---------------------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------------------
def svt_meta(total: float, passes: int = 3) -> dict:
    return {
        privacy.SVT_BUDGET_META: {
            "epsilon_total": total,
            "epsilon_threshold": 1e-8,
            "epsilon_query": 1e-3,
            "epsilon_release": total - 1e-3 - 1e-8,
            "n_upload": 9,
            "acceptance_passes": passes,
            "delta": 0.0,
            "round": 0,
        },
        privacy.SVT_ACCOUNTANT_META: {"epsilon_total": total},
    }


SELECTION_EXTRA = 1e-3 * (18 / 9 - 1)  # svt_meta's epsilon_query x (n_values / n_upload - 1) for 18 values


def test_svt_report_counts_each_round_at_the_bound_and_flags_unprotected_updates(tmp_path):
    ledger = privacy_report.PrivacyLedger("svt", {"fraction": 0.9})
    for r, total in ((1, 5.0), (0, 2.0)):
        ledger.add_update("site-1", r, "WEIGHT_DIFF", svt_meta(total), ["SVTPrivacy"], n_values=18)
    ledger.add_update("site-2", 0, "WEIGHT_DIFF", svt_meta(2.0), ["SVTPrivacy"], n_values=18)
    ledger.add_update("site-2", 1, "WEIGHTS", {}, [], n_values=18)  # arrived without SVT metadata
    report = ledger.report()
    site1 = report["sites"]["site-1"]
    assert [row["round"] for row in site1["rounds"]] == [0, 1]
    assert [row["epsilon_nvflare"] for row in site1["rounds"]] == [2.0, 5.0]
    # every accepted value costs epsilon_query / n_upload: with all 18 accepted, 2x what NVFlare reports for it
    assert [row["epsilon"] for row in site1["rounds"]] == pytest.approx([2.0 + SELECTION_EXTRA, 5.0 + SELECTION_EXTRA])
    assert [row["cumulative_epsilon"] for row in site1["rounds"]] == pytest.approx(
        [2.0 + SELECTION_EXTRA, 7.0 + 2 * SELECTION_EXTRA]
    )
    assert site1["epsilon"] == pytest.approx(7.0 + 2 * SELECTION_EXTRA) and site1["delta"] == 0.0
    assert report["max_epsilon"] == site1["epsilon"]
    assert report["updates_without_privacy_metadata"] == [{"site": "site-2", "round": 1, "data_kind": "WEIGHTS"}]
    path = tmp_path / "privacy_report.json"
    privacy_report.write_report(path, report)
    loaded = privacy_report.load_report(path)
    assert loaded == report
    with pytest.raises(ValueError, match="without the expected protection"):
        privacy_report.check_report(loaded, ["site-1", "site-2"], 2)
    lines = privacy_report.summary_lines(loaded, path)
    assert "site-1 7" in lines[0] and "site-2 2" in lines[0] and str(path) in lines[1]


def test_a_second_svt_release_for_one_round_is_added_not_dropped():
    ledger = privacy_report.PrivacyLedger("svt", {})
    ledger.add_update("site-1", 0, "WEIGHT_DIFF", svt_meta(2.0), ["SVTPrivacy"], n_values=9)
    ledger.add_update("site-1", 0, "WEIGHT_DIFF", svt_meta(3.0), ["SVTPrivacy"], n_values=9)  # sent again
    ledger.add_update("site-1", 1, "WEIGHT_DIFF", svt_meta(2.0), ["SVTPrivacy"], n_values=9)
    site = ledger.report()["sites"]["site-1"]
    assert site["epsilon"] == pytest.approx(7.0) and site["releases_recorded"] == 3 and site["rounds_recorded"] == 2
    privacy_report.check_report(ledger.report(), ["site-1"], 2)  # every round covered, every release counted


def test_a_second_dpsgd_release_for_one_round_is_added_to_the_total():
    ledger = privacy_report.PrivacyLedger("dpsgd", {})
    plan = DPSGDPlan(8, 2, 1, 8.0, 0.01, 1.0, 1.0)
    for r in (0, 0, 1):  # round 0 released twice (it ran again after a resume)
        ledger.add_update("site-1", r, "WEIGHT_DIFF", {privacy.DPSGD_META: dpsgd.dpsgd_round_record(plan, r)})
    report = ledger.report()
    site = report["sites"]["site-1"]
    assert site["releases_recorded"] == 3
    three_rounds = dpsgd.dpsgd_epsilon(plan.noise_multiplier, plan.sample_rate, 3 * plan.steps_per_round, plan.delta)
    assert site["epsilon"] == pytest.approx(three_rounds)  # the accountant over all 24 steps released, not the plan's
    assert site["epsilon"] > dpsgd.dpsgd_round_record(plan, 1)["epsilon"]
    privacy_report.check_report(report, ["site-1"], 2)


def test_a_ledger_rebuilt_from_its_report_goes_on_adding():
    ledger = privacy_report.PrivacyLedger("svt", {"fraction": 0.9})
    ledger.add_update("site-1", 0, "WEIGHT_DIFF", svt_meta(2.0), ["SVTPrivacy"], n_values=9)
    again = privacy_report.PrivacyLedger.from_report(ledger.report())
    again.add_update("site-1", 1, "WEIGHT_DIFF", svt_meta(3.0), ["SVTPrivacy"], n_values=9)
    assert again.report()["sites"]["site-1"]["epsilon"] == pytest.approx(5.0)
    assert again.report()["settings"] == {"fraction": 0.9}


def test_values_the_svt_filter_passed_through_unnoised_make_the_update_unprotected():
    meta = svt_meta(2.0)
    meta[privacy.SVT_BUDGET_META]["has_scalar_passthrough"] = True
    ledger = privacy_report.PrivacyLedger("svt", {})
    ledger.add_update("site-1", 0, "WEIGHT_DIFF", meta, ["SVTPrivacy"], n_values=9)
    with pytest.raises(ValueError, match="without the expected protection"):
        privacy_report.check_report(ledger.report(), ["site-1"], 1)


@pytest.mark.parametrize("fraction", [0.9, 0.1])
def test_svt_bound_holds_for_what_nvflare_actually_accepts(fraction, caplog):
    """NVFlare finishes its pass after the c-th acceptance, so it accepts more than c values and reports less than
    the selection costs; the project's bound (every value accepted) is never below the true cost."""
    import logging

    svt_filter, _ = job_svt_filter("--dp_fraction", str(fraction))
    with caplog.at_level(logging.INFO):
        out = run_filter(svt_filter, "WEIGHT_DIFF", small_update(3))
    accepted = [r.getMessage() for r in caplog.records if "SVT acceptance completed" in r.getMessage()]
    total_accepted, n_upload = (int(x) for x in accepted[-1].rsplit(" ", 3)[-3].split("/"))
    budget = out.get_meta_prop(privacy.SVT_BUDGET_META)
    true_cost = (
        budget["epsilon_threshold"] + budget["epsilon_query"] * total_accepted / n_upload + budget["epsilon_release"]
    )
    ledger = privacy_report.PrivacyLedger("svt", {})
    record = ledger.add_update("site-1", 0, "WEIGHT_DIFF", dict(out.meta), ["SVTPrivacy"], n_values=370)
    assert total_accepted >= n_upload and record["epsilon_nvflare"] <= true_cost <= record["epsilon"]
    if fraction == 0.1:  # a pass accepts far more than the 37 values asked for: NVFlare's figure is too low
        assert total_accepted > 2 * n_upload and record["epsilon_nvflare"] < true_cost


def test_report_check_names_a_site_with_missing_rounds():
    ledger = privacy_report.PrivacyLedger("dpsgd", {"target_epsilon": 8.0})
    plan = DPSGDPlan(8, 3, 1, 8.0, 0.01, 1.0, 1.0)
    for r in (0, 2):
        ledger.add_update("site-1", r, "WEIGHT_DIFF", {privacy.DPSGD_META: dpsgd.dpsgd_round_record(plan, r)})
    report = ledger.report()
    assert report["sites"]["site-1"]["epsilon"] == dpsgd.dpsgd_round_record(plan, 2)["epsilon"]
    with pytest.raises(ValueError, match=r"site-1 covers rounds \[0, 2\]"):
        privacy_report.check_report(report, ["site-1"], 3)
    with pytest.raises(ValueError, match="site-2"):
        privacy_report.check_report(report, ["site-2"], 3)
