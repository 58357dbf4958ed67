"""The MONAI transforms on hand-made NIfTI volumes whose right answer is known."""

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import Compose

import brats_fl.pipeline as bp

SHAPE = (16, 16, 8)
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


@pytest.fixture
def hand_made_case(tmp_path):
    """Modality i is non-zero only in the x-slab [2i, 2i+2), so each channel can be recognised by its support.

    The label has a single ET voxel at index (0, 0, 0) and one edema voxel at (1, 0, 0).
    """
    rng = np.random.default_rng(0)
    paths = []
    for i, name in enumerate(bp.MODALITIES):
        img = np.zeros(SHAPE, dtype=np.int16)
        img[2 * i : 2 * i + 2] = rng.integers(100, 1000, size=(2, *SHAPE[1:]))
        path = tmp_path / f"case_{name}.nii.gz"
        nib.save(nib.Nifti1Image(img, LPS), path)
        paths.append(str(path))
    label = np.zeros(SHAPE, dtype=np.uint8)
    label[0, 0, 0] = 4
    label[1, 0, 0] = 2
    label_path = tmp_path / "case_seg.nii.gz"
    nib.save(nib.Nifti1Image(label, LPS), label_path)
    return {"image": paths, "label": str(label_path)}


def test_channels_in_t1ce_t1_t2_flair_order_and_ras(hand_made_case):
    out = Compose([bp.preprocessing_transforms(), bp.ConvertToBratsRegionsd(keys="label")])(hand_made_case)
    image, label = out["image"], out["label"]
    assert tuple(image.shape) == (4, *SHAPE) and tuple(label.shape) == (3, *SHAPE)
    for channel in range(4):
        # LPS -> RAS flips x, so slab [2i, 2i+2) lands at [16-2i-2, 16-2i)
        support = torch.nonzero(image[channel].abs().sum(dim=(1, 2))).flatten().tolist()
        assert support == [SHAPE[0] - 2 * channel - 2, SHAPE[0] - 2 * channel - 1]
    # the ET voxel at (0,0,0) in LPS is at (15,15,0) in RAS; the edema voxel at (1,0,0) moves to (14,15,0)
    assert torch.nonzero(label[2]).tolist() == [[15, 15, 0]]
    assert torch.nonzero(label[1]).tolist() == [[14, 15, 0], [15, 15, 0]]


def test_validation_normalises_non_zero_voxels_per_channel_and_keeps_full_size(hand_made_case):
    image = bp.val_transforms()(hand_made_case)["image"]
    assert tuple(image.shape) == (4, *SHAPE)
    for channel in image:
        brain = channel != 0
        assert brain.sum() == 2 * SHAPE[1] * SHAPE[2]  # background stays exactly 0
        assert float(channel[brain].mean()) == pytest.approx(0.0, abs=1e-5)
        assert float(channel[brain].std(unbiased=False)) == pytest.approx(1.0, abs=1e-4)


def test_training_crop_has_roi_size(hand_made_case):
    out = bp.train_transforms([8, 8, 8])(hand_made_case)
    assert tuple(out["image"].shape) == (4, 8, 8, 8) and tuple(out["label"].shape) == (3, 8, 8, 8)


def test_training_pads_volumes_smaller_than_roi(hand_made_case):
    out = bp.train_transforms([24, 16, 8])(hand_made_case)
    assert tuple(out["image"].shape) == (4, 24, 16, 8)
    assert int(out["label"][2].sum()) == 1  # the ET voxel survives padding and flips
