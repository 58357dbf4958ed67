"""End-to-end: 2 sites with different synthetic data train alone (--local_only) and together (FedAvg), each job ending
with its final evaluation at the sites; then the cross-site matrix scores the saved models of both jobs, without
training. Its cells must be the final evaluations' figures where they score the same model at the same site."""

from __future__ import annotations

import csv
import json
from collections import defaultdict

import pytest
from conftest import TINY_SHAPE

import job
from brats_fl.job_results import JobPaths
from dataset_brats18.heterogeneous import SiteProfile, generate_heterogeneous
from dataset_brats18.synthetic import ScannerStyle
from result_stat import cross_site

pytestmark = pytest.mark.e2e
SCORES = ("dice_overall", "dice_tc", "dice_wt", "dice_et")
SITES = ("site-1", "site-2")
TINY_SITES = (
    SiteProfile("reference", 3, 2, ScannerStyle()),
    SiteProfile("low contrast, small double tumours", 2, 2, ScannerStyle((0.6, 0.4, 0.6, 0.5), 0.6, 55.0, 0.6, 2)),
)


def job_argv(data_dir, datalist_dir, workspace, *extra: str) -> list[str]:
    sizes = [str(s) for s in TINY_SHAPE]
    return [
        "--dataset_base_dir", str(data_dir), "--datalist_json_path", str(datalist_dir), "--workspace", str(workspace),
        "--n_clients", "2", "--num_rounds", "2", "--roi_size", *sizes, "--infer_roi_size", *sizes,
        "--init_filters", "8", "--learning_rate", "1e-3", *extra,
    ]  # fmt: skip


def final_evaluation_means(paths: JobPaths) -> dict[str, dict[str, float]]:
    """{site: mean of each score over its cases} from a job's final_evaluation.csv."""
    by_site = defaultdict(list)
    with open(paths.final_evaluation_csv) as f:
        for row in csv.DictReader(f):
            by_site[row["site"]].append(row)
    return {site: {k: sum(float(r[k]) for r in rows) / len(rows) for k in SCORES} for site, rows in by_site.items()}


def test_local_only_fedavg_and_the_matrix_of_their_saved_models(tmp_path, capsys):
    data_dir = tmp_path / "data"
    datalist_dir = generate_heterogeneous(data_dir, TINY_SITES, shape=TINY_SHAPE, seed=3)
    workspace = tmp_path / "ws"
    assert job.main(job_argv(data_dir, datalist_dir, workspace, "--local_only")) == 0
    local = JobPaths(workspace, "brats18_2_local")
    assert "site-2: best val_dice" in capsys.readouterr().out
    assert job.main(job_argv(data_dir, datalist_dir, workspace)) == 0
    fedavg = JobPaths(workspace, "brats18_2")

    figure = tmp_path / "matrix.png"
    assert cross_site.main(["--jobs", str(local.job_dir), str(fedavg.job_dir), "--figure", str(figure)]) == 0
    out = workspace / "cross_site" / "server" / "simulate_job"
    with open(out / "cross_site.csv") as f:
        cells = {(r["model"], r["site"]): r for r in csv.DictReader(f) if r["site"] != "mean over sites"}
    models = ["local site-1", "local site-2", "FedAvg (brats18_2)"]
    assert sorted(cells) == sorted((m, s) for m in models for s in SITES)  # every cell
    assert all(int(c["n_cases"]) == 2 and 0.0 <= float(c["dice_overall"]) <= 1.0 for c in cells.values())

    own = final_evaluation_means(local)  # each site scored its own local model when the local-only job ended
    for site in SITES:
        for k in SCORES:
            assert float(cells[(f"local {site}", site)][k]) == pytest.approx(own[site][k], abs=1e-4)
    federated = final_evaluation_means(fedavg)  # the sites scored the best global model when FedAvg ended
    for site in SITES:
        for k in SCORES:
            assert float(cells[("FedAvg (brats18_2)", site)][k]) == pytest.approx(federated[site][k], abs=1e-4)

    every_case = json.loads((out / "cross_site.json").read_text())
    assert sorted(every_case["local site-2"]["site-1"]) == sorted(every_case["FedAvg (brats18_2)"]["site-1"])
    assert figure.is_file() and "| local site-1 |" in (out / "cross_site.md").read_text()
