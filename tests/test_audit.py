"""The audit's canaries, hold-out and insertion (brats_fl/privacy/audit.py), the auditor's scoring
(brats_fl/privacy/audit_observer.py) and the figures it leads to (brats_fl/privacy/audit_report.py), on small
hand-made models and arrays with known answers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from brats_fl.privacy import audit, audit_report, dpsgd
from brats_fl.privacy.audit_observer import canary_cosines, vector_fingerprint
from brats_fl.settings import TrainingSettings, demo_settings

SEED = 12345


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))


def flat_grads(model: torch.nn.Module) -> np.ndarray:
    """The gradients in the canaries' layout: parameters in sorted-name order, each flattened."""
    named = dict(model.named_parameters())
    return np.concatenate([named[n].grad.detach().numpy().reshape(-1) for n in sorted(named)])


# ---------------------------------------------------------------------------------------------------------------
# What the seed decides
# ---------------------------------------------------------------------------------------------------------------
def test_canaries_are_unit_sign_vectors_regenerated_from_seed_site_and_id():
    d = 10_001
    c = audit.canary_direction(SEED, "site-1", 3, d)
    assert c.dtype == np.float32 and c.shape == (d,)
    assert np.allclose(np.abs(c), 1 / math.sqrt(d)) and np.linalg.norm(c) == pytest.approx(1.0, rel=1e-5)
    assert np.array_equal(c, audit.canary_direction(SEED, "site-1", 3, d))  # regenerated, never stored
    others = [audit.canary_direction(SEED, "site-1", 4, d), audit.canary_direction(SEED, "site-2", 3, d)]
    others.append(audit.canary_direction(SEED + 1, "site-1", 3, d))
    for other in others:
        assert abs(float(c @ other)) < 5 / math.sqrt(d)  # independent directions: nearly orthogonal


def test_inclusion_is_a_fair_coin_per_canary_fixed_by_the_seed():
    included = audit.included_canaries(SEED, "site-1", 4000)
    assert np.array_equal(included, audit.included_canaries(SEED, "site-1", 4000))
    assert 0.46 < included.mean() < 0.54
    assert not np.array_equal(included, audit.included_canaries(SEED, "site-2", 4000))
    assert np.array_equal(audit.included_canaries(SEED, "site-1", 100), included[:100])


def test_hold_out_is_half_of_the_cases_fixed_by_the_seed():
    for n in (2, 3, 8, 61):
        held_out = audit.held_out_cases(SEED, "site-1", n)
        assert held_out.sum() == n // 2
        assert np.array_equal(held_out, audit.held_out_cases(SEED, "site-1", n))
    settings = demo_settings(audit=True, audit_seed=SEED)
    entries = [f"case{i}" for i in range(9)]
    kept = audit.trained_entries(settings, "site-1", entries)
    held_out = audit.held_out_cases(SEED, "site-1", 9)
    assert kept == [e for e, out in zip(entries, held_out) if not out]
    assert len(kept) == audit.trained_case_count(settings, 9) == 5
    assert audit.trained_entries(demo_settings(), "site-1", entries) == entries  # no audit: every case trains
    assert audit.trained_case_count(demo_settings(), 9) == 9


def test_secret_seeds_are_fresh_and_not_the_public_seed():
    seeds = {audit.new_audit_seed() for _ in range(20)}
    assert len(seeds) == 20 and all(0 <= s < 2**63 for s in seeds)
    assert audit.secret_seed_setting(False) == {}
    assert set(audit.secret_seed_setting(True)) == {"audit_seed"}


def test_parameter_layout_is_the_sorted_names_flattened():
    arrays = {"b": np.arange(3.0), "a": np.arange(4.0).reshape(2, 2)}
    layout = audit.ParameterLayout.of_arrays(arrays)
    assert layout.names == ("a", "b") and layout.size == 7
    assert layout.flatten(arrays).tolist() == [0, 1, 2, 3, 0, 1, 2]
    assert layout.flatten({k: torch.as_tensor(v) for k, v in arrays.items()}).tolist() == [0, 1, 2, 3, 0, 1, 2]


