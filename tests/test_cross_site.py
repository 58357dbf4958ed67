"""The cross-site matrix without running a job: its numbers on hand-made scores, its plan from hand-made job folders
(saved models of earlier jobs), bad input, and the heterogeneous demo's sites."""

from __future__ import annotations

import csv
import hashlib
import json

import numpy as np
import pytest
import torch
from scipy.ndimage import label as connected_components

from brats_fl.cross_site import matrix_cells, model_summary, render_matrix, write_matrix_csv
from brats_fl.job_results import JobPaths
from brats_fl.settings import EXIT_BAD_INPUT, demo_settings
from brats_fl.site_models import LOCAL_MODELS_DIR
from dataset_brats18.heterogeneous import HETEROGENEOUS_SITES, SiteProfile, generate_heterogeneous
from dataset_brats18.synthetic import ScannerStyle, make_case_arrays
from model import BratsSegResNet
from result_stat import cross_site

SITES = ["site-1", "site-2", "site-3"]


def case(overall: float, tc: float, wt: float, et: float) -> dict:
    return {"dice_overall": overall, "dice_tc": tc, "dice_wt": wt, "dice_et": et, "hd95_tc": 1.0}


# ---------------------------------------------------------------------------------------------------------------
# The numbers
# ---------------------------------------------------------------------------------------------------------------
def test_cells_are_case_means_and_the_summary_counts_each_site_once():
    scores = {
        "FedAvg": {
            "site-1": {"a": case(0.8, 0.7, 0.9, 0.8), "b": case(0.6, 0.5, 0.7, 0.6), "c": case(0.7, 0.6, 0.8, 0.7)},
            "site-2": {"d": case(0.4, 0.3, 0.5, 0.4)},
            "site-3": {"e": case(0.9, 0.9, 0.9, 0.9), "f": case(0.5, 0.5, 0.5, 0.5)},
        }
    }
    cells = matrix_cells(scores)["FedAvg"]
    assert cells["site-1"]["dice_overall"] == pytest.approx(0.7)
    assert cells["site-1"]["dice_tc"] == pytest.approx(0.6)
    assert cells["site-1"]["n_cases"] == 3
    summary = model_summary(cells)
    assert summary["mean"] == pytest.approx((0.7 + 0.4 + 0.7) / 3)  # not the mean over the 6 cases (0.65)
    assert summary["worst_site"] == "site-2" and summary["worst"] == pytest.approx(0.4)
    assert summary["spread"] == pytest.approx(0.3)
    assert model_summary(cells, "dice_wt")["worst_site"] == "site-2"


def test_the_worst_site_on_a_tie_is_the_first_by_name():
    cells = {s: {"dice_overall": 0.5} for s in ("site-2", "site-1")}
    assert model_summary(cells) == {"mean": 0.5, "worst_site": "site-1", "worst": 0.5, "spread": 0.0}


def test_table_and_csv_hold_every_cell_and_summary(tmp_path):
    scores = {
        model: {site: {"x": case(v + i / 10, v, v, v)} for i, site in enumerate(SITES)}
        for model, v in (("local site-1", 0.2), ("FedAvg (brats18_3)", 0.5))
    }
    cells = matrix_cells(scores)
    table = render_matrix(cells, SITES)
    assert "| FedAvg (brats18_3) | 0.5000 | 0.6000 | 0.7000 | 0.6000 | site-1 (0.5000) | 0.2000 |" in table
    assert "| local site-1 | 0.200 / 0.200 / 0.200 |" in table
    write_matrix_csv(cells, tmp_path / "m.csv")
    rows = list(csv.DictReader(open(tmp_path / "m.csv")))
    assert [(r["model"], r["site"]) for r in rows] == [(m, s) for m in scores for s in [*SITES, "mean over sites"]]
    assert float(rows[3]["dice_overall"]) == pytest.approx(0.3) and rows[3]["worst_site"] == "site-1"


