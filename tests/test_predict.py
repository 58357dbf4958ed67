"""result_stat.predict: label maps of new cases equal what the evaluation writes for the same model, on the input's
grid and header; bad cases are reported one line each while the others are segmented; outputs are not overwritten."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from handmade_cases import BRATS2023_NAMING, LEGACY_NAMING, file_name, write_case

from model import BratsSegResNet
from result_stat import evaluate as ev
from result_stat import predict

WINDOW = ["--infer_roi_size", "32", "32", "24"]
HEADER_FIELDS = (
    "dim",
    "pixdim",
    "qform_code",
    "sform_code",
    "quatern_b",
    "quatern_c",
    "quatern_d",
    "srow_x",
    "xyzt_units",
)


@pytest.fixture(scope="module")
def seeded_model(tmp_path_factory) -> Path:
    """An untrained network with fixed weights: label maps with every label are all these tests need."""
    path = tmp_path_factory.mktemp("model") / "model.pt"
    torch.save(seeded_state(), path)
    return path


def seeded_state() -> dict[str, torch.Tensor]:
    """SegResNet-8 with fixed random weights whose last layer is nearly centred (weights of either sign, small biases),
    so that every region channel is positive in some voxels and negative in others: label maps with all four labels.
    The biases are not 0: where the features vanish (background) a zero bias would put the probability exactly at the
    threshold, where MONAI's AsDiscrete (>=) and the project's (>) rightly disagree."""
    model = BratsSegResNet(init_filters=8, init_seed=7)
    final = model.conv_final[-1].conv
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        final.weight.normal_(0.0, 1.0)
        final.bias.copy_(torch.tensor([0.05, -0.05, -0.1]))
    return model.state_dict()


def validation_case_folders(dataset_dir: Path, datalist_path: Path) -> list[Path]:
    datalist = json.loads(datalist_path.read_text())
    return [dataset_dir / Path(e["label"]).parent for e in datalist["validation"]]


def assert_same_label_map(written: Path, expected: Path, reference_image: Path) -> None:
    """Voxel for voxel the expected map; header and affine of the input image (the stored type aside)."""
    ours, theirs, image = nib.load(written), nib.load(expected), nib.load(reference_image)
    np.testing.assert_array_equal(np.asarray(ours.dataobj), np.asarray(theirs.dataobj))
    np.testing.assert_array_equal(ours.affine, image.affine)
    for field in HEADER_FIELDS:
        np.testing.assert_array_equal(ours.header[field], image.header[field], err_msg=field)
    assert ours.get_data_dtype() == np.uint8


def test_label_maps_equal_the_evaluations_on_the_inputs_grid(seeded_model, tiny_federation, tmp_path, capsys):
    dataset_dir, datalist_dir = tiny_federation
    datalist = datalist_dir / "site-1.json"
    data_flags = ["--dataset_base_dir", str(dataset_dir)]
    evaluated = tmp_path / "eval"
    assert (
        ev.main(
            ["--checkpoint", f"m={seeded_model}", *data_flags, "--datalist_json_path", str(datalist)]
            + WINDOW
            + ["--save_predictions", "--no_cache", "--output_dir", str(evaluated)]
        )
        == 0
    )
    # the same cases as a folder in the BraTS layout, and through the datalist
    cases = tmp_path / "new_cases"
    for folder in validation_case_folders(dataset_dir, datalist):
        shutil.copytree(folder, cases / folder.name)
    assert (
        predict.main(
            ["--model", str(seeded_model), "--input", str(cases), "--output_dir", str(tmp_path / "a")] + WINDOW
        )
        == 0
    )
    assert (
        predict.main(
            [
                "--model",
                str(seeded_model),
                "--input",
                str(datalist),
                *data_flags,
                "--datalist_key",
                "validation",
                "--output_dir",
                str(tmp_path / "b"),
            ]
            + WINDOW
        )
        == 0
    )
    out = capsys.readouterr().out
    expected_files = sorted((evaluated / "predictions" / "m").glob("*.nii.gz"))
    assert len(expected_files) == 2
    for expected in expected_files:
        case_id = expected.name.removesuffix(".nii.gz")
        t1ce = cases / case_id / f"{case_id}_t1ce.nii.gz"
        assert set(np.unique(np.asarray(nib.load(expected).dataobj))) == {0, 1, 2, 4}  # a map with every label
        assert_same_label_map(tmp_path / "a" / expected.name, expected, t1ce)
        assert_same_label_map(tmp_path / "b" / expected.name, expected, t1ce)
        assert f"{case_id}: " in out and " s -> " in out  # one progress line per case, with its time


def test_brats2023_names_anisotropic_voxels_give_label_3_on_the_original_grid(seeded_model, tmp_path):
    rng = np.random.default_rng(0)
    images = {m: rng.integers(1, 1000, size=(10, 12, 9)).astype(np.int16) for m in ("t1ce", "t1", "t2", "flair")}
    label = rng.choice(np.array([0, 1, 2, 3], dtype=np.uint8), size=(10, 12, 9))
    affine = np.array([[-1.5, 0, 0, 10], [0, -1.2, 0, 20], [0, 0, 2.0, -5], [0, 0, 0, 1]])
    case_id = "BraTS-GLI-00001-000"
    files = write_case(
        tmp_path / "cases" / case_id,
        case_id,
        BRATS2023_NAMING,
        arrays={**images, "label": label},
        affines=dict.fromkeys(("t1ce", "t1", "t2", "flair", "label"), affine),
    )
    datalist = tmp_path / "datalist.json"
    entry = {"image": [str(files[m]) for m in ("t1ce", "t1", "t2", "flair")], "label": str(files["label"])}
    datalist.write_text(json.dumps({"et_label": 3, "training": [entry], "validation": [entry]}))
    window = ["--infer_roi_size", "16", "16", "16"]
    assert (
        ev.main(
            [
                "--checkpoint",
                f"m={seeded_model}",
                "--dataset_base_dir",
                str(tmp_path),
                "--datalist_json_path",
                str(datalist),
                "--save_predictions",
                "--no_cache",
                "--output_dir",
                str(tmp_path / "eval"),
            ]
            + window
        )
        == 0
    )
    assert (
        predict.main(
            ["--model", str(seeded_model), "--input", str(tmp_path / "cases"), "--output_dir", str(tmp_path / "out")]
            + window
        )
        == 0
    )
    written = tmp_path / "out" / f"{case_id}.nii.gz"
    expected = tmp_path / "eval" / "predictions" / "m" / f"{case_id}-seg.nii.gz"  # the evaluation names it by label
    assert_same_label_map(written, expected, files["t1ce"])
    assert nib.load(written).shape == (10, 12, 9)
    assert set(np.unique(np.asarray(nib.load(written).dataobj))) <= {0, 1, 2, 3}
    assert 3 in np.asarray(nib.load(written).dataobj)


def write_bad_cases(root: Path) -> dict[str, str]:
    """A good case and four broken ones; returns {case id: what its error line must name}."""
    write_case(root / "good", "good")
    write_case(root / "noflair", "noflair", skip=("flair",))
    write_case(root / "notnifti", "notnifti", skip=("t2",))
    (root / "notnifti" / "notnifti_t2.mha").write_bytes(b"ITK MetaImage")
    write_case(root / "garbled", "garbled")
    (root / "garbled" / file_name("garbled", "t1", LEGACY_NAMING)).write_bytes(b"x" * 400)
    write_case(root / "shapes", "shapes", arrays={"t2": np.ones((8, 8, 6), dtype=np.int16)})
    return {
        "noflair": "noflair_flair.nii.gz",
        "notnifti": "notnifti_t2.mha is not NIfTI",
        "garbled": "garbled_t1.nii.gz",
        "shapes": "shapes_t2.nii.gz 8x8x6",
    }


def test_bad_cases_are_named_one_line_each_and_the_others_still_segmented(seeded_model, tmp_path, capsys):
    expected = write_bad_cases(tmp_path / "cases")
    argv = ["--model", str(seeded_model), "--input", str(tmp_path / "cases"), "--output_dir", str(tmp_path / "out")]
    assert predict.main(argv + ["--infer_roi_size", "16", "16", "16"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == len(expected), err
    for case_id, named in expected.items():
        line = next(x for x in err if x.startswith(f"error: case {case_id}: "))
        assert named in line, line
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["good.nii.gz"]


def test_existing_label_maps_are_kept_unless_overwrite(seeded_model, tmp_path, capsys):
    write_case(tmp_path / "cases" / "one", "one")
    argv = [
        "--model",
        str(seeded_model),
        "--input",
        str(tmp_path / "cases"),
        "--output_dir",
        str(tmp_path / "out"),
        "--infer_roi_size",
        "16",
        "16",
        "16",
    ]
    assert predict.main(argv) == 0
    (tmp_path / "out" / "one.nii.gz").write_bytes(b"mine")
    capsys.readouterr()
    assert predict.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "one.nii.gz exists" in err and "--overwrite" in err and len(err.splitlines()) == 1
    assert (tmp_path / "out" / "one.nii.gz").read_bytes() == b"mine"
    assert predict.main([*argv, "--overwrite"]) == 0
    assert nib.load(tmp_path / "out" / "one.nii.gz").shape == (8, 8, 8)


def test_bad_flags_exit_2_with_one_line(seeded_model, tmp_path, capsys):
    write_case(tmp_path / "cases" / "one", "one")
    (tmp_path / "empty").mkdir()
    (tmp_path / "list.json").write_text(json.dumps({"testing": [{"image": ["a.nii.gz"]}]}))
    model, cases = str(seeded_model), str(tmp_path / "cases")
    for argv, named in [
        (["--model", str(tmp_path / "none.pt"), "--input", cases], "--model"),
        (["--model", model, "--input", str(tmp_path / "absent")], "--input"),
        (["--model", model, "--input", str(tmp_path / "empty")], "no case found"),
        (["--model", model, "--input", str(tmp_path / "list.json")], "4 file paths"),
        (["--model", model, "--input", cases, "--infer_roi_size", "30", "32", "24"], "--infer_roi_size"),
    ]:
        assert predict.main([*argv, "--output_dir", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip()
        assert named in err and len(err.splitlines()) == 1, err


def test_help_explains_every_flag(capsys):
    parser = predict.build_parser()
    for action in parser._actions:
        assert action.help, action.option_strings
    with pytest.raises(SystemExit):
        predict.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--model", "--input", "--output_dir", "--gpu", "--overwrite", "--dataset_base_dir", "--datalist_key"):
        assert flag in text