# ---------------------------------------------------------------------------------------------------------------
# Insertion at the site
# ---------------------------------------------------------------------------------------------------------------
def test_every_included_canary_enters_a_step_at_rate_one():
    model = small_model()
    inserter = audit.CanaryInserter(SEED, "site-1", 32, model.named_parameters(), norm=2.0, sampling_rate=1.0)
    assert inserter.d == sum(p.numel() for p in model.parameters()) == 39
    model.zero_grad(set_to_none=True)
    assert inserter.add_to_gradients() == inserter.included_ids.size
    expected = 2.0 * sum(audit.canary_direction(SEED, "site-1", int(j), 39) for j in inserter.included_ids)
    assert np.allclose(flat_grads(model), expected, atol=1e-6)


def test_canaries_are_drawn_with_the_sampling_rate():
    model = small_model()
    inserter = audit.CanaryInserter(SEED, "site-1", 400, model.named_parameters(), norm=1.0, sampling_rate=0.25)
    draws = [inserter.sampled_now().size for _ in range(400)]
    assert np.mean(draws) == pytest.approx(0.25 * inserter.included_ids.size, rel=0.05)
    never = audit.CanaryInserter(SEED, "site-1", 400, model.named_parameters(), norm=1.0, sampling_rate=0.0)
    assert never.add_to_gradients() == 0


def test_without_dp_the_canary_is_added_to_the_step_gradient_before_the_optimiser_uses_it():
    """The hook runs inside the optimiser's step: SGD at learning rate 1 then moves the weights by exactly minus
    (patient gradient + canaries)."""
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    settings = demo_settings(audit=True, audit_seed=SEED, audit_canaries=16, dp_max_grad_norm=0.5)
    inserter = audit.insert_canaries(optimizer, model, settings, "site-1", n_train=1)  # rate 1/1: every step
    before = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    names = sorted(dict(model.named_parameters()))
    model(torch.ones(2, 5)).pow(2).mean().backward()
    patient = flat_grads(model)
    optimizer.step()
    named = dict(model.named_parameters())
    moved = np.concatenate([named[n].detach().numpy().reshape(-1) for n in names])
    start = dict(zip([n for n, _ in model.named_parameters()], before.split([p.numel() for p in model.parameters()])))
    start = np.concatenate([start[n].numpy().reshape(-1) for n in names])
    canaries = 0.5 * sum(audit.canary_direction(SEED, "site-1", int(j), 39) for j in inserter.included_ids)
    assert np.allclose(start - moved, patient + canaries, atol=1e-5)


def test_under_dpsgd_the_canary_is_added_after_clipping_and_noise_at_the_same_scale():
    """Opacus clips each case to C, sums, adds noise, divides by the expected batch size 1; the canary (norm C) is
    added to that private gradient: what a record of norm C summed before the noise would give."""
    model = small_model()
    adam = torch.optim.Adam(model.parameters(), lr=1e-3)
    settings = demo_settings(audit=True, audit_seed=SEED, audit_canaries=16, dp_max_grad_norm=1.0)
    inserter = audit.insert_canaries(adam, model, settings, "site-1", n_train=1)
    plan = dpsgd.DPSGDPlan(1, 1, 1, 8.0, 0.01, max_grad_norm=1.0, noise_multiplier=0.0)  # no noise: checkable
    optimizer = dpsgd.make_dp_optimizer(adam, plan, torch.Generator().manual_seed(0))
    seen = {}
    adam.register_step_pre_hook(lambda opt, args, kwargs: seen.update(grad=flat_grads(model)))  # after the canary
    x, y = torch.ones(1, 1, 5) * 10, torch.zeros(1, 1, 3)  # a large gradient: clipped
    dpsgd.private_step(model, optimizer, lambda out, target: (out - target).pow(2).sum(), x, y)
    same_start = small_model()  # the patient's own gradient, at the weights the step started from
    same_start(x[0]).pow(2).sum().backward()
    patient = flat_grads(same_start)
    clipped = patient / max(1.0, np.linalg.norm(patient))
    canaries = sum(audit.canary_direction(SEED, "site-1", int(j), 39) for j in inserter.included_ids)
    assert np.linalg.norm(patient) > 1.0  # the patient was clipped, the canaries were not
    assert np.allclose(seen["grad"], clipped + canaries, atol=1e-5)


