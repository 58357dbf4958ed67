"""Dice and HD95 with the BraTS conventions, on hand-made masks whose answers are known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from brats_fl import metrics as bm


def box(shape, lo, hi) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return mask


def plate(shape, axis: int, position: int) -> np.ndarray:
    """A one-voxel-thick square plate perpendicular to axis, away from the array border."""
    lo, hi = [2, 2, 2], [n - 2 for n in shape]
    lo[axis], hi[axis] = position, position + 1
    return box(shape, lo, hi)


# --- Dice --------------------------------------------------------------------------------------------------------
def test_dice_of_identical_masks_is_one():
    truth = box((10, 10, 10), (2, 3, 4), (7, 8, 9))
    assert bm.dice_brats(truth, truth.copy()) == 1.0


def test_dice_of_known_overlap():
    truth = box((10, 10, 10), (0, 0, 0), (4, 2, 2))  # 16 voxels
    pred = box((10, 10, 10), (2, 0, 0), (6, 2, 2))  # 16 voxels, 8 shared
    assert bm.dice_brats(pred, truth) == pytest.approx(2 * 8 / 32)


def test_dice_both_empty_is_one_and_one_empty_is_zero():
    empty, some = np.zeros((5, 5, 5)), box((5, 5, 5), (1, 1, 1), (3, 3, 3))
    assert bm.dice_brats(empty, empty) == 1.0
    assert bm.dice_brats(some, empty) == 0.0
    assert bm.dice_brats(empty, some) == 0.0


def test_dice_accepts_float_probabilities_thresholded_at_half():
    truth = np.array([[[1.0, 1.0, 0.0, 0.0]]])
    pred = np.array([[[0.9, 0.4, 0.6, 0.0]]])  # binary: 1 0 1 0
    assert bm.dice_brats(pred, truth) == pytest.approx(2 * 1 / 4)


# --- HD95 --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("shift", [1, 3])
def test_hd95_of_a_shifted_plate_equals_the_shift_in_mm(axis, shift):
    spacing = (1.0, 2.0, 2.5)
    shape = (20, 20, 20)
    truth, pred = plate(shape, axis, 5), plate(shape, axis, 5 + shift)
    # every surface voxel of one plate lies exactly `shift` voxels from the other plate, along `axis`
    assert bm.hausdorff_percentile(pred, truth, spacing) == pytest.approx(shift * spacing[axis])


def test_hd95_honours_anisotropic_spacing_along_the_shift_axis_only():
    truth, pred = plate((16, 16, 16), 2, 4), plate((16, 16, 16), 2, 6)
    assert bm.hausdorff_percentile(pred, truth, (1.0, 1.0, 1.0)) == pytest.approx(2.0)
    assert bm.hausdorff_percentile(pred, truth, (1.0, 1.0, 3.0)) == pytest.approx(6.0)
    assert bm.hausdorff_percentile(pred, truth, (7.0, 7.0, 1.0)) == pytest.approx(2.0)


def test_full_hausdorff_of_a_shifted_cube_is_the_shift():
    # for a solid cube the lateral faces overlap (distance 0), so only the 100th percentile is exactly the shift
    truth = box((20, 20, 20), (4, 4, 4), (12, 12, 12))
    pred = box((20, 20, 20), (7, 4, 4), (15, 12, 12))
    assert bm.hausdorff_percentile(pred, truth, (1.5, 1.0, 1.0), percentile=100) == pytest.approx(3 * 1.5)
    hd95 = bm.hausdorff_percentile(pred, truth, (1.5, 1.0, 1.0))
    assert 0.0 < hd95 <= 3 * 1.5


def test_hd95_is_symmetric_max_of_directed_percentiles():
    # a single voxel inside a big cube's surface: from the voxel the nearest cube surface voxel is 2 voxels away;
    # from the cube surface the voxel is up to sqrt(3*4^2) away
    big = box((11, 11, 11), (1, 1, 1), (10, 10, 10))  # surface at 1 and 9
    dot = box((11, 11, 11), (3, 5, 5), (4, 6, 6))
    directed_big = np.percentile(bm.surface_distances(big, dot, (1, 1, 1)), 95)
    assert bm.surface_distances(dot, big, (1, 1, 1)).tolist() == [2.0]
    assert bm.hausdorff_percentile(dot, big, (1, 1, 1)) == pytest.approx(max(2.0, directed_big))
    assert bm.hausdorff_percentile(big, dot, (1, 1, 1)) == bm.hausdorff_percentile(dot, big, (1, 1, 1))


def test_hd95_of_identical_masks_is_zero():
    truth = box((12, 12, 12), (2, 3, 4), (9, 8, 11))
    assert bm.hausdorff_percentile(truth, truth.copy(), (1.0, 1.0, 1.0)) == 0.0


def test_mask_touching_the_array_border_has_its_border_voxels_as_surface():
    full = np.ones((6, 6, 6), dtype=bool)
    assert bm.surface(full).sum() == 6**3 - 4**3


def test_hd95_empty_conventions():
    shape, spacing = (240, 240, 155), (1.0, 1.0, 1.0)
    empty, some = np.zeros(shape, dtype=bool), box(shape, (100, 100, 70), (110, 110, 80))
    assert bm.hausdorff_percentile(empty, empty, spacing) == 0.0
    assert bm.hausdorff_percentile(some, empty, spacing) == pytest.approx(373.13, abs=0.005)  # BraTS diagonal
    assert bm.hausdorff_percentile(empty, some, spacing) == pytest.approx(373.13, abs=0.005)
    assert bm.hausdorff_percentile(empty, some, spacing, empty_value=374.0) == 374.0


def test_max_distance_is_the_diagonal_in_mm():
    assert bm.max_distance_mm((3, 4, 12), (1.0, 1.0, 1.0)) == pytest.approx(13.0)
    assert bm.max_distance_mm((3, 4, 12), (2.0, 2.0, 2.0)) == pytest.approx(26.0)


def test_shape_and_spacing_mismatches_raise():
    with pytest.raises(ValueError, match="shape"):
        bm.dice_brats(np.zeros((3, 3, 3)), np.zeros((3, 3, 4)))
    with pytest.raises(ValueError, match="spacing"):
        bm.hausdorff_percentile(np.ones((3, 3, 3)), np.ones((3, 3, 3)), (1.0, 1.0))


# --- all regions of a case ---------------------------------------------------------------------------------------
def test_region_scores_of_a_perfect_prediction_with_absent_et():
    tc = box((16, 16, 16), (5, 5, 5), (9, 9, 9))
    wt = box((16, 16, 16), (3, 3, 3), (12, 12, 12))
    truth = np.stack([tc, wt, np.zeros_like(tc)])  # an LGG-like case: no enhancing tumour
    scores = bm.region_scores(truth, truth.copy(), (1.0, 1.0, 1.0))
    assert scores == {
        "dice_tc": 1.0,
        "hd95_tc": 0.0,
        "dice_wt": 1.0,
        "hd95_wt": 0.0,
        "dice_et": 1.0,
        "hd95_et": 0.0,
        "dice_overall": 1.0,
    }


def test_region_scores_penalise_a_false_positive_et_and_average_regions():
    tc = box((16, 16, 16), (5, 5, 5), (9, 9, 9))
    wt = box((16, 16, 16), (3, 3, 3), (12, 12, 12))
    truth = np.stack([tc, wt, np.zeros_like(tc)])
    pred = np.stack([tc, wt, box((16, 16, 16), (6, 6, 6), (7, 7, 7))])  # one spurious ET voxel
    scores = bm.region_scores(pred, truth, (1.0, 1.0, 1.0))
    assert scores["dice_et"] == 0.0
    assert scores["hd95_et"] == pytest.approx(math.sqrt(3 * 16**2))
    assert scores["dice_overall"] == pytest.approx(2 / 3)
