"""result_stat.evaluate: checkpoint loading, label-map writing, bad input, and re-evaluating a real tiny job's best
model, which must reproduce the val_dice the job logged for its best round."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from tiny_job import REPO_DIR, tiny_job_paths

import brats_fl.pipeline as bp
from brats_fl import metrics as bm
from brats_fl.job_results import best_round_of, read_round_metrics
from model import BratsSegResNet
from result_stat import evaluate as ev

TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def tiny_job(tmp_path_factory, tiny_federation):
    return tiny_job_paths(tmp_path_factory, *tiny_federation)


def first_validation_item(dataset_dir: Path, datalist_path: Path):
    """The first validation case as the clients' validation transform delivers it, with the transform."""
    datalist = bp.read_datalist(datalist_path)
    et_label = bp.datalist_et_label(datalist)
    entry = bp.resolve_entries(datalist["validation"][:1], dataset_dir)[0]
    transform = bp.val_transforms(et_label)
    return transform(entry), transform, Path(entry["label"]), et_label


# --- checkpoints ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("wrapped", [True, False])
def test_model_width_is_inferred_and_weights_load(tmp_path, wrapped):
    torch.manual_seed(3)
    original = BratsSegResNet(init_filters=24)
    state = original.state_dict()
    torch.save({"model": state, "train_conf": {"train": {"model": "x"}}} if wrapped else state, tmp_path / "m.pt")
    loaded = ev.load_model(tmp_path / "m.pt", torch.device("cpu"))
    assert loaded.init_filters == 24
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())


def test_checkpoint_needing_unsafe_unpickling_is_refused(tmp_path):
    torch.save({"model": BratsSegResNet(init_filters=8).state_dict(), "extra": Path("x")}, tmp_path / "m.pt")
    with pytest.raises(ev.EvaluationInputError, match="weights-only"):
        ev.load_model(tmp_path / "m.pt", torch.device("cpu"))


def test_checkpoint_of_another_network_is_refused(tmp_path):
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, tmp_path / "m.pt")
    with pytest.raises(ev.EvaluationInputError, match="no BratsSegResNet weights"):
        ev.load_model(tmp_path / "m.pt", torch.device("cpu"))


# --- label maps ----------------------------------------------------------------------------------------------------
def test_label_map_of_a_perfect_prediction_is_the_ground_truth_file(tiny_federation, tmp_path):
    dataset_dir, datalist_dir = tiny_federation
    item, transform, label_path, et_label = first_validation_item(dataset_dir, datalist_dir / "site-1.json")
    ev.save_label_map(item["label"], item["label"], transform, label_path, et_label, tmp_path / "pred.nii.gz")
    written, original = nib.load(tmp_path / "pred.nii.gz"), nib.load(label_path)
    np.testing.assert_array_equal(np.asarray(written.dataobj), np.asarray(original.dataobj))
    np.testing.assert_array_equal(written.affine, original.affine)  # LPS, like the real release
    assert written.get_data_dtype() == np.uint8


def test_label_map_round_trip_on_a_real_brats_case(brats_sample, tmp_path):
    from dataset_brats18.datalist import brats18_case_entry, write_datalist

    case = next((brats_sample / "training" / "HGG").iterdir())
    write_datalist(tmp_path / "dl.json", [], [brats18_case_entry(case.name, "HGG")])
    item, transform, label_path, et_label = first_validation_item(brats_sample, tmp_path / "dl.json")
    ev.save_label_map(item["label"], item["label"], transform, label_path, et_label, tmp_path / "pred.nii.gz")
    written, original = nib.load(tmp_path / "pred.nii.gz"), nib.load(label_path)
    assert written.shape == (240, 240, 155)
    np.testing.assert_array_equal(np.asarray(written.dataobj), np.asarray(original.dataobj))
    np.testing.assert_array_equal(written.affine, original.affine)


def test_case_id_of_brats_file_names():
    assert ev.case_id_of("training/HGG/Brats18_TCIA01_201_1/Brats18_TCIA01_201_1_seg.nii.gz") == "Brats18_TCIA01_201_1"
    assert ev.case_id_of("/x/BraTS-GLI-00000-000-seg.nii.gz") == "BraTS-GLI-00000-000-seg"


