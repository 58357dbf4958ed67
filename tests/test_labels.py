"""Label conversion: BraTS labels {0,1,2,4} (or {0,1,2,3} from 2023 on) -> TC, WT, ET channels and back."""

import numpy as np
import pytest
import torch

import brats_fl.pipeline as bp


def hand_made_labels(et: int) -> np.ndarray:
    """1 x 2 x 2 x 2 label map holding each label once or twice."""
    return np.array([[[0, 1], [2, et]], [[et, 2], [1, 0]]], dtype=np.uint8)[None]


def test_regions_follow_brats_definitions():
    regions = bp.labels_to_regions(hand_made_labels(4))
    label = hand_made_labels(4)[0]
    np.testing.assert_array_equal(regions[0], np.isin(label, [1, 4]))  # TC
    np.testing.assert_array_equal(regions[1], np.isin(label, [1, 2, 4]))  # WT
    np.testing.assert_array_equal(regions[2], label == 4)  # ET
    assert regions.shape == (3, 2, 2, 2) and regions.dtype == np.float32


def test_known_counts():
    regions = bp.labels_to_regions(hand_made_labels(4))
    assert regions.reshape(3, -1).sum(axis=1).tolist() == [4, 6, 2]  # TC: 1,1,4,4; WT: all non-zero; ET: 4,4


def test_tensor_input_gives_same_answer():
    as_tensor = bp.labels_to_regions(torch.from_numpy(hand_made_labels(4)))
    np.testing.assert_array_equal(as_tensor.numpy(), bp.labels_to_regions(hand_made_labels(4)))


def test_brats2023_convention_uses_label_3_for_enhancing():
    regions = bp.labels_to_regions(hand_made_labels(3), et_label=3)
    np.testing.assert_array_equal(regions, bp.labels_to_regions(hand_made_labels(4), et_label=4))


def test_label_3_in_a_2018_case_is_an_error_not_silently_dropped():
    with pytest.raises(ValueError, match=r"label values \[3\]"):
        bp.labels_to_regions(hand_made_labels(3), et_label=4)


def test_unknown_convention_rejected():
    with pytest.raises(ValueError, match="et_label"):
        bp.region_label_sets(5)


def test_round_trip_labels_regions_labels():
    label = hand_made_labels(4)[0]
    np.testing.assert_array_equal(bp.regions_to_labels(bp.labels_to_regions(label)), label)


def test_regions_to_labels_enforces_nesting():
    # ET predicted where WT is not: ET wins, as in the BraTS label hierarchy.
    regions = np.zeros((3, 1, 1, 2))
    regions[2, 0, 0, 0] = 1  # ET only
    regions[1, 0, 0, 1] = 1  # WT only -> edema
    assert bp.regions_to_labels(regions).ravel().tolist() == [4, 2]
