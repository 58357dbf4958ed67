"""The dataset checker: every bad case gives a clear message and exit code 1; volumes are measured correctly."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from handmade_cases import BRATS2023_NAMING, KNOWN_VOXELS, SHAPE, known_label, write_case

from dataset_brats18 import build_datalist as bd
from dataset_brats18 import check_dataset as cd
from dataset_brats18.datalist import brats18_case_entry, write_datalist

SEG = "label"


def brats18_case(root: Path, case_id: str = "Brats18_CBICA_AAA_1", grade: str = "HGG", **kwargs) -> dict:
    """Write a hand-made case in the official 2018 layout and return its datalist entry."""
    write_case(root / "training" / grade / case_id, case_id, **kwargs)
    return brats18_case_entry(case_id, grade)


def check(root: Path, entry: dict, et_label: int = 4, read_images: bool = True) -> cd.CaseCheck:
    return cd.check_case(entry, root, et_label, read_images)


# ---------------------------------------------------------------------------------------------------------------
# One case
# ---------------------------------------------------------------------------------------------------------------
def test_good_case_is_usable_with_known_volumes(tmp_path):
    result = check(tmp_path, brats18_case(tmp_path))
    assert result.usable and not result.warnings, result
    assert result.volumes_ml == pytest.approx({r: v / 1000.0 for r, v in KNOWN_VOXELS.items()})
    assert result.case == "training/HGG/Brats18_CBICA_AAA_1"


def test_volumes_honour_voxel_spacing_and_non_1mm_spacing_is_a_warning(tmp_path):
    result = check(tmp_path, brats18_case(tmp_path, spacing=2.0))
    assert result.usable
    assert result.volumes_ml["wt"] == pytest.approx(KNOWN_VOXELS["wt"] * 8 / 1000.0)  # 2 x 2 x 2 mm voxels
    assert any("not 1 mm" in w and "2x2x2" in w for w in result.warnings)


def test_missing_modality(tmp_path):
    result = check(tmp_path, brats18_case(tmp_path, skip=("flair",)))
    assert not result.usable
    assert result.errors == ["missing flair file training/HGG/Brats18_CBICA_AAA_1/Brats18_CBICA_AAA_1_flair.nii.gz"]


def test_case_absent_altogether_is_one_error(tmp_path):
    result = check(tmp_path, brats18_case_entry("Brats18_CBICA_ZZZ_1", "HGG"))
    assert result.errors == [
        "missing: none of the 5 files is there (folder training/HGG/Brats18_CBICA_ZZZ_1 does not exist)"
    ]
    assert not result.opened


def test_corrupt_gzip_file_is_unreadable(tmp_path):
    entry = brats18_case(tmp_path)
    (tmp_path / entry["image"][2]).write_bytes(b"this is not a NIfTI file at all")
    result = check(tmp_path, entry)
    assert not result.usable
    assert len(result.errors) == 1 and result.errors[0].startswith("unreadable t2 file ")


def test_truncated_gzip_is_caught_when_voxels_are_read(tmp_path):
    entry = brats18_case(tmp_path, arrays={"t1": np.random.default_rng(0).integers(1, 999, SHAPE).astype(np.int16)})
    path = tmp_path / entry["image"][1]
    path.write_bytes(path.read_bytes()[:-200])  # the header survives, the voxels do not
    result = check(tmp_path, entry)
    assert not result.usable and any(e.startswith("cannot read the voxels of t1") for e in result.errors)
    # headers only cannot see it: the documented price of --headers_only
    assert check(tmp_path, entry, read_images=False).usable


def test_label_3_in_a_2018_style_case(tmp_path):
    entry = brats18_case(tmp_path, arrays={SEG: known_label(3)})
    result = check(tmp_path, entry, et_label=4)
    assert not result.usable
    assert "label values [3] outside the expected set [0, 1, 2, 4] (et_label 4)" in result.errors[0]
    assert "BraTS 2023+" in result.errors[0]
    assert result.volumes_ml is None


def test_label_4_in_a_2023_style_case(tmp_path):
    write_case(tmp_path / "BraTS-GLI-00001-000", "BraTS-GLI-00001-000", BRATS2023_NAMING, arrays={SEG: known_label(4)})
    entry = {
        "image": [f"BraTS-GLI-00001-000/BraTS-GLI-00001-000-{s}.nii.gz" for s in ("t1c", "t1n", "t2w", "t2f")],
        "label": "BraTS-GLI-00001-000/BraTS-GLI-00001-000-seg.nii.gz",
    }
    result = check(tmp_path, entry, et_label=3)
    assert not result.usable and "label values [4]" in result.errors[0] and '"et_label": 4' in result.errors[0]


def test_2023_style_case_with_label_3_is_fine(tmp_path):
    write_case(tmp_path / "BraTS-GLI-00001-000", "BraTS-GLI-00001-000", BRATS2023_NAMING)
    entry = {
        "image": [f"BraTS-GLI-00001-000/BraTS-GLI-00001-000-{s}.nii.gz" for s in ("t1c", "t1n", "t2w", "t2f")],
        "label": "BraTS-GLI-00001-000/BraTS-GLI-00001-000-seg.nii.gz",
    }
    result = check(tmp_path, entry, et_label=3)
    assert result.usable and result.volumes_ml["et"] == pytest.approx(KNOWN_VOXELS["et"] / 1000.0)


def test_non_integer_label_values(tmp_path):
    label = known_label(4).astype(np.float32)
    label[0, 0, 0] = 0.5
    result = check(tmp_path, brats18_case(tmp_path, arrays={SEG: label}))
    assert not result.usable and "label values [0.5]" in result.errors[0]


def test_shape_mismatch(tmp_path):
    entry = brats18_case(tmp_path, arrays={"t2": np.ones((8, 8, 7), dtype=np.int16)})
    result = check(tmp_path, entry)
    assert not result.usable
    assert "shapes differ: t1ce 8x8x8, t1 8x8x8, t2 8x8x7, flair 8x8x8, label 8x8x8" in result.errors


def test_affine_mismatch(tmp_path):
    shifted = np.eye(4)
    shifted[0, 3] = 2.5
    result = check(tmp_path, brats18_case(tmp_path, affines={"flair": shifted}))
    assert not result.usable
    assert "affine of flair differs from t1ce by up to 2.5 mm (modalities not co-registered)" in result.errors


def test_all_zero_image(tmp_path):
    result = check(tmp_path, brats18_case(tmp_path, arrays={"t1ce": np.zeros(SHAPE, dtype=np.int16)}))
    assert result.errors == ["t1ce is all zero (an empty scan)"]


def test_nan_and_inf_voxels(tmp_path):
    image = np.ones(SHAPE, dtype=np.float32)
    image[0, 0, :2] = [np.nan, np.inf]
    result = check(tmp_path, brats18_case(tmp_path, arrays={"t1": image}))
    assert result.errors == ["t1 has 2 NaN/Inf voxel(s)"]


def test_four_d_image(tmp_path):
    result = check(tmp_path, brats18_case(tmp_path, arrays={"t2": np.ones((*SHAPE, 2), dtype=np.int16)}))
    assert not result.usable and "is not a 3-D volume (shape 8x8x8x2)" in result.errors[0]


def test_label_without_tumour_is_a_warning_only(tmp_path):
    result = check(tmp_path, brats18_case(tmp_path, arrays={SEG: np.zeros(SHAPE, dtype=np.uint8)}))
    assert result.usable and result.warnings == ["label map holds no tumour (all voxels 0)"]
    assert result.volumes_ml == {"tc": 0.0, "wt": 0.0, "et": 0.0}


def test_value_counts_fast_and_general_paths_agree():
    data = np.array([[0, 4, 4], [2, 1, 0]], dtype=np.uint8)
    assert cd.value_counts(data) == {0: 2, 1: 1, 2: 1, 4: 2}
    assert cd.value_counts(data.astype(np.float32)) == {0: 2, 1: 1, 2: 1, 4: 2}
    assert cd.value_counts(np.array([-1, 0], dtype=np.int16)) == {-1: 1, 0: 1}


def test_volume_stats_median_min_max():
    checks = [
        cd.CaseCheck("a", volumes_ml={"tc": 1.0, "wt": 4.0, "et": 0.0}),
        cd.CaseCheck("b", volumes_ml={"tc": 3.0, "wt": 8.0, "et": 2.0}),
        cd.CaseCheck("c", volumes_ml={"tc": 2.0, "wt": 5.0, "et": 1.0}),
        cd.CaseCheck("d", errors=["x"]),
    ]  # unmeasured cases do not count
    assert cd.volume_stats(checks) == {"tc": (2.0, 1.0, 3.0), "wt": (5.0, 4.0, 8.0), "et": (1.0, 0.0, 2.0)}


# ---------------------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------------------
def run(capsys, *argv) -> tuple[int, str, str]:
    code = cd.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def small_dataset(tmp_path) -> tuple[Path, Path]:
    """4 hand-made 2018-style cases; site-1 trains on 1, site-2 on 2, all share 1 validation case."""
    data = tmp_path / "data"
    entries = [brats18_case(data, f"Brats18_CBICA_A{i}_1") for i in range(4)]
    dl = tmp_path / "dl"
    write_datalist(dl / "site-1.json", [entries[0]], [entries[3]])
    write_datalist(dl / "site-2.json", [entries[1], entries[2]], [entries[3]])
    write_datalist(dl / "site-All.json", entries[:3], [entries[3]])
    return data, dl


def test_cli_all_usable_prints_volumes_per_site(capsys, small_dataset):
    data, dl = small_dataset
    code, out, err = run(capsys, "--dataset_base_dir", data, "--datalist_json_path", dl)
    assert code == 0, out + err
    assert "checking 4 case(s) listed in site-1, site-2, site-All" in out
    lines = {
        line.split()[0] + (" " + line.split()[1] if line.startswith("validation") else ""): line
        for line in out.splitlines()
        if line.startswith(("site-", "validation"))
    }
    assert lines["site-1"].split()[1:4] == ["1", "1", "0"]  # training, validation, unusable
    assert lines["site-2"].split()[1:4] == ["2", "1", "0"]
    assert lines["site-All"].split()[1:4] == ["3", "1", "0"]
    assert "validation (shared)" in lines
    assert "4 case(s): 4 usable, 0 unusable" in out


def test_cli_volume_table_values(capsys, tmp_path):
    """Cases big enough that the ml figures are readable: WT of 24, 48 and 72 ml at 10 mm voxels."""
    data = tmp_path / "data"
    entries = []
    for i, blocks in enumerate((1, 2, 3)):
        label = np.zeros(SHAPE, dtype=np.uint8)
        label[:blocks, :2, :2] = 4  # 4 * blocks voxels of ET
        label[4 : 4 + blocks, :2, :2] = 1
        label[:blocks, 4:6, :2] = 2
        entries.append(brats18_case(data, f"Brats18_CBICA_B{i}_1", arrays={SEG: label}, spacing=10.0))
    dl = tmp_path / "dl"
    write_datalist(dl / "site-1.json", entries[:2], [entries[2]])
    write_datalist(dl / "site-All.json", entries[:2], [entries[2]])
    code, out, _ = run(capsys, "--dataset_base_dir", data, "--datalist_json_path", dl)
    assert code == 0
    row = next(line for line in out.splitlines() if line.startswith("site-1"))
    # voxel 1 ml; ET 4/8 ml, TC 8/16 ml, WT 12/24 ml -> median is the mean of the two
    assert row.split()[4:] == ["12.0", "[8.0-16.0]", "18.0", "[12.0-24.0]", "6.0", "[4.0-8.0]"]


def test_cli_bad_case_exit_1_and_named(capsys, small_dataset):
    data, dl = small_dataset
    seg = data / "training/HGG/Brats18_CBICA_A1_1/Brats18_CBICA_A1_1_seg.nii.gz"
    nib.save(nib.Nifti1Image(known_label(3), np.eye(4)), seg)
    code, out, err = run(capsys, "--dataset_base_dir", data, "--datalist_json_path", dl, "--problems_only")
    assert code == cd.EXIT_FAILED
    assert "UNUSABLE training/HGG/Brats18_CBICA_A1_1" in out and "label values [3]" in out
    assert "ok " not in out  # --problems_only
    assert "1 unusable" in out and err.startswith("error: 1 case(s) unusable")
    site2 = next(line for line in out.splitlines() if line.startswith("site-2"))
    assert site2.split()[1:4] == ["2", "1", "1"]


def test_cli_writes_a_csv_and_workers_give_the_same_answer(capsys, small_dataset, tmp_path):
    data, dl = small_dataset
    run(capsys, "--dataset_base_dir", data, "--datalist_json_path", dl, "--csv", tmp_path / "one.csv")
    run(
        capsys,
        "--dataset_base_dir",
        data,
        "--datalist_json_path",
        dl,
        "--csv",
        tmp_path / "two.csv",
        "--num_workers",
        "2",
    )
    one, two = (
        [line.rsplit(",", 1)[0] for line in (tmp_path / n).read_text().splitlines()] for n in ("one.csv", "two.csv")
    )
    assert one == two and len(one) == 5
    assert one[0] == "case,usable,tc_ml,wt_ml,et_ml,errors,warnings"
    assert one[1].startswith("training/HGG/Brats18_CBICA_A0_1,1,0.016,0.024,0.008")


def test_cli_headers_only_still_reads_labels(capsys, small_dataset):
    data, dl = small_dataset
    seg = data / "training/HGG/Brats18_CBICA_A2_1/Brats18_CBICA_A2_1_seg.nii.gz"
    nib.save(nib.Nifti1Image(known_label(3), np.eye(4)), seg)
    code, out, _ = run(capsys, "--dataset_base_dir", data, "--datalist_json_path", dl, "--headers_only")
    assert code == 1 and "label values [3]" in out and "(headers and labels)" in out


@pytest.mark.parametrize(
    "breakage, argv, message",
    [
        ("none", ["--dataset_base_dir", "{tmp}/nope"], "--dataset_base_dir"),
        ("none", ["--datalist_json_path", "{tmp}/nope"], "--datalist_json_path"),
        ("none", ["--num_workers", "0"], "--num_workers 0"),
        ("none", ["--datalist_json_path", "{tmp}/dl/site-9.json"], "site-9.json does not exist"),
        ("bad_json", [], "is not valid JSON"),
        ("no_sites", [], "holds no site-*.json"),
        ("mixed_et", [], "disagree on et_label"),
    ],
)
def test_cli_bad_input_exit_2(capsys, small_dataset, tmp_path, breakage, argv, message):
    data, dl = small_dataset
    if breakage == "bad_json":
        (dl / "site-2.json").write_text("{not json")
    elif breakage == "no_sites":
        for p in dl.glob("*.json"):
            p.unlink()
    elif breakage == "mixed_et":
        content = json.loads((dl / "site-2.json").read_text())
        content["et_label"] = 3
        (dl / "site-2.json").write_text(json.dumps(content))
    base = ["--dataset_base_dir", str(data), "--datalist_json_path", str(dl)]
    code, out, err = run(capsys, *base, *[a.format(tmp=tmp_path) for a in argv])
    assert code == cd.EXIT_BAD_INPUT
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and message in err, err


def test_cli_checks_the_datalist_files_named(capsys, small_dataset):
    data, dl = small_dataset
    code, out, err = run(
        capsys, "--dataset_base_dir", data, "--datalist_json_path", dl / "site-2.json", dl / "site-1.json"
    )
    assert code == 0, out + err
    assert "checking 4 case(s) listed in site-2, site-1 under" in out
    assert not any(line.startswith("site-All") for line in out.splitlines())
    # a folder and a file of it: each datalist once
    code, out, _ = run(capsys, "--dataset_base_dir", data, "--datalist_json_path", dl, dl / "site-1.json")
    assert code == 0 and "listed in site-1, site-2, site-All under" in out


def test_site_names_sort_naturally(tmp_path):
    for name in ("site-10", "site-2", "site-All", "site-1"):
        (tmp_path / f"{name}.json").write_text("{}")
    (tmp_path / "other.json").write_text("{}")
    assert cd.datalist_names(tmp_path) == ["site-1", "site-2", "site-10", "site-All"]


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        cd.main(["--help"])
    text = capsys.readouterr().out
    for action in cd.build_parser()._actions:
        assert action.help and all(flag in text for flag in action.option_strings)


# ---------------------------------------------------------------------------------------------------------------
# Real BraTS 2018 cases
# ---------------------------------------------------------------------------------------------------------------
def test_real_sample_all_usable_and_volumes_match_an_independent_count(capsys, brats_sample, tmp_path):
    assert (
        bd.main(
            [
                "--dataset_base_dir",
                str(brats_sample),
                "--output_dir",
                str(tmp_path / "dl"),
                "--strategy",
                "institution",
                "--n_clients",
                "2",
            ]
        )
        == 0
    )
    code, out, _ = run(
        capsys,
        "--dataset_base_dir",
        brats_sample,
        "--datalist_json_path",
        tmp_path / "dl",
        "--csv",
        tmp_path / "cases.csv",
    )
    assert code == 0, out
    assert "8 case(s): 8 usable, 0 unusable, 0 with warnings" in out
    seg = brats_sample / "training/HGG/Brats18_TCIA01_201_1/Brats18_TCIA01_201_1_seg.nii.gz"
    label = np.asarray(nib.load(seg).dataobj)
    row = next(r for r in (tmp_path / "cases.csv").read_text().splitlines() if "Brats18_TCIA01_201_1" in r)
    tc, wt, et = (float(v) for v in row.split(",")[2:5])
    assert tc == pytest.approx(np.isin(label, [1, 4]).sum() / 1000.0, abs=1e-3)
    assert wt == pytest.approx((label > 0).sum() / 1000.0, abs=1e-3)
    assert et == pytest.approx((label == 4).sum() / 1000.0, abs=1e-3)


def test_real_sample_against_the_shipped_datalists_names_every_missing_case(capsys, brats_sample):
    code, out, _ = run(capsys, "--dataset_base_dir", brats_sample, "--headers_only", "--problems_only")
    assert code == cd.EXIT_FAILED
    assert "285 case(s): 8 usable, 277 unusable" in out
    assert out.count("UNUSABLE ") == 277 and out.count("error: missing: none of the 5 files") == 277
    assert "UNUSABLE training/HGG/Brats18_CBICA_AOD_1" in out
    site1 = next(line for line in out.splitlines() if line.startswith("site-1"))
    assert site1.split() == ["site-1", "60", "43", "60", "-", "-", "-"]  # no case of site-1 in the sample
