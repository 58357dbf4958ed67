"""The paper's split shipped in dataset_brats18/datalist: counts, disjointness, layout, and that it is reproducible."""

from __future__ import annotations

import csv
import re

import pytest
from conftest import PAPER_SPLIT_CSV, REPO_DIR

from brats_fl.run_options import run_from_argv
from brats_fl.settings import SHIPPED_DATALIST_DIR, InputError
from dataset_brats18 import build_datalist as bd
from dataset_brats18.datalist import load_datalist

DATALIST_DIR = REPO_DIR / "dataset_brats18" / "datalist"
SHIPPED_CSV = REPO_DIR / "dataset_brats18" / "brats18_paper_split.csv"
SITES = ("site-1", "site-2", "site-3", "site-4")
ENTRY_PATH = re.compile(
    r"^training/(HGG|LGG)/(Brats18_[A-Za-z0-9]+_[A-Za-z0-9]+_1)/\2_(t1ce|t1|t2|flair|seg)\.nii\.gz$"
)


def ids(entries: list[dict]) -> list[str]:
    return [ENTRY_PATH.match(e["label"]).group(2) for e in entries]


@pytest.fixture(scope="module")
def shipped() -> dict[str, dict]:
    return {name: load_datalist(DATALIST_DIR / f"{name}.json") for name in (*SITES, "site-All")}


def test_site_sizes_match_the_paper(shipped):
    assert [len(shipped[s]["training"]) for s in SITES] == [60, 61, 61, 60]
    assert len(shipped["site-All"]["training"]) == 242


def test_sites_are_disjoint_and_their_union_is_site_all(shipped):
    per_site = [set(ids(shipped[s]["training"])) for s in SITES]
    assert sum(len(s) for s in per_site) == len(set().union(*per_site)) == 242
    assert set().union(*per_site) == set(ids(shipped["site-All"]["training"]))


def test_every_file_holds_the_same_43_validation_cases_none_of_them_training(shipped):
    validation = ids(shipped["site-All"]["validation"])
    assert len(validation) == len(set(validation)) == 43
    for datalist in shipped.values():
        assert ids(datalist["validation"]) == validation
        assert not set(validation) & set(ids(datalist["training"]))


def test_entries_use_the_official_layout_in_t1ce_t1_t2_flair_order(shipped):
    for datalist in shipped.values():
        assert datalist["et_label"] == 4
        for entry in datalist["training"] + datalist["validation"]:
            matches = [ENTRY_PATH.match(p) for p in entry["image"] + [entry["label"]]]
            assert all(matches), entry
            assert [m.group(3) for m in matches] == ["t1ce", "t1", "t2", "flair", "seg"]
            assert len({(m.group(1), m.group(2)) for m in matches}) == 1  # one case, one grade folder


def test_split_and_grades_agree_with_the_shipped_csv(shipped):
    with open(SHIPPED_CSV, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 285
    for name in SITES:
        expected = sorted(r["case_id"] for r in rows if r["split"] == name)
        assert ids(shipped[name]["training"]) == expected
    grade_of = {r["case_id"]: r["grade"] for r in rows}
    for entry in shipped["site-All"]["training"] + shipped["site-All"]["validation"]:
        m = ENTRY_PATH.match(entry["label"])
        assert grade_of[m.group(2)] == m.group(1)


def test_shipped_files_are_exactly_what_the_builder_writes(tmp_path, capsys):
    assert bd.main(["--trust_csv", "--output_dir", str(tmp_path)]) == 0
    for name in (*SITES, "site-All"):
        assert (tmp_path / f"{name}.json").read_bytes() == (DATALIST_DIR / f"{name}.json").read_bytes(), name
    assert sorted(p.name for p in DATALIST_DIR.iterdir()) == sorted(f"{n}.json" for n in (*SITES, "site-All"))


def test_shipped_csv_is_the_papers_split():
    if not PAPER_SPLIT_CSV.is_file():
        pytest.skip(f"reference split not found at {PAPER_SPLIT_CSV} (only present in the project's workplace)")
    assert SHIPPED_CSV.read_bytes() == PAPER_SPLIT_CSV.read_bytes()


def test_job_uses_the_shipped_datalists_by_default_and_checks_them_first(brats_sample, tmp_path):
    """job.py's cheap checks run against the shipped files: on the 8-case sample, site files list missing cases."""
    assert SHIPPED_DATALIST_DIR == DATALIST_DIR
    with pytest.raises(InputError, match=r"file\(s\) listed in .*site-1\.json do not exist"):
        run_from_argv(["--dataset_base_dir", str(brats_sample), "--workspace", str(tmp_path / "ws")])
    assert not (tmp_path / "ws").exists()


def test_scanning_a_full_release_gives_the_shipped_files(tmp_path, capsys):
    """The 285 cases as empty files in the official layout: the scanning path writes the same bytes as --trust_csv."""
    with open(SHIPPED_CSV, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        folder = tmp_path / "data" / "training" / row["grade"] / row["case_id"]
        folder.mkdir(parents=True)
        for part in ("t1", "t1ce", "t2", "flair", "seg"):
            (folder / f"{row['case_id']}_{part}.nii.gz").touch()
    assert bd.main(["--dataset_base_dir", str(tmp_path / "data"), "--output_dir", str(tmp_path / "dl")]) == 0
    assert "warning" not in capsys.readouterr().err
    for name in (*SITES, "site-All"):
        assert (tmp_path / "dl" / f"{name}.json").read_bytes() == (DATALIST_DIR / f"{name}.json").read_bytes(), name
