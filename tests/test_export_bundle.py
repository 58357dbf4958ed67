"""result_stat.export_bundle: the bundle runs with MONAI's own runner where this project cannot be imported, and
writes the label maps result_stat.predict writes; its metadata carries the training job, its Dice and its privacy."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from test_predict import seeded_state

from brats_fl.job_results import JobPaths
from brats_fl.settings import TrainingSettings
from result_stat import export_bundle, predict

WINDOW = ["--infer_roi_size", "32", "32", "24"]
PROJECT_PACKAGES = {"brats_fl", "dataset_brats18", "result_stat", "benchmarks", "model", "job", "client"}
# The fields MONAI's bundle metadata schema requires (meta_schema_20240725.json, "required" at the top level and in
# $defs/tensor; https://github.com/Project-MONAI/MONAI-extra-test-data/releases/tag/0.8.1), written out here as a
# JSON schema of our own: verify_metadata downloads the official file, which CI (no internet) cannot.
TENSOR_SCHEMA = {
    "type": "object",
    "required": ["type", "format", "num_channels", "spatial_shape", "dtype", "value_range"],
    "properties": {"num_channels": {"type": "integer"}, "value_range": {"type": "array"}},
}
REQUIRED_FIELDS_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2019-09/schema",
    "type": "object",
    "required": [
        "schema",
        "version",
        "monai_version",
        "pytorch_version",
        "numpy_version",
        "required_packages_version",
        "task",
        "description",
        "authors",
        "copyright",
        "network_data_format",
    ],
    "properties": {
        "network_data_format": {
            "type": "object",
            "required": ["inputs", "outputs"],
            "properties": {
                "inputs": {"type": "object", "additionalProperties": TENSOR_SCHEMA},
                "outputs": {"type": "object", "additionalProperties": TENSOR_SCHEMA},
            },
        },
        "references": {"type": "array", "items": {"type": "string"}},
        "eval_metrics": {"type": "object"},
    },
}


def environment_without_the_project() -> dict[str, str]:
    """The environment of a user who has MONAI but not this project: no PYTHONPATH (the cwd is elsewhere too)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU, as result_stat.predict runs here
    return env


def test_bundle_scripts_import_nothing_of_this_project():
    tree = ast.parse(export_bundle.SCRIPTS_SOURCE.read_text())
    imported = {
        alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    }
    imported |= {
        node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
    }
    assert imported and not imported & PROJECT_PACKAGES, imported


