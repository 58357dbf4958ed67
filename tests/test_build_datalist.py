"""The datalist builder: naming schemes, institutions, split strategies, bad input, determinism, real sample."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from handmade_cases import KNOWN_VOXELS, touch_case, write_case

import brats_fl.pipeline as bp
from dataset_brats18 import build_datalist as bd
from dataset_brats18.datalist import load_datalist
from dataset_brats18.layouts import (
    BRATS2023_NAMING,
    LEGACY_NAMING,
    grade_from_path,
    institution_from_id,
    parse_file_name,
    read_name_mapping,
    release_of,
)
from dataset_brats18.splits import (
    SplitRow,
    equal_sizes,
    group_institutions,
    institution_split,
    paper_split,
    random_split,
    read_split_csv,
    seeded_order,
    take_validation,
    validation_count,
)


# ---------------------------------------------------------------------------------------------------------------
# Naming schemes, releases, institutions
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, case_id, part, naming",
    [
        ("Brats18_TCIA01_201_1_t1ce.nii.gz", "Brats18_TCIA01_201_1", "t1ce", LEGACY_NAMING),
        ("Brats18_TCIA01_201_1_t1.nii.gz", "Brats18_TCIA01_201_1", "t1", LEGACY_NAMING),
        ("BraTS19_2013_10_1_flair.nii.gz", "BraTS19_2013_10_1", "flair", LEGACY_NAMING),
        ("BraTS20_Training_001_t2.nii", "BraTS20_Training_001", "t2", LEGACY_NAMING),
        ("BraTS2021_00000_seg.nii.gz", "BraTS2021_00000", "label", LEGACY_NAMING),
        ("BraTS-GLI-00000-000-t1c.nii.gz", "BraTS-GLI-00000-000", "t1ce", BRATS2023_NAMING),
        ("BraTS-GLI-00000-000-t1n.nii.gz", "BraTS-GLI-00000-000", "t1", BRATS2023_NAMING),
        ("BraTS-GLI-00000-000-t2w.nii", "BraTS-GLI-00000-000", "t2", BRATS2023_NAMING),
        ("BraTS-GLI-00000-000-t2f.nii.gz", "BraTS-GLI-00000-000", "flair", BRATS2023_NAMING),
        ("BraTS-GLI-00000-000-seg.nii.gz", "BraTS-GLI-00000-000", "label", BRATS2023_NAMING),
    ],
)
def test_file_names_of_every_release(name, case_id, part, naming):
    parsed = parse_file_name(name)
    assert (parsed.case_id, parsed.part, parsed.naming) == (case_id, part, naming)


@pytest.mark.parametrize(
    "name", ["W39_1998.09.19_Segm.nii", "survival_data.csv", "x_t1ce.nii.gz.bak", "_t1.nii.gz", "case_dwi.nii.gz"]
)
def test_unknown_file_names_are_not_guessed(name):
    assert parse_file_name(name) is None


@pytest.mark.parametrize(
    "case_id, release, institution",
    [
        ("Brats18_TCIA01_201_1", "BraTS 2018", "TCIA01"),
        ("Brats18_2013_10_1", "BraTS 2018", "2013"),
        ("Brats18_CBICA_AOD_1", "BraTS 2018", "CBICA"),
        ("Brats17_TCIA_105_1", "BraTS 2017", "TCIA"),
        ("BraTS19_TMC_06290_1", "BraTS 2019", "TMC"),
        ("BraTS20_Training_001", "BraTS 2020", None),
        ("BraTS2021_00000", "BraTS 2021", None),
        ("BraTS-GLI-00000-000", "BraTS 2023+", None),
        ("patient7", "unknown", None),
    ],
)
def test_release_and_institution_from_case_ids(case_id, release, institution):
    assert release_of(case_id) == release
    assert institution_from_id(case_id) == institution


def test_grade_comes_from_hgg_lgg_folders_only():
    assert grade_from_path("training/LGG/Brats18_TCIA10_628_1") == "LGG"
    assert grade_from_path("HGG/BraTS19_2013_10_1") == "HGG"
    assert grade_from_path("BraTS20_Training_001") is None


def test_name_mapping_gives_grade_and_earliest_known_id(tmp_path):
    path = tmp_path / "name_mapping.csv"
    path.write_text(
        "Grade,BraTS_2017_subject_ID,BraTS_2018_subject_ID,TCGA_TCIA_subject_ID,BraTS_2019_subject_ID,"
        "BraTS_2020_subject_ID\n"
        "HGG,Brats17_CBICA_AAB_1,Brats18_CBICA_AAB_1,NA,BraTS19_CBICA_AAB_1,BraTS20_Training_001\n"
        "LGG,NA,NA,NA,BraTS19_TMC_09043_1,BraTS20_Training_002\n"
        "HGG,NA,NA,NA,NA,BraTS20_Training_003\n"
    )
    mapping = read_name_mapping(path)
    assert mapping["BraTS20_Training_001"].earlier_id == "BraTS19_CBICA_AAB_1"
    assert mapping["BraTS20_Training_002"].grade == "LGG"
    assert institution_from_id(mapping["BraTS20_Training_002"].earlier_id) == "TMC"
    assert mapping["BraTS20_Training_003"].earlier_id is None


# ---------------------------------------------------------------------------------------------------------------
# Pure split strategies
# ---------------------------------------------------------------------------------------------------------------
IDS = [f"case{i:02d}" for i in range(10)]


def test_seeded_order_is_a_fixed_permutation_per_seed():
    assert seeded_order(IDS, 3) == seeded_order(list(reversed(IDS)), 3)
    assert sorted(seeded_order(IDS, 3)) == IDS
    assert seeded_order(IDS, 3) != seeded_order(IDS, 4)


def test_equal_sizes():
    assert equal_sizes(10, 4) == [3, 3, 2, 2]
    assert equal_sizes(242, 4) == [61, 61, 60, 60]
    assert equal_sizes(3, 3) == [1, 1, 1]


def test_random_split_is_a_balanced_partition():
    sites = random_split(IDS, 4, seed=0)
    assert [len(s) for s in sites] == [3, 3, 2, 2]
    assert sorted(cid for s in sites for cid in s) == IDS
    assert all(s == sorted(s) for s in sites)
    assert random_split(IDS, 4, seed=0) == sites
    assert random_split(IDS, 4, seed=1) != sites


def test_group_institutions_largest_first_into_smallest_site():
    # A(5) -> s1; B(4) -> s2; C(3) -> s2 (4 < 5); D(3) -> s1 (5 < 7); E(1) -> s2 (7 < 8): sizes 8 and 8.
    groups = group_institutions({"A": 5, "B": 4, "C": 3, "D": 3, "E": 1}, 2)
    assert groups == [["A", "D"], ["B", "C", "E"]]


def test_group_institutions_ties_are_deterministic_and_balanced():
    groups = group_institutions({"x": 2, "w": 2, "v": 2, "u": 2}, 2)
    assert groups == [["u", "w"], ["v", "x"]]


def test_group_institutions_needs_enough_institutions():
    with pytest.raises(ValueError, match="2 institution"):
        group_institutions({"A": 5, "B": 1}, 3)


def test_institution_split_never_splits_an_institution():
    institution_of = {f"{inst}_{i}": inst for inst, n in {"A": 5, "B": 4, "C": 3}.items() for i in range(n)}
    sites = institution_split(institution_of, 2)
    for site in sites:
        others = [s for s in sites if s is not site]
        assert not {institution_of[c] for c in site} & {institution_of[c] for o in others for c in o}
    assert sorted(len(s) for s in sites) == [5, 7]


def test_validation_count_rounds_and_keeps_both_sides_non_empty():
    assert validation_count(285, 0.15) == 43  # the paper's 43 of 285
    assert validation_count(8, 0.15) == 1
    assert validation_count(2, 0.9) == 1
    with pytest.raises(ValueError):
        validation_count(1, 0.5)
    with pytest.raises(ValueError):
        validation_count(10, 1.0)


def test_take_validation_is_disjoint_and_seeded():
    train, val = take_validation(IDS, 0.3, seed=5)
    assert len(val) == 3 and not set(train) & set(val) and sorted(train + val) == IDS
    assert take_validation(IDS, 0.3, seed=5) == (train, val)


def test_paper_split_reports_missing_cases_never_invents_them():
    rows = [
        SplitRow("a", "HGG", "site-1"),
        SplitRow("b", "HGG", "site-2"),
        SplitRow("c", "LGG", "site-2"),
        SplitRow("v", "HGG", "validation"),
    ]
    split = paper_split(rows, available={"a", "c", "v", "extra"})
    assert split.sites == [["a"], ["c"]]
    assert split.validation == ["v"]
    assert split.missing == {"site-2": ["b"]}
    assert split.total == {"site-1": 1, "site-2": 2, "validation": 1}


@pytest.mark.parametrize(
    "text, message",
    [
        ("case_id,grade,split\na,HGG,site-1\na,HGG,site-2\n", "more than once"),
        ("case_id,grade,split\na,HGG,hospital\n", "neither site-<n> nor validation"),
        ("id,grade\na,HGG\n", "lacks column"),
    ],
)
def test_bad_split_csv(tmp_path, text, message):
    path = tmp_path / "split.csv"
    path.write_text(text)
    with pytest.raises(bd.DatalistError, match=message):
        read_split_csv(path)


# ---------------------------------------------------------------------------------------------------------------
# The command on hand-made folders
# ---------------------------------------------------------------------------------------------------------------
def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = bd.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def brats18_folder(root: Path, n_per_institution: dict[str, int], grade: str = "HGG", ext: str = ".nii.gz") -> Path:
    for inst, n in n_per_institution.items():
        for i in range(n):
            cid = f"Brats18_{inst}_{i}_1"
            touch_case(root / "training" / grade / cid, cid, ext=ext)
    return root


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def case_ids(entries: list[dict]) -> list[str]:
    return [e["label"].rsplit("/", 1)[1].rsplit("_seg", 1)[0] for e in entries]


def test_brats18_layout_institution_strategy(capsys, tmp_path):
    data = brats18_folder(tmp_path / "d", {"CBICA": 6, "TCIA01": 4, "TCIA02": 3, "2013": 2})
    touch_case(data / "training" / "LGG" / "Brats18_TCIA10_0_1", "Brats18_TCIA10_0_1")
    out_dir = tmp_path / "dl"
    code, out, err = run(
        capsys,
        "--dataset_base_dir",
        data,
        "--output_dir",
        out_dir,
        "--strategy",
        "institution",
        "--n_clients",
        "2",
        "--val_fraction",
        "0.2",
    )
    assert code == 0, err
    sites = [read(out_dir / f"site-{i}.json") for i in (1, 2)]
    train = [case_ids(s["training"]) for s in sites]
    institutions = [{cid.split("_")[1] for cid in t} for t in train]
    assert not institutions[0] & institutions[1], "an institution was split across sites"
    assert sites[0]["validation"] == sites[1]["validation"] and len(sites[0]["validation"]) == 3  # round(0.2 * 16)
    everything = sorted(sum(train, []) + case_ids(sites[0]["validation"]))
    assert len(everything) == 16 and len(set(everything)) == 16
    entry = sites[0]["training"][0]
    cid = case_ids([entry])[0]
    grade = "LGG" if "TCIA10" in cid else "HGG"
    assert entry["image"] == [f"training/{grade}/{cid}/{cid}_{m}.nii.gz" for m in ("t1ce", "t1", "t2", "flair")]
    assert "HGG" in out and "LGG" in out and "CBICA" in out


def test_brats2020_flat_nii_layout_uses_name_mapping(capsys, tmp_path):
    data = tmp_path / "MICCAI_BraTS2020_TrainingData"
    earlier = {
        1: "BraTS19_CBICA_AAB_1",
        2: "BraTS19_CBICA_AAC_1",
        3: "BraTS19_TCIA01_1_1",
        4: "BraTS19_TMC_1_1",
        5: "BraTS19_TMC_2_1",
        6: "NA",
    }
    lines = [
        "Grade,BraTS_2017_subject_ID,BraTS_2018_subject_ID,TCGA_TCIA_subject_ID,BraTS_2019_subject_ID,"
        "BraTS_2020_subject_ID"
    ]
    for i, old in earlier.items():
        cid = f"BraTS20_Training_{i:03d}"
        touch_case(data / cid, cid, ext=".nii")
        lines.append(f"{'LGG' if i == 4 else 'HGG'},NA,NA,NA,{old},{cid}")
    (data / "name_mapping.csv").write_text("\n".join(lines) + "\n")
    out_dir = tmp_path / "dl"
    code, out, err = run(
        capsys,
        "--dataset_base_dir",
        data,
        "--output_dir",
        out_dir,
        "--strategy",
        "institution",
        "--n_clients",
        "2",
        "--val_fraction",
        "0.2",
    )
    assert code == 0, err
    assert "grouped as one institution 'unknown'" in err and "BraTS20_Training_006" in err
    site1 = read(out_dir / "site-1.json")
    assert site1["training"][0]["image"][0].endswith("_t1ce.nii") and site1["et_label"] == 4
    assert "CBICA" in out and "TMC" in out and "LGG" in out


def test_brats2021_layout_random_works_institution_refused(capsys, tmp_path):
    data = tmp_path / "d"
    for i in range(6):
        cid = f"BraTS2021_{i:05d}"
        touch_case(data / cid, cid)
    code, out, err = run(
        capsys,
        "--dataset_base_dir",
        data,
        "--output_dir",
        tmp_path / "dl",
        "--strategy",
        "random",
        "--n_clients",
        "2",
        "--val_fraction",
        "0.2",
    )
    assert code == 0, err
    site_all = read(tmp_path / "dl" / "site-All.json")
    assert len(site_all["training"]) == 5 and len(site_all["validation"]) == 1
    assert site_all["training"][0]["image"][1].endswith("_t1.nii.gz")
    code, _, err = run(
        capsys,
        "--dataset_base_dir",
        data,
        "--output_dir",
        tmp_path / "dl2",
        "--strategy",
        "institution",
        "--n_clients",
        "2",
    )
    assert code == 2 and "carry no institution" in err and "--strategy random" in err
    assert not (tmp_path / "dl2").exists()


def test_brats2023_case_end_to_end_through_the_pipeline(capsys, tmp_path):
    """Hand-made 2023-style cases (ET = 3) -> builder -> et_label 3 -> val_transforms -> the right TC/WT/ET."""
    data = tmp_path / "gli"
    for i in range(3):
        cid = f"BraTS-GLI-{i:05d}-000"
        write_case(data / cid, cid, BRATS2023_NAMING)
    out_dir = tmp_path / "dl"
    code, _, err = run(
        capsys,
        "--dataset_base_dir",
        data,
        "--output_dir",
        out_dir,
        "--strategy",
        "random",
        "--n_clients",
        "1",
        "--val_fraction",
        "0.34",
    )
    assert code == 0, err
    datalist = load_datalist(out_dir / "site-1.json")
    assert datalist["et_label"] == 3
    entry = datalist["training"][0]
    assert [p.rsplit("-", 1)[1] for p in entry["image"]] == ["t1c.nii.gz", "t1n.nii.gz", "t2w.nii.gz", "t2f.nii.gz"]
    sample = bp.val_transforms(bp.datalist_et_label(datalist))(bp.resolve_entries([entry], data)[0])
    regions = sample["label"].numpy()
    assert regions.reshape(3, -1).sum(axis=1).tolist() == [KNOWN_VOXELS[r] for r in bp.REGIONS]
    # channel order t1ce, t1, t2, flair: the hand-made t1c/t1n/t2w/t2f files hold 100/200/300/400 everywhere
    raw = bp.Compose(bp.preprocessing_transforms().transforms[:2])(bp.resolve_entries([entry], data)[0])["image"]
    assert [float(raw[c].max()) for c in range(4)] == [100.0, 200.0, 300.0, 400.0]
    # the same files read with the 2018 convention are refused, not silently mis-labelled
    with pytest.raises(Exception) as info:
        bp.val_transforms(4)(bp.resolve_entries([entry], data)[0])
    assert "label values [3]" in str(info.value.__cause__ or info.value)


def test_missing_modality_stops_the_build_and_names_the_case(capsys, tmp_path):
    data = brats18_folder(tmp_path / "d", {"CBICA": 4})
    touch_case(data / "training" / "HGG" / "Brats18_TCIA01_9_1", "Brats18_TCIA01_9_1", skip=("flair",))
    code, _, err = run(
        capsys, "--dataset_base_dir", data, "--output_dir", tmp_path / "dl", "--strategy", "random", "--n_clients", "2"
    )
    assert code == 2
    assert "incomplete: Brats18_TCIA01_9_1 in training/HGG/Brats18_TCIA01_9_1: no flair file" in err
    assert "--skip_incomplete" in err and not (tmp_path / "dl").exists()


def test_skip_incomplete_leaves_the_case_out_loudly(capsys, tmp_path):
    data = brats18_folder(tmp_path / "d", {"CBICA": 4})
    touch_case(data / "training" / "HGG" / "Brats18_TCIA01_9_1", "Brats18_TCIA01_9_1", skip=("label",))
    code, _, err = run(
        capsys,
        "--dataset_base_dir",
        data,
        "--output_dir",
        tmp_path / "dl",
        "--strategy",
        "random",
        "--n_clients",
        "2",
        "--skip_incomplete",
    )
    assert code == 0
    assert "skipped: Brats18_TCIA01_9_1" in err and "no seg file" in err and "left out 1 incomplete" in err
    assert "TCIA01" not in (tmp_path / "dl" / "site-All.json").read_text()


def test_misnamed_label_file_gets_a_rename_hint(capsys, tmp_path):
    data = tmp_path / "d"
    for i in (1, 2, 3):
        cid = f"BraTS20_Training_{i:03d}"
        touch_case(data / cid, cid, ext=".nii", skip=("label",) if i == 3 else ())
    (data / "BraTS20_Training_003" / "W39_1998.09.19_Segm.nii").touch()
    code, _, err = run(
        capsys, "--dataset_base_dir", data, "--output_dir", tmp_path / "dl", "--strategy", "random", "--n_clients", "1"
    )
    assert code == 2
    assert "BraTS20_Training_003" in err and "no seg file" in err and "W39_1998.09.19_Segm.nii" in err
    assert "rename" in err


def test_mixed_naming_schemes_are_refused(capsys, tmp_path):
    data = brats18_folder(tmp_path / "d", {"CBICA": 2})
    touch_case(data / "BraTS-GLI-00001-000", "BraTS-GLI-00001-000", BRATS2023_NAMING)
    code, _, err = run(
        capsys, "--dataset_base_dir", data, "--output_dir", tmp_path / "dl", "--strategy", "random", "--n_clients", "1"
    )
    assert code == 2 and "mixes naming schemes" in err


def test_same_case_in_two_folders_is_refused(capsys, tmp_path):
    data = brats18_folder(tmp_path / "d", {"CBICA": 2})
    touch_case(data / "copy" / "Brats18_CBICA_0_1", "Brats18_CBICA_0_1")
    code, _, err = run(
        capsys, "--dataset_base_dir", data, "--output_dir", tmp_path / "dl", "--strategy", "random", "--n_clients", "1"
    )
    assert code == 2 and "Brats18_CBICA_0_1 (copy/Brats18_CBICA_0_1, training/HGG/Brats18_CBICA_0_1)" in err


def test_stray_nifti_files_are_reported_not_silently_ignored(capsys, tmp_path):
    data = brats18_folder(tmp_path / "d", {"CBICA": 3})
    (data / "atlas.nii.gz").touch()
    code, _, err = run(
        capsys, "--dataset_base_dir", data, "--output_dir", tmp_path / "dl", "--strategy", "random", "--n_clients", "1"
    )
    assert code == 0 and "1 NIfTI file(s)" in err and "atlas.nii.gz" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--strategy", "random"], "--n_clients None"),
        (["--strategy", "random", "--n_clients", "0"], "--n_clients 0"),
        (["--strategy", "random", "--n_clients", "2", "--val_fraction", "1.5"], "--val_fraction 1.5"),
        (["--strategy", "random", "--n_clients", "9"], "only 3 training case(s)"),
        (["--strategy", "institution", "--n_clients", "2"], "only 1 institution"),
        (["--val_fraction", "0.2"], "the paper strategy uses the validation cases"),
        (["--per_site_val"], "--per_site_val"),
        (["--strategy", "random", "--n_clients", "2", "--trust_csv"], "--trust_csv only works with --strategy paper"),
        (["--strategy", "random", "--n_clients", "1", "--val_csv", "v.csv", "--val_fraction", "0.2"], "--val_csv"),
        (["--strategy", "random", "--n_clients", "1", "--name_mapping", "nope.csv"], "--name_mapping nope.csv"),
        (["--strategy", "random", "--n_clients", "4", "--per_site_val"], "--per_site_val: site-1"),
    ],
)
def test_bad_flags_exit_2_with_one_line_naming_the_flag(capsys, tmp_path, argv, message):
    data = brats18_folder(tmp_path / "d", {"CBICA": 4})
    code, out, err = run(capsys, "--dataset_base_dir", data, "--output_dir", tmp_path / "dl", *argv)
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("error: ") and message in err, err
    assert not (tmp_path / "dl").exists()


def test_missing_or_empty_dataset_folder(capsys, tmp_path):
    code, _, err = run(capsys, "--dataset_base_dir", tmp_path / "nope", "--output_dir", tmp_path / "dl")
    assert code == 2 and "--dataset_base_dir" in err and "does not exist" in err
    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, "--dataset_base_dir", tmp_path / "empty", "--output_dir", tmp_path / "dl")
    assert code == 2 and "no BraTS case files" in err


def test_same_input_and_seed_give_byte_identical_files(capsys, tmp_path):
    data = brats18_folder(tmp_path / "d", {"CBICA": 7, "TCIA01": 5, "TCIA02": 4, "2013": 3})
    outputs = []
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        code, _, err = run(
            capsys,
            "--dataset_base_dir",
            data,
            "--output_dir",
            tmp_path / name,
            "--strategy",
            "random",
            "--n_clients",
            "3",
            "--seed",
            seed,
        )
        assert code == 0, err
        outputs.append({p.name: p.read_bytes() for p in sorted((tmp_path / name).glob("*.json"))})
    assert outputs[0] == outputs[1]
    assert outputs[0]["site-1.json"] != outputs[2]["site-1.json"]
    assert outputs[0]["site-All.json"].endswith(b"}\n")


def test_per_site_validation(capsys, tmp_path):
    data = brats18_folder(tmp_path / "d", {"CBICA": 6, "TCIA01": 6})
    out_dir = tmp_path / "dl"
    code, out, err = run(
        capsys,
        "--dataset_base_dir",
        data,
        "--output_dir",
        out_dir,
        "--strategy",
        "random",
        "--n_clients",
        "2",
        "--per_site_val",
        "--val_fraction",
        "0.25",
    )
    assert code == 0, err
    sites = [read(out_dir / f"site-{i}.json") for i in (1, 2)]
    vals = [set(case_ids(s["validation"])) for s in sites]
    trains = [set(case_ids(s["training"])) for s in sites]
    assert [len(v) for v in vals] == [2, 2] and not vals[0] & vals[1]  # round(0.25 * 6) each
    assert not (vals[0] | vals[1]) & (trains[0] | trains[1])
    site_all = read(out_dir / "site-All.json")
    assert set(case_ids(site_all["validation"])) == vals[0] | vals[1]
    assert set(case_ids(site_all["training"])) == trains[0] | trains[1]
    assert "validation (union)" in out


def test_validation_csv_shared_by_all_sites(capsys, tmp_path):
    data = brats18_folder(tmp_path / "d", {"CBICA": 6})
    val_csv = tmp_path / "val.csv"
    val_csv.write_text("case_id\nBrats18_CBICA_1_1\nBrats18_CBICA_4_1\nBrats18_CBICA_99_1\n")
    out_dir = tmp_path / "dl"
    code, _, err = run(
        capsys,
        "--dataset_base_dir",
        data,
        "--output_dir",
        out_dir,
        "--strategy",
        "random",
        "--n_clients",
        "2",
        "--val_csv",
        val_csv,
    )
    assert code == 0, err
    assert "1 of the 3 validation case(s)" in err and "Brats18_CBICA_99_1" in err
    for name in ("site-1", "site-2", "site-All"):
        assert case_ids(read(out_dir / f"{name}.json")["validation"]) == ["Brats18_CBICA_1_1", "Brats18_CBICA_4_1"]
    assert len(read(out_dir / "site-All.json")["training"]) == 4


def test_paper_strategy_on_a_partial_folder_uses_real_paths(capsys, tmp_path):
    """Cases found flat with .nii files: the datalist lists what is on disk, missing cases are reported."""
    data = tmp_path / "d"
    for cid in ("A_1", "B_1", "C_1", "V_1"):
        touch_case(data / cid, cid, ext=".nii")
    split = tmp_path / "split.csv"
    split.write_text(
        "case_id,grade,split\nA_1,HGG,site-1\nB_1,HGG,site-2\nC_1,LGG,site-2\nV_1,HGG,validation\n"
        "V_2,HGG,validation\nZ_1,HGG,site-1\n"
    )
    out_dir = tmp_path / "dl"
    code, _, err = run(capsys, "--dataset_base_dir", data, "--output_dir", out_dir, "--split_csv", split)
    assert code == 0, err
    assert "2 of the 6 cases" in err and "site-1 1/2" in err and "validation 1/2" in err and "Z_1" in err
    site2 = read(out_dir / "site-2.json")
    assert case_ids(site2["training"]) == ["B_1", "C_1"]
    assert site2["training"][0]["label"] == "B_1/B_1_seg.nii"


def test_stale_site_files_are_pointed_out(capsys, tmp_path):
    data = brats18_folder(tmp_path / "d", {"CBICA": 6})
    out_dir = tmp_path / "dl"
    assert (
        run(capsys, "--dataset_base_dir", data, "--output_dir", out_dir, "--strategy", "random", "--n_clients", "3")[0]
        == 0
    )
    code, _, err = run(
        capsys, "--dataset_base_dir", data, "--output_dir", out_dir, "--strategy", "random", "--n_clients", "2"
    )
    assert code == 0 and "site-3.json" in err and "earlier build" in err


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bd.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for action in bd.build_parser()._actions:
        for flag in action.option_strings:
            assert flag in text
        assert action.help


# ---------------------------------------------------------------------------------------------------------------
# The real BraTS 2018 sample (8 cases: 4 of site-2, 1 of site-3, 1 of site-4, 2 validation, none of site-1)
# ---------------------------------------------------------------------------------------------------------------
def test_real_sample_paper_strategy_reports_what_is_missing(capsys, brats_sample, tmp_path):
    code, _, err = run(capsys, "--dataset_base_dir", brats_sample, "--output_dir", tmp_path / "dl")
    assert code == 2
    assert "277 of the 285 cases" in err
    assert "site-1 60/60, site-2 57/61, site-3 60/61, site-4 59/60, validation 41/43" in err
    assert "site-1" in err.splitlines()[-1] and "none of its 60 training cases" in err
    assert not (tmp_path / "dl").exists()


def test_real_sample_paper_strategy_with_a_split_of_its_own_cases(capsys, brats_sample, tmp_path):
    split = tmp_path / "split.csv"
    split.write_text(
        "case_id,grade,split\nBrats18_TCIA01_201_1,HGG,site-1\nBrats18_TCIA10_628_1,LGG,site-1\n"
        "Brats18_TCIA02_135_1,HGG,site-2\nBrats18_TCIA01_378_1,HGG,validation\n"
    )
    code, out, err = run(
        capsys, "--dataset_base_dir", brats_sample, "--output_dir", tmp_path / "dl", "--split_csv", split
    )
    assert code == 0, err
    assert "4 case(s) under" in err and "Brats18_TCIA13_623_1" in err  # the unused ones are named
    site1 = load_datalist(tmp_path / "dl" / "site-1.json")
    assert site1["training"][1]["label"] == "training/LGG/Brats18_TCIA10_628_1/Brats18_TCIA10_628_1_seg.nii.gz"


@pytest.mark.parametrize("strategy", ["random", "institution"])
def test_real_sample_own_strategies(capsys, brats_sample, tmp_path, strategy):
    out_dir = tmp_path / "dl"
    code, out, err = run(
        capsys, "--dataset_base_dir", brats_sample, "--output_dir", out_dir, "--strategy", strategy, "--n_clients", "2"
    )
    assert code == 0, err
    sites = [load_datalist(out_dir / f"site-{i}.json") for i in (1, 2)]
    site_all = load_datalist(out_dir / "site-All.json")
    trains = [set(case_ids(s["training"])) for s in sites]
    val = set(case_ids(site_all["validation"]))
    assert len(val) == 1 and not trains[0] & trains[1] and not val & (trains[0] | trains[1])
    assert trains[0] | trains[1] | val == {
        p.name for g in ("HGG", "LGG") for p in (brats_sample / "training" / g).iterdir()
    }
    assert sorted(len(t) for t in trains) == [3, 4]
    for entry in site_all["training"] + site_all["validation"]:
        assert all((brats_sample / p).is_file() for p in entry["image"] + [entry["label"]])
    if strategy == "institution":
        insts = [{cid.split("_")[1] for cid in t} for t in trains]
        assert not insts[0] & insts[1]
    assert "site-All" in out and "next: python -m dataset_brats18.check_dataset" in out


def test_known_label_helper_matches_known_counts():
    """Guards the helper the tests above rely on: the hand-made label really holds 8 voxels per label."""
    from handmade_cases import known_label

    label = known_label(4)
    assert np.bincount(label.ravel()).tolist() == [512 - 24, 8, 8, 0, 8]