def test_no_insertion_without_audit_or_with_audit_no_insert():
    model, optimizer = small_model(), torch.optim.SGD(small_model().parameters(), lr=0.1)
    assert audit.insert_canaries(optimizer, model, demo_settings(), "site-1", 4) is None
    settings = demo_settings(audit=True, audit_seed=SEED, audit_no_insert=True)
    assert audit.insert_canaries(optimizer, model, settings, "site-1", 4) is None


# ---------------------------------------------------------------------------------------------------------------
# The auditor's scores and the figures
# ---------------------------------------------------------------------------------------------------------------
def test_canary_cosines_are_the_cosines_with_each_regenerated_canary():
    rng = np.random.default_rng(0)
    update = rng.normal(size=1000).astype(np.float32)
    cosines = canary_cosines(SEED, "site-2", 20, update)
    for j in (0, 7, 19):
        c = audit.canary_direction(SEED, "site-2", j, 1000)
        assert cosines[j] == pytest.approx(float(c @ update) / np.linalg.norm(update), abs=1e-6)
    assert np.allclose(canary_cosines(SEED, "site-2", 20, 3.5 * update), cosines, atol=1e-6)  # scale-free
    assert canary_cosines(SEED, "site-2", 5, np.zeros(10, np.float32)).tolist() == [0.0] * 5
    planted = update + 50 * audit.canary_direction(SEED, "site-2", 4, 1000) * np.linalg.norm(update) / 30
    assert np.argmax(canary_cosines(SEED, "site-2", 20, planted)) == 4
    assert vector_fingerprint(update) == vector_fingerprint(update.copy()) != vector_fingerprint(planted)


def fake_observations(settings: TrainingSettings, sites, rounds: int, shift: float, n_cases: int = 6) -> dict:
    """Observations as the auditor writes them, for scores N(0, 0.01) plus -shift on included canaries (a canary
    pushes the update against itself), and loss changes 1 on trained cases, 0 on held-out ones, plus 10 x the
    site's index (sites move every loss by their own amount)."""
    rng = np.random.default_rng(1)
    out = {"n_canaries": settings.audit_canaries, "sites": {}}
    for index, site in enumerate(sites):
        included = audit.included_canaries(settings.audit_seed, site, settings.audit_canaries)
        trained = ~audit.held_out_cases(settings.audit_seed, site, n_cases)
        out["sites"][site] = {
            str(r): {
                "cosines": (rng.normal(0, 0.01, included.size) - shift * included).tolist(),
                "loss_change": (trained + 10.0 * index).tolist(),
            }
            for r in range(rounds)
        }
    return out