# --- reports -------------------------------------------------------------------------------------------------------
def fake_result(label: str, n_cases: int = 2) -> ev.ModelResult:
    """A ModelResult of hand-made cases: a perfect one, then cases with a shifted TC and a false-positive ET voxel."""
    shape = (16, 16, 16)
    truth = np.zeros((3, *shape), dtype=bool)
    truth[0, 5:9, 5:9, 5:9] = truth[1, 3:12, 3:12, 3:12] = True
    result = ev.ModelResult(ev.ModelSpec(label, Path(f"/nowhere/{label}.pt")))
    for case in range(n_cases):
        pred = truth.copy()
        if case:
            pred[0] = np.roll(truth[0], case, axis=0)
            pred[2, 1, 1, 1] = True
        result.cases.append(
            ev.CaseResult(
                case_id=f"case{case}",
                scores=bm.region_scores(pred, truth, (1.0, 1.0, 1.0), bp.REGIONS),
                training_rule_dice=bp.dice_per_region(torch.as_tensor(pred), torch.as_tensor(truth)),
                voxels_truth=tuple(int(v) for v in truth.reshape(3, -1).sum(axis=1)),
                voxels_pred=tuple(int(v) for v in pred.reshape(3, -1).sum(axis=1)),
            )
        )
    return result