# ---------------------------------------------------------------------------------------------------------------
# Saved models of earlier jobs: the plan, and bad input
# ---------------------------------------------------------------------------------------------------------------
def make_job(workspace, name: str, n_sites: int, datalist_dir, local_only: bool = False) -> JobPaths:
    """A job folder as job.py leaves it: settings, site folders, its models (random weights of the demo network)."""
    job = JobPaths(workspace, name)
    settings = demo_settings(
        local_only=local_only,
        centralised=n_sites == 1,
        dataset_base_dir=str(workspace),
        datalist_json_path=str(datalist_dir),
    )
    job.settings_file.parent.mkdir(parents=True)
    settings.write(job.settings_file)
    for i in range(1, n_sites + 1):
        (job.job_dir / f"site-{i}").mkdir()
    weights = {"model": BratsSegResNet(init_filters=8).state_dict()}
    if local_only:
        for i in range(1, n_sites + 1):
            (job.server_job_dir / LOCAL_MODELS_DIR).mkdir(exist_ok=True)
            torch.save(weights, job.server_job_dir / LOCAL_MODELS_DIR / f"site-{i}.pt")
    else:
        torch.save(weights, job.best_model)
    return job


@pytest.fixture
def earlier_jobs(tmp_path):
    """A local-only, a federated and a centralised job of 2 sites whose datalists list validation cases."""
    datalists = tmp_path / "datalists"
    datalists.mkdir()
    for site in ("site-1", "site-2", "site-All"):
        (datalists / f"{site}.json").write_text(json.dumps({"training": [{}], "validation": [{"label": "x"}]}))
    jobs = [
        make_job(tmp_path, "brats18_2_local", 2, datalists, local_only=True),
        make_job(tmp_path, "brats18_2", 2, datalists),
        make_job(tmp_path, "brats18_1", 1, datalists),
    ]
    return tmp_path, datalists, jobs


def plan(*argv: str):
    return cross_site.plan_matrix(cross_site.build_parser().parse_args(list(argv)))


def test_saved_models_of_earlier_jobs_make_the_rows(earlier_jobs):
    workspace, _, jobs = earlier_jobs
    matrix = plan("--jobs", *(str(j.job_dir) for j in jobs), "--model", f"mine={jobs[1].best_model}")
    assert [m.name for m in matrix.models] == [
        "local site-1",
        "local site-2",
        "FedAvg (brats18_2)",
        "centralised (brats18_1)",
        "mine",
    ]
    assert matrix.models[1].checkpoint == jobs[0].server_job_dir / "local_models" / "site-2.pt"
    assert matrix.sites == ["site-1", "site-2"]
    assert matrix.eval_paths == JobPaths(workspace, "cross_site")
    assert "each site's own validation cases" in matrix.caption


def bad_input(capsys, *argv: str) -> str:
    assert cross_site.main(list(argv)) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ")
    return err


def test_a_model_file_that_is_not_this_network_is_named(earlier_jobs, capsys):
    _, _, jobs = earlier_jobs
    torch.save({"model": {"conv.weight": torch.zeros(3, 3)}}, jobs[1].best_model)
    err = bad_input(capsys, "--jobs", *(str(j.job_dir) for j in jobs))
    assert "FedAvg (brats18_2)" in err and str(jobs[1].best_model) in err and "not a BratsSegResNet" in err


def test_a_local_model_that_is_missing_is_named(earlier_jobs, capsys):
    _, _, jobs = earlier_jobs
    (jobs[0].server_job_dir / "local_models" / "site-2.pt").unlink()
    assert "local site-2: no model file" in bad_input(capsys, "--jobs", str(jobs[0].job_dir))


def test_a_site_without_validation_cases_is_named(earlier_jobs, capsys):
    _, datalists, jobs = earlier_jobs
    (datalists / "site-2.json").write_text(json.dumps({"training": [{}], "validation": []}))
    err = bad_input(capsys, "--jobs", str(jobs[1].job_dir))
    assert err.startswith("error: site-2:") and "no validation cases" in err