def test_audit_job_grades_the_observations_with_the_seed(tmp_path):
    settings = demo_settings(audit=True, audit_seed=SEED, audit_canaries=128)
    sites = ["site-1", "site-2"]
    (tmp_path / audit.OBSERVATIONS_FILE).write_text(json.dumps(fake_observations(settings, sites, 3, shift=0.1)))
    result = audit_report.audit_job(tmp_path, settings, sites, 3, dice=0.5, privacy_report=None, samples=50)
    assert json.loads((tmp_path / audit_report.AUDIT_FILE).read_text())["mechanism"] == "none"
    pooled = result["all_sites"]
    assert pooled["canaries"]["separation"]["auc"] == 1.0
    assert pooled["canaries"]["lower_bound"]["saturated"] and pooled["canaries"]["lower_bound"]["m"] == 256
    assert pooled["patients"]["auc"] == 1.0 and pooled["patients"]["n_in"] == 6  # 3 trained per site
    assert audit_report.standardized(np.array([1.0, 3.0])).tolist() == [-1.0, 1.0]  # within each site
    assert result["formal"]["epsilon"] == "inf"
    row = audit_report.table_row(result)
    assert row[0] == "no privacy" and row[-1] == "0.5000" and len(row) == len(audit_report.TABLE_HEADER)
    lines = audit_report.summary_lines(result, tmp_path / audit_report.AUDIT_FILE)
    text = "\n".join(lines)
    assert "cannot exceed 3.34 with these canaries, saturated" in text and "over 6 updates" in text
    assert lines[-1] == f"  privacy audit: {tmp_path / audit_report.AUDIT_FILE}"
    # shift 0.1 per round on 64 included canaries per site: 64 x 0.01 of each update's squared norm, less chance
    assert result["canary_share_of_update"]["median"] == pytest.approx(0.64, abs=0.05)


def test_audit_job_refuses_missing_rounds(tmp_path):
    settings = demo_settings(audit=True, audit_seed=SEED, audit_canaries=32)
    (tmp_path / audit.OBSERVATIONS_FILE).write_text(json.dumps(fake_observations(settings, ["site-1"], 2, 0.1)))
    with pytest.raises(audit_report.AuditError, match=r"site-1 for round\(s\) \[2\]"):
        audit_report.audit_job(tmp_path, settings, ["site-1"], 3, None, None)
    with pytest.raises(audit_report.AuditError, match="no audit observations"):
        audit_report.audit_job(tmp_path / "nowhere", settings, ["site-1"], 2, None, None)


def test_formal_privacy_of_dpsgd_at_the_audit_delta():
    plan = dpsgd.plan_dpsgd(4, 2, 1, 6.0, None, 1.0)
    record = dpsgd.dpsgd_round_record(plan, 1)
    report = {"max_epsilon": record["epsilon"], "sites": {"site-1": {"delta": plan.delta, "rounds": [record]}}}
    formal = audit_report.formal_privacy("dpsgd", report)
    assert formal["epsilon"] == pytest.approx(6.0, abs=0.02) and formal["delta"] == plan.delta == 0.025
    assert formal["epsilon_at_audit_delta"] > formal["epsilon"]  # a smaller delta costs a larger epsilon
    assert audit_report.formal_privacy("none", None)["epsilon"] == "inf"


# ---------------------------------------------------------------------------------------------------------------
# The comparison command (benchmarks/privacy_audit.py)
# ---------------------------------------------------------------------------------------------------------------
def test_comparison_commands_are_job_py_with_the_audit():
    from benchmarks import privacy_audit as bench

    args = bench.build_parser().parse_args(["--workspace", "/tmp/w", "--audit_canaries", "64"])
    dpsgd_job = bench.job_command(bench.AuditJob("dpsgd", "audited"), args)
    assert dpsgd_job[1].endswith("job.py") and dpsgd_job[dpsgd_job.index("--job_name") + 1] == "audit_dpsgd"
    assert " ".join(dpsgd_job).endswith("--dp_mechanism dpsgd --dp_target_epsilon 8 --audit --audit_canaries 64")
    assert "--audit_no_insert" in bench.job_command(bench.AuditJob("svt", "no_canaries"), args)
    svt_job = bench.job_command(bench.AuditJob("svt", "audited"), args)  # SVT's canaries are small: see CANARY_NORMS
    assert svt_job[svt_job.index("--job_name") + 1] == "audit_svt_canary_norm_0.01"
    assert " ".join(svt_job).endswith("--enable_dp --audit --audit_canaries 64 --dp_max_grad_norm 0.01")
    ordinary = bench.job_command(bench.AuditJob("none", "not_audited"), args)
    assert "--audit" not in ordinary and "--audit_canaries" not in ordinary and "--no_final_eval" in ordinary
    assert [j.name for j in bench.jobs_to_run(["audited"])] == [
        "audit_none",
        "audit_svt_canary_norm_0.01",
        "audit_dpsgd",
    ]