def table_after(text: str, header_start: str) -> list[list[str]]:
    """The cells of the markdown table whose header line starts with header_start, header row first."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    table = [lines[start]]
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        table.append(line)
    return [[c.strip() for c in line.strip("|").split("|")] for line in table]


def test_summary_prints_the_papers_dice_table_then_distances_lesion_wise_and_voxel_rates():
    results = [fake_result("a"), fake_result("b", n_cases=3)]
    summary = ev.render_summary(results, score_label_maps=True)
    paper = table_after(summary, "| Configuration | Val Overall Dice")
    assert paper[0] == list(ev.SUMMARY_COLUMNS)
    assert [row[0] for row in paper[1:]] == ["a", "b"]
    assert float(paper[2][1]) == pytest.approx(results[1].mean("dice_overall"), abs=5e-5)
    detail = table_after(summary, "| Configuration | Region |")
    kinds = ("hd95", "lesion_dice", "lesion_hd95", "sensitivity", "specificity")
    assert detail[0] == ["Configuration", "Region", *(ev.DETAIL_HEADINGS[k] for k in kinds)]
    assert [row[:2] for row in detail[1:]] == [[c, r] for c in "ab" for r in ("TC", "WT", "ET")]
    et_of_b = detail[6][2:]
    for cell, kind in zip(et_of_b, kinds, strict=True):
        assert float(cell) == pytest.approx(results[1].mean(f"{kind}_et"), abs=0.006)
    assert summary.index("| Configuration | Val Overall Dice") < summary.index("| Configuration | Region |")
    assert "373.13 mm" in summary and "374 mm" in summary  # the project's cap, said next to the table
    for kind in ("dice", *kinds):
        assert bm.SCORE_DEFINITIONS[kind].split()[0] in summary
    assert "| Configuration | Cases | Best round | Logged val_dice | Re-evaluated val_dice |" in summary


def test_directed_hd95_column_only_on_request():
    results = [fake_result("a")]
    assert "HD95 directed-max (mm)" not in ev.render_summary(results)
    detail = table_after(ev.render_summary(results, hd95_directed=True), "| Configuration | Region |")
    assert detail[0][2:4] == ["HD95 (mm)", "HD95 directed-max (mm)"]
    tc_pooled, tc_directed = (float(v) for v in detail[1][2:4])
    assert tc_pooled <= tc_directed


def test_per_case_csv_carries_every_score_of_every_case(tmp_path):
    results = [fake_result("a"), fake_result("b", n_cases=3)]
    ev.write_per_case_csv(results, tmp_path / "per_case.csv")
    with open(tmp_path / "per_case.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(ev.CSV_COLUMNS)
    assert [(r["configuration"], r["case_id"]) for r in rows] == [
        ("a", "case0"),
        ("a", "case1"),
        ("b", "case0"),
        ("b", "case1"),
        ("b", "case2"),
    ]
    for row, case in zip(rows, [c for r in results for c in r.cases], strict=True):
        for key, value in case.scores.items():
            assert float(row[key]) == pytest.approx(value, abs=1e-4), key
    assert rows[1]["lesion_fp_et"] == "1" and rows[1]["lesion_tp_tc"] == "1"


def test_help_says_which_definition_each_column_uses(capsys):
    with pytest.raises(SystemExit):
        ev.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for kind, heading in {"dice": "Dice", **ev.DETAIL_HEADINGS}.items():
        assert f"- {heading}: " in text
        assert " ".join(bm.SCORE_DEFINITIONS[kind].split()) in text
    assert "--hd95_directed" in text


# --- bad input -----------------------------------------------------------------------------------------------------
def test_bad_input_exits_2_with_one_line_naming_the_flag(tmp_path, capsys):
    cases = [
        (
            ["--workspace", str(tmp_path)],
            "none of brats18_1, brats18_4, brats18_4_dp, brats18_4_dpsgd has a best model",
        ),
        (["--workspace", str(tmp_path), "--job_names", "brats18_9"], "--job_names brats18_9: no best model"),
        (["--checkpoint", str(tmp_path / "none.pt")], "--checkpoint"),
    ]
    for argv, expected in cases:
        assert ev.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert expected in err and len(err.splitlines()) == 1, err


def test_gpu_flag_selects_that_cuda_device_and_defaults_to_gpu_0_or_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ev.select_device(None) == torch.device("cpu")
    with pytest.raises(ev.EvaluationInputError, match="--gpu 0: torch sees no CUDA device"):
        ev.select_device(0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert ev.select_device(None) == torch.device("cuda")
    assert ev.select_device(1) == torch.device("cuda:1")
    with pytest.raises(ev.EvaluationInputError, match="--gpu 2: torch sees 2 CUDA device"):
        ev.select_device(2)


def test_bad_data_flags_exit_2(tiny_federation, tmp_path, capsys):
    dataset_dir, datalist_dir = tiny_federation
    torch.save(BratsSegResNet(init_filters=8).state_dict(), tmp_path / "m.pt")
    base = ["--checkpoint", str(tmp_path / "m.pt"), "--output_dir", str(tmp_path)]
    data = ["--dataset_base_dir", str(dataset_dir), "--datalist_json_path", str(datalist_dir)]
    cases = [
        ([], "pass --dataset_base_dir"),  # a bare checkpoint has no job config to take the data from
        (["--dataset_base_dir", str(tmp_path / "absent")], "--dataset_base_dir"),
        (["--dataset_base_dir", str(dataset_dir), "--datalist_json_path", str(tmp_path / "absent.json")], "not found"),
        (["--dataset_base_dir", str(tmp_path), "--datalist_json_path", str(datalist_dir)], "missing under"),
        (data + ["--infer_roi_size", "30", "32", "24"], "--infer_roi_size"),
    ]
    for extra, expected in cases:
        assert ev.main(base + extra) == 2
        err = capsys.readouterr().err.strip()
        assert expected in err and len(err.splitlines()) == 1, err
    twice = ["--checkpoint", str(tmp_path / "m.pt"), f"m={tmp_path / 'm.pt'}", "--output_dir", str(tmp_path), *data]
    for argv, expected in [(twice, "appear twice")]:
        assert ev.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert expected in err and len(err.splitlines()) == 1, err


# --- the tiny real job ---------------------------------------------------------------------------------------------
@pytest.mark.e2e
def test_job_settings_give_the_sites_data_and_window(tiny_job, tiny_federation):
    dataset_dir, datalist_dir = tiny_federation
    settings = ev.job_settings(tiny_job.best_model)
    assert Path(settings["dataset_base_dir"]) == dataset_dir.resolve()
    assert Path(settings["datalist_json_path"]) == datalist_dir.resolve()
    assert settings["infer_roi_size"] == (32, 32, 24)


def metric_distance(a: dict[str, float], b: dict[str, float]) -> float:
    """Largest difference over the Dice metrics both dicts hold."""
    keys = [k for k in ("val_dice", "val_dice_tc", "val_dice_wt", "val_dice_et") if k in a and k in b]
    return max(abs(a[k] - b[k]) for k in keys)


def test_saved_best_model_reproduces_the_logged_best_val_dice(tiny_job):
    """The correctness check of the issue: NVFlare's best_FL_global_model.pt is the model whose val_dice was best.

    Clients validate the global model they receive at round r, so round r's metric belongs to the model made by
    the aggregation of round r-1; the checkpoint records that aggregation round in meta_props.
    """
    torch.set_num_threads(1)
    rounds = read_round_metrics(tiny_job.round_metrics)
    best = best_round_of(rounds)
    logged = {r.round: r.metrics for r in rounds}
    spec = ev.ModelSpec(tiny_job.job_name, tiny_job.best_model, job_paths=tiny_job)
    ev.resolve_data(spec, None, None, None)
    model = ev.load_model(spec.model_path, torch.device("cpu"))
    result = ev.evaluate_model(model, spec, torch.device("cpu"), log=lambda *_: None)
    recomputed = result.training_rule_metrics()

    # the round's val_dice is one full validation of that model (at the validating site, from the disk cache)
    for key in ("val_dice", "val_dice_tc", "val_dice_wt", "val_dice_et"):
        assert recomputed[key] == pytest.approx(logged[best][key], abs=1e-6), key
    # both rules score the same channels: they agree wherever the truth has the region
    for case in result.cases:
        for i, region in enumerate(bp.REGIONS):
            if not np.isnan(case.training_rule_dice[i]):
                assert case.scores[f"dice_{region}"] == pytest.approx(case.training_rule_dice[i], abs=1e-9)
    # an off-by-one (the model of another round saved as best) would match that round's values instead; the four
    # metrics together tell the rounds' models apart even when two rounds happen to share a similar val_dice
    for r, metrics in logged.items():
        if r != best:
            assert metric_distance(recomputed, metrics) > TOLERANCE, f"round {r} is indistinguishable"
    checkpoint = torch.load(tiny_job.best_model, map_location="cpu", weights_only=True)
    assert checkpoint["meta_props"]["current_round"] == best - 1

    # the same figure through the pipeline's own evaluate_dice (what the clients ran)
    datalist = bp.read_datalist(spec.datalist_path)
    entries = bp.resolve_entries(datalist["validation"], spec.dataset_base_dir)
    et_label = bp.datalist_et_label(datalist)
    dataset = bp.make_dataset(entries, bp.validation_steps(et_label), et_label=et_label)
    loader = bp.make_loader(dataset, shuffle=False)
    assert bp.evaluate_dice(model, loader, torch.device("cpu"), spec.infer_roi_size)["val_dice"] == pytest.approx(
        recomputed["val_dice"], abs=1e-9
    )
    # the last global model (one aggregation later) is a different model: the check above can fail
    final = ev.load_model(tiny_job.server_job_dir / "app_server" / "FL_global_model.pt", torch.device("cpu"))
    final_dice = ev.evaluate_model(final, spec, torch.device("cpu"), log=lambda *_: None).training_rule_metrics()
    assert metric_distance(final_dice, recomputed) > TOLERANCE


@pytest.mark.e2e
def test_script_writes_consistent_csv_summary_and_label_maps(tiny_job, tiny_federation, tmp_path):
    dataset_dir, _ = tiny_federation
    out = tmp_path / "eval"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "result_stat.evaluate",
            "--workspace",
            str(tiny_job.workspace_root),
            "--job_names",
            tiny_job.job_name,
            "--output_dir",
            str(out),
            "--save_predictions",
            "--score_label_maps",
        ],
        capture_output=True,
        text=True,
        cwd=REPO_DIR,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},  # the CPU, as the sites' final evaluation ran
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with open(out / "per_case.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["case_id"] for r in rows] == ["Brats18_SYN_008_1", "Brats18_SYN_009_1"]
    assert list(rows[0]) == list(ev.CSV_COLUMNS)
    for row in rows:
        regions = [float(row[f"dice_{r}"]) for r in ("tc", "wt", "et")]
        assert float(row["dice_overall"]) == pytest.approx(np.mean(regions), abs=1e-6)
        # with --score_label_maps, the written label map holds exactly the prediction that was scored
        case_dir = next(dataset_dir.glob(f"training/*/{row['case_id']}"))
        truth = bp.labels_to_regions(np.asarray(nib.load(case_dir / f"{row['case_id']}_seg.nii.gz").dataobj))
        predicted_file = out / "predictions" / tiny_job.job_name / f"{row['case_id']}.nii.gz"
        assert set(np.unique(np.asarray(nib.load(predicted_file).dataobj))) <= {0, 1, 2, 4}
        predicted = bp.labels_to_regions(np.asarray(nib.load(predicted_file).dataobj))
        for i, region in enumerate(bp.REGIONS):
            assert int(predicted[i].sum()) == int(row[f"voxels_pred_{region}"])
            # every score of the file, recomputed from the files on disk (the BraTS evaluator's view)
            expected = bm.single_region_scores(predicted[i], truth[i], (1.0, 1.0, 1.0))
            for kind in bm.SCORE_KINDS + bm.LESION_COUNT_KINDS:
                assert float(row[f"{kind}_{region}"]) == pytest.approx(expected[kind], abs=1e-3), (kind, region)
    summary = (out / "summary.md").read_text()
    header = "| " + " | ".join(ev.SUMMARY_COLUMNS) + " |"
    assert header in summary and header in done.stdout
    table_row = next(line for line in summary.splitlines() if line.startswith(f"| {tiny_job.job_name} | "))
    cells = [c.strip() for c in table_row.strip("|").split("|")]
    for cell, key in zip(cells[1:], ("dice_overall", "dice_tc", "dice_wt", "dice_et"), strict=True):
        assert float(cell) == pytest.approx(np.mean([float(r[key]) for r in rows]), abs=0.006)
    # the second table: one row per region, the means of the per-case values
    kinds = ev.detail_kinds(hd95_directed=False)
    assert "| Configuration | Region | " + " | ".join(ev.DETAIL_HEADINGS[k] for k in kinds) + " |" in done.stdout
    for region in bp.REGIONS:
        line = next(x for x in summary.splitlines() if x.startswith(f"| {tiny_job.job_name} | {region.upper()} | "))
        cells = [c.strip() for c in line.strip("|").split("|")][2:]
        for cell, kind in zip(cells, kinds, strict=True):
            mean = np.mean([float(r[f"{kind}_{region}"]) for r in rows])
            assert float(cell) == pytest.approx(mean, abs=0.006), (kind, region)
    rounds = read_round_metrics(tiny_job.round_metrics)
    best = best_round_of(rounds)
    logged_best = next(r.metrics["val_dice"] for r in rounds if r.round == best)
    check_row = next(line for line in summary.splitlines()[::-1] if line.startswith(f"| {tiny_job.job_name} | "))
    assert f"| {best} | {logged_best:.4f} |" in check_row


@pytest.mark.e2e
def test_shell_script_evaluates_the_jobs_that_ran_and_skips_the_others(tiny_job, tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}  # the CPU, as the sites ran
    done = subprocess.run(
        [
            "bash",
            str(REPO_DIR / "result_stat" / "testing_models_3d.sh"),
            "--workspace",
            str(tiny_job.workspace_root),
            "--output_dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "skipping brats18_1: not run" in done.stdout
    assert "skipping brats18_4_dp: not run" in done.stdout
    assert "skipping brats18_4_dpsgd: not run" in done.stdout
    assert f"| {tiny_job.job_name} | " in done.stdout
    # job.py's final evaluation at the sites scored the same best model on the same cases: the same numbers
    with open(tmp_path / "per_case.csv") as f:
        here = {r["case_id"]: r for r in csv.DictReader(f)}
    with open(tiny_job.final_evaluation_csv) as f:
        at_sites = {r["case_id"]: r for r in csv.DictReader(f)}
    assert sorted(here) == sorted(at_sites) == ["Brats18_SYN_008_1", "Brats18_SYN_009_1"]
    for case, row in at_sites.items():
        for region in bp.REGIONS:
            assert float(row[f"dice_{region}"]) == pytest.approx(float(here[case][f"dice_{region}"]), abs=1e-4)
            assert float(row[f"hd95_{region}"]) == pytest.approx(float(here[case][f"hd95_{region}"]), abs=1e-4)


def test_shell_script_without_any_job_exits_2(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", str(REPO_DIR / "result_stat" / "testing_models_3d.sh"), "--workspace", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 2
    assert "run job.py first" in done.stderr
