"""Curves (TensorBoard smoothing, global-model series) and the case picture, on hand-made inputs and on the
outputs of a tiny real simulator run."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import nibabel as nib
import numpy as np
import pytest

matplotlib.use("Agg")

from tiny_job import tiny_job_paths  # noqa: E402

from brats_fl.job_results import JobPaths, read_round_metrics  # noqa: E402
from result_stat import plot_case as pc  # noqa: E402
from result_stat import plot_tensorboard_events as pt  # noqa: E402


@pytest.fixture(scope="module")
def tiny_job(tmp_path_factory, tiny_federation):
    return tiny_job_paths(tmp_path_factory, *tiny_federation)


# --- TensorBoard smoothing -----------------------------------------------------------------------------------------
def test_smoothing_matches_the_debiased_ema_formula_by_hand():
    # w = 0.5: ema 0.5, 0.25, 0.625; debias 1-0.5, 1-0.25, 1-0.125
    assert pt.tensorboard_smooth([1.0, 0.0, 1.0], 0.5) == pytest.approx([1.0, 0.25 / 0.75, 0.625 / 0.875])


def test_smoothing_with_default_weight_follows_the_recursion():
    values = [0.1, 0.4, 0.35, 0.6, 0.55, 0.7]
    w, last, expected = 0.8, 0.0, []
    for n, v in enumerate(values, start=1):
        last = w * last + (1 - w) * v
        expected.append(last / (1 - w**n))
    assert pt.tensorboard_smooth(values, 0.8) == pytest.approx(expected)
    assert pt.tensorboard_smooth(values, 0.8)[0] == pytest.approx(values[0])  # debiasing: starts at the data


def test_zero_weight_is_the_raw_series_and_constant_series_are_unchanged():
    assert pt.tensorboard_smooth([0.3, 0.1, 0.9], 0.0) == pytest.approx([0.3, 0.1, 0.9])
    assert pt.tensorboard_smooth([0.42] * 5, 0.8) == [0.42] * 5


def test_non_finite_values_pass_through_and_do_not_count():
    smoothed = pt.tensorboard_smooth([1.0, math.nan, 0.0], 0.5)
    assert smoothed[0] == 1.0 and math.isnan(smoothed[1]) and smoothed[2] == pytest.approx(0.25 / 0.75)


def test_smoothing_weight_outside_range_is_refused():
    with pytest.raises(ValueError):
        pt.tensorboard_smooth([1.0], 1.0)


# --- global-model curves -------------------------------------------------------------------------------------------
def test_global_curve_is_the_mean_over_sites_at_rounds_all_sites_logged():
    rounds, values = pt.global_model_curve({"site-1": [(0, 0.2), (1, 0.4), (2, 0.5)], "site-2": [(0, 0.4), (1, 0.6)]})
    assert rounds == [0, 1]
    assert values == pytest.approx([0.3, 0.5])


def write_events(tb_dir: Path, series: dict[str, list[float]]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tb_dir))
    for tag, values in series.items():
        for step, value in enumerate(values):
            writer.add_scalar(tag, value, global_step=step)
    writer.close()


def test_cli_plots_every_job_from_event_files_and_skips_missing_ones(tmp_path, capsys):
    ws = tmp_path / "ws"
    curves = {"brats18_1": [0.1, 0.3, 0.5, 0.6], "brats18_4": [0.05, 0.2, 0.4, 0.45]}
    for job, values in curves.items():
        for site in ("site-1", "site-2"):
            write_events(JobPaths(ws, job).tb_events / site, {"val_dice": values})
    out = tmp_path / "figs"
    argv = ["--workspace", str(ws), "--output_dir", str(out), "--tags", "val_dice", "--prefix", "t_", "--note", "n"]
    assert pt.main(argv) == 0
    printed = capsys.readouterr().out
    assert "skipping brats18_4_dp: no TensorBoard events" in printed
    assert "val_dice Central (brats18_1): 4 rounds, last 0.6000" in printed
    assert (out / "t_val_dice.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<svg" in (out / "t_val_dice.svg").read_text()

    # the lines drawn are the data and its TensorBoard smoothing
    fig = pt.plot_tag({"Central (brats18_1)": ([0, 1, 2, 3], curves["brats18_1"])}, "val_dice", 0.8)
    lines = {line.get_gid(): line for line in fig.axes[0].get_lines()}
    np.testing.assert_allclose(lines["raw:Central (brats18_1)"].get_ydata(), curves["brats18_1"])
    np.testing.assert_allclose(
        lines["smoothed:Central (brats18_1)"].get_ydata(), pt.tensorboard_smooth(curves["brats18_1"], 0.8)
    )


def test_cli_bad_input_exits_2(tmp_path, capsys):
    assert pt.main(["--workspace", str(tmp_path / "absent")]) == 2
    assert "--workspace" in capsys.readouterr().err
    assert pt.main(["--workspace", str(tmp_path)]) == 2
    assert "has TensorBoard events" in capsys.readouterr().err
    assert pt.main(["--workspace", str(tmp_path), "--smoothing", "1.5"]) == 2
    assert "--smoothing" in capsys.readouterr().err


@pytest.mark.e2e
def test_curves_of_a_real_job_match_the_server_round_metrics(tiny_job, tmp_path):
    curves = pt.job_curves(tiny_job, ["val_dice", "val_dice_tc", "val_dice_wt", "val_dice_et"])
    server = {r.round: r.metrics for r in read_round_metrics(tiny_job.round_metrics)}
    for tag, (rounds, values) in curves.items():
        assert rounds == sorted(server)
        assert values == pytest.approx([server[r][tag] for r in rounds], abs=1e-6)
    assert pt.main(["--workspace", str(tiny_job.workspace_root), "--output_dir", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{tag}.{ext}" for tag in pt.TAG_TITLES for ext in ("png", "svg")
    )


# --- case picture --------------------------------------------------------------------------------------------------
def test_largest_slices_pick_the_slice_with_most_tumour():
    mask = np.zeros((10, 12, 14), dtype=bool)
    mask[2:8, 3:9, 4] = True  # a big square in axial slice 4
    mask[4, 5, 9] = True  # a single voxel higher up
    assert pc.largest_slices(mask) == {"sagittal": 4, "coronal": 5, "axial": 4}
    assert pc.largest_slices(np.zeros((10, 12, 14), dtype=bool)) == {"sagittal": 5, "coronal": 6, "axial": 7}
    core = np.zeros((10, 12, 14), dtype=bool)
    core[4, 5, 9] = True
    assert pc.largest_slices(mask, core)["axial"] == 4  # 36 + 0 > 1 + 1
    big_core = np.zeros((10, 12, 14), dtype=bool)
    big_core[1:9, 1:9, 9] = True
    assert pc.largest_slices(mask, big_core)["axial"] == 9  # counted together: 1 + 64 > 36


def test_cut_places_a_voxel_where_imshow_origin_lower_expects_it():
    volume = np.zeros((10, 12, 14))
    volume[2, 7, 11] = 1.0  # x (right), y (anterior), z (superior)
    assert np.argwhere(pc.cut(volume, "axial", 11)).tolist() == [[7, 2]]  # row = y, column = x
    assert np.argwhere(pc.cut(volume, "coronal", 7)).tolist() == [[11, 2]]  # row = z, column = x
    assert np.argwhere(pc.cut(volume, "sagittal", 2)).tolist() == [[11, 7]]  # row = z, column = y
    assert pc.view_aspect((1.0, 2.0, 3.0), "coronal") == pytest.approx(3.0)
    assert pc.view_aspect((1.0, 2.0, 3.0), "axial") == pytest.approx(2.0)


def test_lps_file_is_shown_in_ras_orientation():
    data = np.zeros((4, 5, 6), dtype=np.int16)
    data[0, 0, 0] = 7  # first voxel of an LPS file: the patient's right-most, anterior-most, inferior-most corner
    ras, spacing = pc.to_ras(nib.Nifti1Image(data, np.diag([-1.0, -1.0, 2.0, 1.0])))
    assert np.argwhere(ras == 7).tolist() == [[3, 4, 0]]  # in RAS, right and anterior are the high indices
    assert spacing == (1.0, 1.0, 2.0)


def contour_vertices(ax, gid: str) -> np.ndarray:
    sets = [c for c in ax.collections if c.get_gid() == gid]
    assert len(sets) == 1, gid
    return np.concatenate([p.vertices for p in sets[0].get_paths()])


def toy_case(shift: int = 0):
    shape = (24, 24, 16)
    wt = np.zeros(shape, dtype=bool)
    wt[6:18, 5:17, 4:12] = True
    tc = np.zeros(shape, dtype=bool)
    tc[9:15, 8:14, 6:10] = True
    et = tc.copy()
    et[11:13, 10:12, 7:9] = False  # necrosis inside the enhancing shell
    truth = {"tc": tc, "wt": wt, "et": et}
    prediction = {k: np.roll(v, shift, axis=0) for k, v in truth.items()}
    rng = np.random.default_rng(0)
    images = {"flair": rng.uniform(0, 100, shape), "t1ce": rng.uniform(0, 100, shape)}
    return images, truth, prediction


def test_case_picture_outlines_truth_and_prediction_in_every_view():
    images, truth, prediction = toy_case()
    fig, slices = pc.draw_case(images, truth, prediction, (1.0, 1.0, 1.0), "perfect")
    assert slices == {"sagittal": 9, "coronal": 8, "axial": 6}  # first slices through the full core (no necrosis)
    assert len(fig.axes) == 6
    for ax in fig.axes:
        for region in ("tc", "wt", "et"):
            # a perfect prediction is outlined exactly on the ground truth
            np.testing.assert_array_equal(
                contour_vertices(ax, f"prediction:{region}"), contour_vertices(ax, f"truth:{region}")
            )
        colours = {c.get_gid(): matplotlib.colors.to_hex(c.get_edgecolor()[0]) for c in ax.collections if c.get_gid()}
        assert colours["truth:wt"] != colours["truth:tc"] != colours["truth:et"] != colours["truth:wt"]


def test_case_picture_of_a_shifted_prediction_outlines_it_elsewhere():
    images, truth, prediction = toy_case(shift=3)
    fig, _ = pc.draw_case(images, truth, prediction, (1.0, 1.0, 1.0))
    axial = fig.axes[0]  # FLAIR, axial: x is the column, so the contour moves by 3 columns
    shifted = np.unique(contour_vertices(axial, "prediction:wt") - [3.0, 0.0], axis=0)
    original = np.unique(contour_vertices(axial, "truth:wt"), axis=0)
    np.testing.assert_allclose(shifted, original)
    assert not np.array_equal(contour_vertices(axial, "prediction:wt"), contour_vertices(axial, "truth:wt"))


@pytest.mark.e2e
def test_case_picture_of_a_real_job(tiny_job, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)  # the CPU, as before --gpu replaced --device
    out = tmp_path / "case_Brats18_SYN_008_1.png"
    argv = [
        "--workspace",
        str(tiny_job.workspace_root),
        "--job_name",
        tiny_job.job_name,
        "--output_dir",
        str(tmp_path),
    ]
    assert pc.main(argv) == 0
    assert "Brats18_SYN_008_1" in capsys.readouterr().out  # the first validation case by default
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size < 300_000


def test_case_picture_bad_input_exits_2(tmp_path, capsys):
    assert pc.main(["--job_name", "a", "--checkpoint", "b"]) == 2
    assert "exactly one" in capsys.readouterr().err
    assert pc.main(["--workspace", str(tmp_path), "--job_name", "brats18_4"]) == 2
    assert "no model at" in capsys.readouterr().err
    (tmp_path / "p.nii.gz").write_bytes(b"")
    assert pc.main(["--prediction", str(tmp_path / "p.nii.gz")]) == 2
    assert "--dataset_base_dir" in capsys.readouterr().err