def test_comparison_table_and_figure_from_finished_jobs(tmp_path):
    from benchmarks import privacy_audit as bench
    from brats_fl.job_results import JobPaths

    for mechanism, shift in (("none", 0.2), ("svt", 0.05), ("dpsgd", 0.0)):
        settings = demo_settings(
            audit=True, audit_seed=SEED, audit_canaries=64, dp_mechanism=None if mechanism == "none" else mechanism
        )
        folder = JobPaths(tmp_path / "ws", bench.AuditJob(mechanism, "audited").name).server_job_dir
        folder.mkdir(parents=True)
        observations = fake_observations(settings, ["site-1", "site-2"], 2, shift)
        (folder / audit.OBSERVATIONS_FILE).write_text(json.dumps(observations))
        audit_report.audit_job(folder, settings, ["site-1", "site-2"], 2, 0.5, None, samples=20)
    out = tmp_path / "figs"
    assert bench.main(["--replot_only", "--workspace", str(tmp_path / "ws"), "--output_dir", str(out)]) == 0
    table = (out / "privacy_audit.md").read_text().splitlines()
    assert table[0].startswith("| mechanism | formal epsilon (delta) | estimate | lower bound (cap) | canary AUC")
    assert [row.split(" | ")[0] for row in table[2:5]] == ["| no privacy", "| SVT", "| DP-SGD"]
    assert (out / "privacy_audit.png").stat().st_size > 10_000


def test_canary_cost_compares_the_two_variants_seed_by_seed(tmp_path, capsys):
    from benchmarks import privacy_audit as bench
    from brats_fl.job_results import JobPaths

    def finished(workspace: Path, name: str, dice_per_round: list[float]) -> None:
        path = JobPaths(workspace, name).round_metrics
        path.parent.mkdir(parents=True)
        rounds = [
            {"round": r, "aggregated_metrics": [{"name": "val_dice", "value": d}]} for r, d in enumerate(dice_per_round)
        ]
        path.write_text("\n".join(json.dumps(r) for r in rounds) + "\n")
        bench.record_run_time(str(workspace), name, 60.0)  # as the benchmark records a job that finished

    for seed, (audited, without) in enumerate([(0.50, 0.60), (0.70, 0.60)]):
        rounds = [0.9, audited, audited - 0.1]  # round 0 never counts
        finished(tmp_path / f"seed{seed}", "audit_svt_canary_norm_0.01", rounds)
        finished(tmp_path / f"seed{seed}", "audit_svt_no_canaries", [0.0, without])
    finished(tmp_path / "seed0", "audit_none", [0.0, 0.8])  # no job without canaries: no row
    finished(tmp_path / "seed0", "audit_dpsgd", [0.0, 0.3])
    finished(tmp_path / "seed0", "audit_dpsgd_no_canaries", [0.0, 0.2])
    (tmp_path / "seed0" / bench.RUN_TIMES).write_text(
        json.dumps({"audit_svt_canary_norm_0.01": 1, "audit_svt_no_canaries": 1})
    )
    assert bench.main(["--canary_cost", str(tmp_path / "seed0"), str(tmp_path / "seed1")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2:] == [
        "| SVT (paper's settings) | 0.500 / 0.700 | 0.600 / 0.600 | -0.100 / +0.100 | +0.000 (0.141) |"
    ]
    assert bench.main(["--canary_cost", str(tmp_path / "nowhere")]) == 2
