"""The results table of the final evaluation at the sites, from per-case scores with known means."""

from __future__ import annotations

import csv
import math

from brats_fl.evaluation import TABLE_SCORES, case_id_of, render_table, table_rows, write_results


def scores(value: float) -> dict[str, float]:
    return {k: value for k in TABLE_SCORES} | {"lesion_hd95_et": math.inf}


PER_SITE = {"site-2": {"c": scores(1.0)}, "site-1": {"a": scores(0.2), "b": scores(0.4)}}


def test_each_site_gets_its_mean_and_all_sites_the_mean_over_every_case():
    rows = table_rows(PER_SITE)
    assert [(site, n) for site, n, _ in rows] == [("site-1", 2), ("site-2", 1), ("all sites", 3)]
    assert abs(rows[0][2]["dice_tc"] - 0.3) < 1e-12
    assert abs(rows[2][2]["hd95_et"] - (0.2 + 0.4 + 1.0) / 3) < 1e-12  # pooled over cases, not over site means


def test_one_validating_site_gives_one_row():
    assert [site for site, _, _ in table_rows({"site-3": {"a": scores(0.5)}})] == ["site-3"]


def test_table_and_csv(tmp_path):
    text = render_table(PER_SITE)
    assert text.splitlines()[0].startswith("| Site | Cases | Overall Dice | TC Dice | WT Dice | ET Dice | TC HD95 (mm)")
    assert "| all sites | 3 | 0.5333 |" in text
    write_results(PER_SITE, tmp_path / "t.md", tmp_path / "t.csv")
    assert (tmp_path / "t.md").read_text() == text + "\n"
    with open(tmp_path / "t.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["site"], r["case_id"]) for r in rows] == [("site-1", "a"), ("site-1", "b"), ("site-2", "c")]
    assert rows[0]["dice_tc"] == "0.200000" and rows[0]["lesion_hd95_et"] == "inf"


def test_case_ids_come_from_label_file_names():
    assert case_id_of("/d/training/HGG/Brats18_TCIA01_201_1/Brats18_TCIA01_201_1_seg.nii.gz") == "Brats18_TCIA01_201_1"
