"""The BraTS metrics on hand-made masks whose answers are worked out by hand (brats_fl/metrics.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.spatial import cKDTree

from brats_fl import metrics as bm

UNIT = (1.0, 1.0, 1.0)


def box(shape, lo, hi) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return mask


def plate(shape, axis: int, position: int) -> np.ndarray:
    """A one-voxel-thick square plate perpendicular to axis, away from the array border."""
    lo, hi = [2, 2, 2], [n - 2 for n in shape]
    lo[axis], hi[axis] = position, position + 1
    return box(shape, lo, hi)


def rod(shape, start: int, stop: int) -> np.ndarray:
    """A one-voxel-thin rod along axis 0 from start to stop (exclusive): every voxel is surface, so surface distances
    are distances along the rod."""
    return box(shape, (start, 2, 2), (stop, 3, 3))


def brute_force_pooled_hd95(prediction: np.ndarray, truth: np.ndarray, spacing) -> float:
    """Reference HD95 from first principles: face-connected surfaces on the whole array, nearest surface voxel by a
    KD-tree, both directions pooled (medpy's hd95)."""

    def surface_points(mask):
        edge = mask & ~ndimage.binary_erosion(mask, border_value=0)
        return np.argwhere(edge) * np.asarray(spacing)

    p, t = surface_points(prediction), surface_points(truth)
    pooled = np.concatenate([cKDTree(t).query(p)[0], cKDTree(p).query(t)[0]])
    return float(np.percentile(pooled, 95))


def monai_directed_hd95(prediction: np.ndarray, truth: np.ndarray, spacing) -> float:
    """MONAI's compute_hausdorff_distance at the 95th percentile: the directed-max definition."""
    from monai.metrics import compute_hausdorff_distance

    as_batch = lambda m: torch.as_tensor(m)[None, None]
    value = compute_hausdorff_distance(
        as_batch(prediction), as_batch(truth), include_background=True, percentile=95, spacing=spacing
    )
    return float(value)


# --- Dice ----------------------------------------------------------------------------------------------------------
def test_dice_of_identical_masks_is_one():
    truth = box((10, 10, 10), (2, 3, 4), (7, 8, 9))
    assert bm.dice_brats(truth, truth.copy()) == 1.0


def test_dice_of_known_overlap():
    truth = box((10, 10, 10), (0, 0, 0), (4, 2, 2))  # 16 voxels
    pred = box((10, 10, 10), (2, 0, 0), (6, 2, 2))  # 16 voxels, 8 shared
    assert bm.dice_brats(pred, truth) == pytest.approx(2 * 8 / 32)


def test_dice_both_empty_is_one_and_one_empty_is_zero():
    empty, some = np.zeros((5, 5, 5)), box((5, 5, 5), (1, 1, 1), (3, 3, 3))
    assert bm.dice_brats(empty, empty) == bm.DICE_BOTH_EMPTY == 1.0
    assert bm.dice_brats(some, empty) == bm.DICE_ONE_EMPTY == 0.0
    assert bm.dice_brats(empty, some) == 0.0


def test_dice_accepts_float_probabilities_thresholded_at_half():
    truth = np.array([[[1.0, 1.0, 0.0, 0.0]]])
    pred = np.array([[[0.9, 0.4, 0.6, 0.0]]])  # binary: 1 0 1 0
    assert bm.dice_brats(pred, truth) == pytest.approx(2 * 1 / 4)


# --- sensitivity and specificity -----------------------------------------------------------------------------------
def test_sensitivity_and_specificity_of_a_known_overlap():
    truth = box((10, 10, 10), (0, 0, 0), (4, 2, 2))  # 16 voxels
    pred = box((10, 10, 10), (2, 0, 0), (6, 2, 2))  # 16 voxels, 8 shared: TP 8, FN 8, FP 8, TN 1000 - 24
    assert bm.sensitivity_specificity(pred, truth) == pytest.approx((8 / 16, 976 / 984))


def test_sensitivity_and_specificity_empty_rules():
    empty, some = np.zeros((10, 10, 10), dtype=bool), box((10, 10, 10), (1, 1, 1), (3, 3, 3))  # 8 voxels
    assert bm.sensitivity_specificity(empty, empty) == (1.0, 1.0)
    assert bm.sensitivity_specificity(some, empty) == pytest.approx((bm.SENSITIVITY_TRUTH_EMPTY, 992 / 1000))
    assert bm.sensitivity_specificity(empty, some) == (0.0, 1.0)
    full = np.ones((4, 4, 4), dtype=bool)
    assert bm.sensitivity_specificity(full, full) == (1.0, bm.SPECIFICITY_NO_BACKGROUND)


# --- HD95: the official (pooled) and the directed-max definitions -----------------------------------------------------
def test_the_two_hd95_definitions_differ_on_a_plate_with_a_stray_voxel():
    # truth: a 3 x 3 plate (9 voxels, all surface); prediction: the same plate and one voxel 10 mm above its centre.
    # prediction -> truth: nine 0s and one 10; truth -> prediction: nine 0s.
    # pooled: 19 values, 18 zeros then 10; rank 0.95 * 18 = 17.1 -> 0 + 0.1 * 10 = 1.0
    # directed-max: prediction -> truth, 10 values; rank 0.95 * 9 = 8.55 -> 0 + 0.55 * 10 = 5.5; the other: 0
    truth = box((12, 12, 16), (4, 4, 2), (7, 7, 3))
    pred = truth.copy()
    pred[5, 5, 12] = True
    assert bm.hausdorff_percentile(pred, truth, UNIT) == pytest.approx(1.0)
    assert bm.hausdorff_percentile(pred, truth, UNIT, directed_max=True) == pytest.approx(5.5)
    assert bm.hausdorff_percentiles(pred, truth, UNIT) == pytest.approx((1.0, 5.5))


def test_the_two_hd95_definitions_differ_on_a_rod_bridging_a_gap():
    # truth: rods at 2..61 and 72..131 (120 voxels); prediction: one rod 2..131 (130 voxels) bridging the gap.
    # prediction -> truth: 120 zeros and, for the gap 62..71, 1 2 3 4 5 5 4 3 2 1; truth -> prediction: 120 zeros.
    # pooled: 250 values, 240 zeros; rank 0.95 * 249 = 236.55 falls among the zeros -> 0
    # directed-max: 130 values, sorted 120 zeros, 1 1 2 2 ...; rank 0.95 * 129 = 122.55 -> between 2 and 2 -> 2
    shape = (140, 5, 5)
    truth = rod(shape, 2, 62) | rod(shape, 72, 132)
    pred = rod(shape, 2, 132)
    assert bm.hausdorff_percentiles(pred, truth, UNIT) == pytest.approx((0.0, 2.0))


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("shift", [1, 3])
def test_hd95_of_a_shifted_plate_equals_the_shift_in_mm(axis, shift):
    spacing = (1.0, 2.0, 2.5)
    shape = (20, 20, 20)
    truth, pred = plate(shape, axis, 5), plate(shape, axis, 5 + shift)
    # every surface voxel of one plate lies exactly `shift` voxels from the other plate, along `axis`: both
    # definitions agree
    expected = shift * spacing[axis]
    assert bm.hausdorff_percentiles(pred, truth, spacing) == pytest.approx((expected, expected))


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
    pooled, directed = bm.hausdorff_percentiles(pred, truth, (1.5, 1.0, 1.0))
    assert 0.0 < pooled <= directed <= 3 * 1.5


def test_pooled_hd95_never_exceeds_directed_and_both_match_independent_implementations():
    rng = np.random.default_rng(11)
    spacing = (1.0, 1.5, 2.0)
    for _ in range(5):
        truth = ndimage.binary_dilation(rng.random((24, 20, 16)) > 0.995, iterations=2)
        pred = ndimage.binary_dilation(rng.random((24, 20, 16)) > 0.995, iterations=2)
        pooled, directed = bm.hausdorff_percentiles(pred, truth, spacing)
        assert pooled <= directed + 1e-9
        assert pooled == pytest.approx(brute_force_pooled_hd95(pred, truth, spacing), rel=1e-6)
        assert directed == pytest.approx(monai_directed_hd95(pred, truth, spacing), rel=1e-6)


def test_pooled_hd95_equals_panoptica_when_it_is_installed():
    """panoptica (the official package's engine) is not a dependency; where it is importable, its HD95 must agree."""
    hausdorff = pytest.importorskip("panoptica.metrics.hausdorff_distance")
    rng = np.random.default_rng(5)
    truth = ndimage.binary_dilation(rng.random((24, 20, 16)) > 0.995, iterations=2)
    pred = ndimage.binary_dilation(rng.random((24, 20, 16)) > 0.995, iterations=2)
    expected = hausdorff._compute_hausdorff_distance95(truth, pred, voxelspacing=(1.0, 1.5, 2.0))
    assert bm.hausdorff_percentile(pred, truth, (1.0, 1.5, 2.0)) == pytest.approx(expected, rel=1e-6)


def test_hd95_of_identical_masks_is_zero():
    truth = box((12, 12, 12), (2, 3, 4), (9, 8, 11))
    assert bm.hausdorff_percentiles(truth, truth.copy(), UNIT) == (0.0, 0.0)


def test_mask_touching_the_array_border_has_its_border_voxels_as_surface():
    full = np.ones((6, 6, 6), dtype=bool)
    forward, backward = bm.surface_distance_pair(full, full, UNIT)
    assert len(forward) == len(backward) == 6**3 - 4**3
    assert not forward.any()


def test_hd95_empty_conventions():
    shape, spacing = (240, 240, 155), UNIT
    empty, some = np.zeros(shape, dtype=bool), box(shape, (100, 100, 70), (110, 110, 80))
    assert bm.hausdorff_percentiles(empty, empty, spacing) == (0.0, 0.0)
    assert bm.hausdorff_percentile(some, empty, spacing) == pytest.approx(bm.BRATS_IMAGE_DIAGONAL_MM, abs=0.005)
    assert bm.hausdorff_percentile(empty, some, spacing, directed_max=True) == pytest.approx(373.13, abs=0.005)
    assert bm.hausdorff_percentile(empty, some, spacing, empty_value=374.0) == 374.0


def test_max_distance_is_the_diagonal_in_mm():
    assert bm.max_distance_mm((3, 4, 12), (1.0, 1.0, 1.0)) == pytest.approx(13.0)
    assert bm.max_distance_mm((3, 4, 12), (2.0, 2.0, 2.0)) == pytest.approx(26.0)
    assert bm.max_distance_mm((240, 240, 155), UNIT) == pytest.approx(bm.BRATS_IMAGE_DIAGONAL_MM, abs=0.005)


def test_shape_and_spacing_mismatches_raise():
    with pytest.raises(ValueError, match="shape"):
        bm.dice_brats(np.zeros((3, 3, 3)), np.zeros((3, 3, 4)))
    with pytest.raises(ValueError, match="spacing"):
        bm.hausdorff_percentile(np.ones((3, 3, 3)), np.ones((3, 3, 3)), (1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        bm.lesion_wise_scores(np.ones((3, 3, 3)), np.ones((3, 3, 3)), (1.0, 1.0))


# --- lesion-wise (BraTS 2023+) ---------------------------------------------------------------------------------------
LESION_SHAPE = (40, 12, 12)
DIAGONAL = bm.max_distance_mm(LESION_SHAPE, UNIT)


def cube_at(x: int, size: int = 4) -> np.ndarray:
    """A size^3 cube starting at x along axis 0 (64 voxels = 64 mm^3 for size 4: above the 50 mm^3 threshold)."""
    return box(LESION_SHAPE, (x, 4, 4), (x + size, 4 + size, 4 + size))


def test_a_missed_lesion_scores_zero_and_the_image_diagonal():
    first, second = cube_at(2), cube_at(16)  # 10 voxels apart: two lesions
    scores = bm.lesion_wise_scores(first, first | second, UNIT)
    # found lesion: Dice 1, HD95 0; missed lesion: Dice 0, HD95 = diagonal; mean over the two lesions
    assert scores == bm.LesionWiseScores(
        dice=0.5, hd95=pytest.approx(DIAGONAL / 2), detected=1, missed=1, false_positives=0
    )
    assert bm.dice_brats(first, first | second) == pytest.approx(2 * 64 / 192)  # the whole-region Dice hides it less


def test_a_false_positive_lesion_scores_zero_and_the_image_diagonal_whatever_its_size():
    truth = cube_at(2)
    speck = box(LESION_SHAPE, (30, 6, 6), (31, 7, 7))  # one voxel, 24 voxels from the lesion
    scores = bm.lesion_wise_scores(truth | speck, truth, UNIT)
    assert (scores.dice, scores.hd95) == (0.5, pytest.approx(DIAGONAL / 2))
    assert (scores.detected, scores.missed, scores.false_positives) == (1, 0, 1)
    assert bm.dice_brats(truth | speck, truth) == pytest.approx(128 / 129)  # the whole-region Dice barely notices


def test_a_component_within_the_dilation_of_a_lesion_is_part_of_its_match_not_a_false_positive():
    truth = cube_at(2)  # x 2..5
    near = box(LESION_SHAPE, (8, 5, 5), (9, 6, 6))  # one voxel 3 voxels past the lesion: inside 3 dilations
    scores = bm.lesion_wise_scores(truth | near, truth, UNIT)
    assert scores.false_positives == 0 and scores.detected == 1
    assert scores.dice == pytest.approx(2 * 64 / (65 + 64))  # the lesion's Dice counts the near voxel
    farther = box(LESION_SHAPE, (9, 5, 5), (10, 6, 6))  # 4 voxels past: outside, a false positive
    assert bm.lesion_wise_scores(truth | farther, truth, UNIT).false_positives == 1


def test_two_lesions_merged_in_the_prediction_are_each_scored_against_the_whole_component():
    # rods of 60 voxels (60 mm^3) at 2..61 and 72..131, predicted as one rod 2..131 (130 voxels)
    shape = (140, 5, 5)
    first, second, pred = rod(shape, 2, 62), rod(shape, 72, 132), rod(shape, 2, 132)
    scores = bm.lesion_wise_scores(pred, first | second, UNIT)
    # each lesion: Dice 2 * 60 / (130 + 60); HD95: prediction -> lesion 60 zeros and 1..70, lesion -> prediction
    # 60 zeros; pooled 190 values, 120 zeros; rank 0.95 * 189 = 179.55 -> between 60 and 61 -> 60.55 mm
    assert (scores.detected, scores.missed, scores.false_positives) == (2, 0, 0)
    assert scores.dice == pytest.approx(120 / 190)
    assert scores.hd95 == pytest.approx(60.55)
    # the whole region hardly shows the merge: Dice 240 / 250 and HD95 0 (see the rod test above)
    assert bm.dice_brats(pred, first | second) == pytest.approx(0.96)


def test_truth_lesions_closer_than_their_dilations_are_one_lesion():
    # 3 dilations grow each lesion by 3 voxels along an axis: a gap of 6 voxels closes, a gap of 7 does not
    assert bm.truth_lesions(cube_at(2) | cube_at(12))[1] == 1  # gap 6
    assert bm.truth_lesions(cube_at(2) | cube_at(13))[1] == 2  # gap 7
    first, second = cube_at(2), cube_at(10)  # gap 4: one lesion of 128 voxels, half of it predicted
    scores = bm.lesion_wise_scores(first, first | second, UNIT)
    assert (scores.dice, scores.detected, scores.missed) == (pytest.approx(2 * 64 / 192), 1, 0)


def test_truth_lesions_at_most_50_mm3_are_left_out_but_do_not_make_false_positives():
    big, small = cube_at(2), cube_at(20, size=3)  # 27 voxels = 27 mm^3
    assert bm.lesion_wise_scores(big, big | small, UNIT) == bm.LesionWiseScores(1.0, 0.0, 1, 0, 0)
    assert bm.lesion_wise_scores(big | small, big | small, UNIT) == bm.LesionWiseScores(1.0, 0.0, 1, 0, 0)
    # the threshold is a volume in mm^3: the same 27 voxels at 2 mm spacing are 216 mm^3 and count
    spacing = (2.0, 2.0, 2.0)
    scores = bm.lesion_wise_scores(big, big | small, spacing)
    assert (scores.dice, scores.missed) == (0.5, 1)
    assert scores.hd95 == pytest.approx(bm.max_distance_mm(LESION_SHAPE, spacing) / 2)
    # only tiny truth lesions and nothing predicted: nothing to score, as the challenge code does
    assert bm.lesion_wise_scores(np.zeros_like(small), small, UNIT) == bm.LesionWiseScores(1.0, 0.0, 0, 0, 0)


def test_lesion_wise_empty_rules():
    empty, lesion = np.zeros(LESION_SHAPE, dtype=bool), cube_at(2)
    assert bm.lesion_wise_scores(empty, empty, UNIT) == bm.LesionWiseScores(1.0, 0.0, 0, 0, 0)
    assert bm.lesion_wise_scores(lesion, empty, UNIT) == bm.LesionWiseScores(0.0, pytest.approx(DIAGONAL), 0, 0, 1)
    assert bm.lesion_wise_scores(empty, lesion, UNIT) == bm.LesionWiseScores(0.0, pytest.approx(DIAGONAL), 0, 1, 0)


def test_lesion_components_are_26_connected():
    truth = cube_at(2)
    diagonal_pair = np.zeros(LESION_SHAPE, dtype=bool)
    diagonal_pair[20, 5, 5] = diagonal_pair[21, 6, 6] = True  # touching at a corner only: one component
    assert bm.lesion_wise_scores(truth | diagonal_pair, truth, UNIT).false_positives == 1


# --- all regions of a case -----------------------------------------------------------------------------------------
def test_region_scores_of_a_perfect_prediction_with_absent_et():
    tc = box((16, 16, 16), (5, 5, 5), (9, 9, 9))
    wt = box((16, 16, 16), (3, 3, 3), (12, 12, 12))
    truth = np.stack([tc, wt, np.zeros_like(tc)])  # an LGG-like case: no enhancing tumour
    scores = bm.region_scores(truth, truth.copy(), UNIT)
    perfect = {"dice": 1.0, "hd95": 0.0, "hd95_directed": 0.0, "lesion_dice": 1.0, "lesion_hd95": 0.0}
    perfect |= {"sensitivity": 1.0, "specificity": 1.0}
    for region, lesions in (("tc", 1.0), ("wt", 1.0), ("et", 0.0)):
        assert {k: scores[f"{k}_{region}"] for k in bm.SCORE_KINDS} == perfect
        assert [scores[f"{k}_{region}"] for k in bm.LESION_COUNT_KINDS] == [lesions, 0.0, 0.0]
    assert scores["dice_overall"] == 1.0
    expected_keys = {f"{k}_{r}" for k in bm.SCORE_KINDS + bm.LESION_COUNT_KINDS for r in ("tc", "wt", "et")}
    assert set(scores) == expected_keys | {"dice_overall"}


def test_region_scores_penalise_a_false_positive_et_and_average_regions():
    tc = box((16, 16, 16), (5, 5, 5), (9, 9, 9))
    wt = box((16, 16, 16), (3, 3, 3), (12, 12, 12))
    truth = np.stack([tc, wt, np.zeros_like(tc)])
    pred = np.stack([tc, wt, box((16, 16, 16), (6, 6, 6), (7, 7, 7))])  # one spurious ET voxel
    scores = bm.region_scores(pred, truth, UNIT)
    diagonal = math.sqrt(3 * 16**2)
    assert scores["dice_et"] == 0.0
    assert scores["hd95_et"] == scores["hd95_directed_et"] == pytest.approx(diagonal)
    assert (scores["lesion_dice_et"], scores["lesion_hd95_et"]) == (0.0, pytest.approx(diagonal))
    assert (scores["sensitivity_et"], scores["specificity_et"]) == (0.0, pytest.approx(1 - 1 / 16**3))
    assert scores["lesion_fp_et"] == 1.0
    assert scores["dice_overall"] == pytest.approx(2 / 3)


def test_score_kinds_have_one_line_definitions():
    assert set(bm.SCORE_DEFINITIONS) == set(bm.SCORE_KINDS)
    assert all("\n" not in text and text for text in bm.SCORE_DEFINITIONS.values())
