"""Dice per region and its nan-aware aggregation over cases, on inputs whose answer is known."""

import math

import numpy as np
import pytest

import brats_fl.pipeline as bp


def masks(*channels):
    return np.stack([np.asarray(c, dtype=np.float32) for c in channels])


def test_perfect_prediction_scores_one():
    truth = masks([1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0])
    np.testing.assert_allclose(bp.dice_per_region(truth, truth), [1.0, 1.0, 1.0])


def test_half_overlap():
    truth = masks([1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0])
    pred = masks([1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 1, 1])
    # TC: 2*1/(1+2); WT: 2*2/(4+2); ET: 0
    np.testing.assert_allclose(bp.dice_per_region(pred, truth), [2 / 3, 2 / 3, 0.0])


def test_empty_truth_gives_nan_whatever_the_prediction():
    truth = masks([1, 0], [1, 0], [0, 0])
    for et_prediction in ([0, 0], [1, 1]):
        assert math.isnan(bp.dice_per_region(masks([1, 0], [1, 0], et_prediction), truth)[2])


def test_aggregate_ignores_cases_without_the_region():
    per_case = [[1.0, 0.5, 0.2], [0.0, 0.5, math.nan]]
    m = bp.aggregate_dice(per_case)
    assert m["val_dice_tc"] == pytest.approx(0.5)
    assert m["val_dice_wt"] == pytest.approx(0.5)
    assert m["val_dice_et"] == pytest.approx(0.2)  # not (0.2 + 0) / 2 nor (0.2 + 1) / 2
    assert m["val_dice"] == pytest.approx((0.5 + 0.5 + 0.2) / 3)


def test_region_absent_everywhere_is_left_out_of_overall():
    m = bp.aggregate_dice([[0.6, 0.9, math.nan], [0.4, 0.7, math.nan]])
    assert math.isnan(m["val_dice_et"])
    assert m["val_dice"] == pytest.approx((0.5 + 0.8) / 2)
