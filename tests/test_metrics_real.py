"""brats_fl.metrics on real BraTS 2018 label maps (../shared/brats18_sample; skipped where it is absent): a label map
scored against itself, and against a copy shifted by a known number of voxels."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from test_brats_metrics import brute_force_pooled_hd95, monai_directed_hd95

import brats_fl.pipeline as bp
from brats_fl import metrics as bm

# an HGG case with several TC and ET lesions and the LGG case whose ET has 7 lesions, 3 of them above 50 mm^3
CASES = ("HGG/Brats18_TCIA01_378_1", "LGG/Brats18_TCIA10_628_1")
SHIFT = 2  # voxels, along axis 1


def regions_of(sample_dir, case: str, et_label: int = 4) -> tuple[np.ndarray, tuple[float, float, float]]:
    """(TC/WT/ET channels, voxel spacing in mm) of a case's ground truth."""
    image = nib.load(sample_dir / "training" / case / f"{case.split('/')[1]}_seg.nii.gz")
    label = np.asarray(image.dataobj)
    if et_label == 3:
        label = np.where(label == 4, 3, label)
    spacing = tuple(float(z) for z in image.header.get_zooms()[:3])
    return bp.labels_to_regions(label, et_label) > 0.5, spacing


def shifted(regions: np.ndarray, voxels: int) -> np.ndarray:
    """The regions moved by voxels along axis 1 (the first spatial axis but one), without wrapping round."""
    moved = np.zeros_like(regions)
    moved[:, :, voxels:] = regions[:, :, :-voxels]
    return moved


@pytest.mark.parametrize("case", CASES)
def test_a_real_label_map_scored_against_itself_is_perfect(brats_sample, case):
    truth, spacing = regions_of(brats_sample, case)
    scores = bm.region_scores(truth.copy(), truth, spacing, bp.REGIONS)
    perfect = {"dice": 1.0, "hd95": 0.0, "hd95_directed": 0.0, "lesion_dice": 1.0, "lesion_hd95": 0.0}
    perfect |= {"sensitivity": 1.0, "specificity": 1.0}
    for region in bp.REGIONS:
        assert {k: scores[f"{k}_{region}"] for k in bm.SCORE_KINDS} == perfect, region
        assert (
            scores[f"lesion_tp_{region}"] >= 1 and scores[f"lesion_fn_{region}"] == scores[f"lesion_fp_{region}"] == 0
        )
    assert scores["dice_overall"] == 1.0
    if case.endswith("TCIA10_628_1"):
        assert scores["lesion_tp_et"] == 3  # several lesions, each matched with itself


def test_brats_2023_labels_score_the_same_as_2018_labels(brats_sample):
    truth_2018, spacing = regions_of(brats_sample, CASES[0])
    truth_2023, _ = regions_of(brats_sample, CASES[0], et_label=3)
    np.testing.assert_array_equal(truth_2018, truth_2023)
    pred = shifted(truth_2023, SHIFT)
    assert bm.region_scores(pred, truth_2023, spacing) == bm.region_scores(
        shifted(truth_2018, SHIFT), truth_2018, spacing
    )


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("spacing_along_shift", [1.0, 2.0])
def test_a_real_label_map_against_a_shifted_copy(brats_sample, case, spacing_along_shift):
    truth, _ = regions_of(brats_sample, case)
    spacing = (1.0, spacing_along_shift, 1.0)  # the second value pretends anisotropic voxels along the shift
    pred = shifted(truth, SHIFT)
    shift_mm = SHIFT * spacing_along_shift
    scores = bm.region_scores(pred, truth, spacing, bp.REGIONS)
    for i, region in enumerate(bp.REGIONS):
        # every surface voxel is at most the shift from the other surface, and the foremost one exactly the shift:
        # the full Hausdorff distance is the shift, HD95 at most that
        assert bm.hausdorff_percentile(pred[i], truth[i], spacing, percentile=100) == pytest.approx(shift_mm)
        hd95, directed = scores[f"hd95_{region}"], scores[f"hd95_directed_{region}"]
        assert 0.0 < hd95 <= directed <= shift_mm + 1e-6, region
        assert hd95 == pytest.approx(brute_force_pooled_hd95(pred[i], truth[i], spacing), rel=1e-6)
        assert directed == pytest.approx(monai_directed_hd95(pred[i], truth[i], spacing), rel=1e-6)
        overlap = np.logical_and(pred[i], truth[i]).sum()
        assert scores[f"dice_{region}"] == pytest.approx(2 * overlap / (pred[i].sum() + truth[i].sum()))
        assert scores[f"sensitivity_{region}"] == pytest.approx(overlap / truth[i].sum())
        # a shift of 2 voxels stays inside the 3-fold dilation: every lesion is found, no false positive
        assert scores[f"lesion_fn_{region}"] == scores[f"lesion_fp_{region}"] == 0
        if scores[f"lesion_tp_{region}"] == 1 and bm.truth_lesions(truth[i])[1] == 1:
            # one lesion: the lesion-wise scores are the region's
            assert scores[f"lesion_dice_{region}"] == pytest.approx(scores[f"dice_{region}"])
            assert scores[f"lesion_hd95_{region}"] == pytest.approx(hd95)