def test_no_multi_site_job_and_not_a_job_folder(earlier_jobs, capsys):
    workspace, _, jobs = earlier_jobs
    assert "2 or more sites" in bad_input(capsys, "--jobs", str(jobs[2].job_dir))
    assert "not the folder of a job" in bad_input(capsys, "--jobs", str(workspace / "datalists"))


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--local_only", "--n_clients", "1"], "--local_only needs --n_clients >= 2"),
        (["--local_only", "--enable_dp"], "--local_only: leave --enable_dp and --audit out"),
        (["--local_only", "--patience", "3"], "--local_only: leave --stop_dice and --patience out"),
        (["--demo", "heterogeneous", "--n_clients", "5"], "--demo heterogeneous: --n_clients 5: the demo has 4 sites"),
        (["--demo", "heterogeneous", "--dataset_base_dir", "/data"], "--demo heterogeneous: the synthetic demo's data"),
    ],
)
def test_job_py_refuses_in_one_line(flags, expected, tmp_path, capsys):
    import job

    assert job.main([*flags, "--workspace", str(tmp_path)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and expected in err


# ---------------------------------------------------------------------------------------------------------------
# The heterogeneous demo
# ---------------------------------------------------------------------------------------------------------------
def case_digest(style: ScannerStyle | None) -> str:
    digest = hashlib.sha256()
    for i, enhancing in ((0, True), (3, False)):
        rng = np.random.default_rng([0, i])
        images, label = make_case_arrays((24, 24, 16), rng, enhancing, *([style] if style else []))
        for m in sorted(images):
            digest.update(images[m].tobytes())
        digest.update(label.tobytes())
    return digest.hexdigest()


def test_the_reference_style_keeps_the_uniform_demo_voxel_for_voxel():
    # taken from the generator before scanner styles existed (commit db66865)
    expected = "b21a685f8f88a7c753527f1cf5cbeb25624944cf3994de7ca1d59b81a47ea8d4"
    assert case_digest(None) == expected
    assert case_digest(ScannerStyle()) == expected


def style_statistics(style: ScannerStyle, n: int = 3) -> dict:
    """Means over n cases: WT voxels, lesions, T1ce contrast of ET over brain (relative), noise in brain."""
    stats = {"wt": [], "lesions": [], "et_contrast": []}
    for i in range(n):
        images, label = make_case_arrays((40, 40, 32), np.random.default_rng([5, i]), True, style)
        t1ce, brain = images["t1ce"].astype(float), images["t1ce"] > 0
        normal = brain & (label == 0)
        stats["wt"].append((label > 0).sum())
        stats["lesions"].append(connected_components(label > 0)[1])
        stats["et_contrast"].append(t1ce[label == 4].mean() / t1ce[normal].mean() - 1)
    return {k: float(np.mean(v)) for k, v in stats.items()}


def test_scanner_styles_change_what_they_say():
    reference = style_statistics(ScannerStyle())
    assert style_statistics(ScannerStyle(tumour_scale=0.55))["wt"] < 0.4 * reference["wt"]
    assert reference["lesions"] == 1 and style_statistics(ScannerStyle(tumour_scale=0.5, n_tumours=2))["lesions"] > 1.5
    low = style_statistics(ScannerStyle(contrast=(1, 0.35, 1, 1)))["et_contrast"]
    assert low == pytest.approx(0.35 * reference["et_contrast"], rel=0.15)


def test_the_demo_has_a_large_and_a_very_small_site_that_differ():
    sizes = [p.n_train for p in HETEROGENEOUS_SITES]
    assert max(sizes) >= 8 * min(sizes)
    assert len({p.style for p in HETEROGENEOUS_SITES}) == len(HETEROGENEOUS_SITES)
    assert all(p.n_validation >= 2 for p in HETEROGENEOUS_SITES)


def test_each_site_validates_on_its_own_cases_and_the_pool_holds_all(tmp_path):
    profiles = (SiteProfile("a", 2, 1, ScannerStyle()), SiteProfile("b", 1, 2, ScannerStyle(gain=0.5)))
    datalist_dir = generate_heterogeneous(tmp_path, profiles, shape=(16, 16, 16))
    lists = {n: json.loads((datalist_dir / f"{n}.json").read_text()) for n in ("site-1", "site-2", "site-All")}
    assert [len(lists["site-1"][k]) for k in ("training", "validation")] == [2, 1]
    assert [len(lists["site-2"][k]) for k in ("training", "validation")] == [1, 2]
    assert lists["site-All"]["training"] == lists["site-1"]["training"] + lists["site-2"]["training"]
    assert lists["site-All"]["validation"] == lists["site-1"]["validation"] + lists["site-2"]["validation"]
    labels = {e["label"] for d in ("site-1", "site-2") for k in ("training", "validation") for e in lists[d][k]}
    assert len(labels) == 6 and all((tmp_path / p).is_file() for p in labels)
    with pytest.raises(ValueError, match="other settings"):
        generate_heterogeneous(tmp_path, profiles[:1], shape=(16, 16, 16))