def test_monai_runner_writes_the_label_maps_of_predict(tiny_federation, tmp_path):
    dataset_dir, datalist_dir = tiny_federation
    torch.save(seeded_state(), tmp_path / "model.pt")
    cases = tmp_path / "cases"
    for entry in json.loads((datalist_dir / "site-1.json").read_text())["validation"]:
        folder = dataset_dir / Path(entry["label"]).parent
        shutil.copytree(folder, cases / folder.name)
    bundle = tmp_path / "bundle"
    assert export_bundle.main(["--model", str(tmp_path / "model.pt"), "--output_dir", str(bundle)] + WINDOW) == 0
    for part in ("configs/metadata.json", "configs/inference.json", "models/model.pt", "docs/README.md"):
        assert (bundle / part).is_file(), part
    assert (
        predict.main(
            ["--model", str(tmp_path / "model.pt"), "--input", str(cases), "--output_dir", str(tmp_path / "predicted")]
            + WINDOW
        )
        == 0
    )
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = environment_without_the_project()
    isolated = subprocess.run([sys.executable, "-c", "import brats_fl"], cwd=outside, env=env, capture_output=True)
    assert isolated.returncode != 0, "the project is importable: the check below would prove nothing"
    command = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        str(bundle / "configs" / "inference.json"),
        "--bundle_root",
        str(bundle),
        "--dataset_dir",
        str(cases),
        "--output_dir",
        str(tmp_path / "monai"),
    ]
    done = subprocess.run(command, cwd=outside, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    predicted = sorted((tmp_path / "predicted").glob("*.nii.gz"))
    assert len(predicted) == 2
    for ours in predicted:
        theirs = nib.load(tmp_path / "monai" / ours.name)
        mine = nib.load(ours)
        a, b = np.asarray(mine.dataobj), np.asarray(theirs.dataobj)
        assert a.shape == b.shape and set(np.unique(a)) == {0, 1, 2, 4}
        assert np.mean(a != b) <= 1e-4, np.mean(a != b)
        np.testing.assert_allclose(theirs.affine, mine.affine, atol=1e-6)


def fake_job(workspace: Path, mechanism: str | None) -> JobPaths:
    """A finished job's folder, as job.py leaves it: the best model, round metrics, settings and privacy report."""
    job = JobPaths(workspace, "brats18_2_dp" if mechanism else "brats18_2")
    job.best_model.parent.mkdir(parents=True)
    torch.save({"model": seeded_state()}, job.best_model)
    rounds = [(0, 0.1), (1, 0.62), (2, 0.55)]
    job.round_metrics.parent.mkdir(parents=True)
    lines = []
    for r, dice in rounds:
        metrics = [{"name": "val_dice", "value": dice}, {"name": "val_dice_tc", "value": dice + 0.01}]
        lines.append(
            json.dumps({"round": r, "aggregated_metrics": metrics, "sites": [{"name": "site-1", "metrics": metrics}]})
        )
    job.round_metrics.write_text("\n".join(lines) + "\n")
    job.settings_file.parent.mkdir(parents=True)
    settings = TrainingSettings(num_rounds=3, dp_mechanism=mechanism, infer_roi_size=(32, 32, 24))
    settings.write(job.settings_file)
    if mechanism:
        report = {
            "mechanism": mechanism,
            "guarantee": "pure DP",
            "max_epsilon": 4.2e6,
            "sites": {"site-1": {"epsilon": 4.2e6, "delta": 0.0}, "site-2": {"epsilon": 4.1e6, "delta": 0.0}},
        }
        job.privacy_report.write_text(json.dumps(report))
    return job


@pytest.mark.parametrize("mechanism", ["svt", None])
def test_metadata_states_the_job_its_dice_and_its_privacy(tmp_path, mechanism):
    job = fake_job(tmp_path / "ws", mechanism)
    bundle = tmp_path / "bundle"
    assert export_bundle.main(["--model", str(job.best_model), "--output_dir", str(bundle)]) == 0
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    training = meta["training"]
    assert training["job"] == job.job_name and training["best_round"] == 1
    assert training["val_dice"]["val_dice"] == pytest.approx(0.62) and meta["eval_metrics"][
        "val_dice"
    ] == pytest.approx(0.62)
    if mechanism:
        assert training["privacy"]["mechanism"] == "svt" and training["privacy"]["epsilon"] == pytest.approx(4.2e6)
        assert "svt, epsilon 4.2e+06" in meta["description"]
    else:
        assert training["privacy"]["mechanism"] is None and "no differential privacy" in meta["description"]
    assert meta["label_values"] == {
        "0": "background",
        "1": "necrotic and non-enhancing tumour core",
        "2": "peritumoral edema",
        "4": "enhancing tumour",
    }
    assert meta["network_data_format"]["inputs"]["image"]["num_channels"] == 4
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == [32, 32, 24]  # the job's window
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    assert config["network_def"]["_target_"] == "SegResNet" and config["network_def"]["init_filters"] == 8
    assert config["inferer"]["roi_size"] == [32, 32, 24]
    assert "0.6200" in (bundle / "docs" / "README.md").read_text()


def test_metadata_passes_monais_verify_metadata_against_the_schemas_required_fields(tmp_path):
    torch.save(seeded_state(), tmp_path / "model.pt")
    assert (
        export_bundle.main(["--model", str(tmp_path / "model.pt"), "--output_dir", str(tmp_path / "b")] + WINDOW) == 0
    )
    meta_file = tmp_path / "b" / "configs" / "metadata.json"
    assert json.loads(meta_file.read_text())["schema"] == export_bundle.SCHEMA_URL
    assert export_bundle.missing_metadata_fields(json.loads(meta_file.read_text())) == []
    schema = tmp_path / "schema.json"  # present, so MONAI skips the download
    schema.write_text(json.dumps(REQUIRED_FIELDS_SCHEMA))
    command = [
        sys.executable,
        "-m",
        "monai.bundle",
        "verify_metadata",
        "--meta_file",
        str(meta_file),
        "--filepath",
        str(schema),
    ]
    done = subprocess.run(command, cwd=tmp_path, env=environment_without_the_project(), capture_output=True, text=True)
    assert done.returncode == 0 and "metadata is verified with no error" in done.stdout + done.stderr, done.stderr[
        -2000:
    ]
    # the same check fails on metadata that lacks a required field: it is not vacuous
    from monai.bundle import verify_metadata

    broken = json.loads(meta_file.read_text())
    del broken["network_data_format"]["inputs"]["image"]["num_channels"]
    meta_file.write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="num_channels"):
        verify_metadata(meta_file=str(meta_file), filepath=str(schema))


def test_existing_bundle_is_kept_unless_overwrite(tmp_path, capsys):
    torch.save(seeded_state(), tmp_path / "model.pt")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "mine.txt").write_text("keep")
    argv = ["--model", str(tmp_path / "model.pt"), "--output_dir", str(tmp_path / "b")] + WINDOW
    assert export_bundle.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "--output_dir" in err and "--overwrite" in err and len(err.splitlines()) == 1
    assert (tmp_path / "b" / "mine.txt").read_text() == "keep"
    assert export_bundle.main([*argv, "--overwrite"]) == 0
    assert not (tmp_path / "b" / "mine.txt").exists() and (tmp_path / "b" / "models" / "model.pt").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging folder left behind
