"""The pipeline on real BraTS 2018 cases (../shared/brats18_sample; skipped where it is absent)."""

import pytest
import torch

import brats_fl.pipeline as bp
from dataset_brats18.datalist import brats18_case_entry


def sample_entries(sample_dir):
    return [
        bp.resolve_entries([brats18_case_entry(case.name, grade.name)], sample_dir)[0]
        for grade in sorted((sample_dir / "training").iterdir())
        for case in sorted(grade.iterdir())
    ]


def test_real_cases_load_as_4_channels_and_nested_regions(brats_sample):
    entries = sample_entries(brats_sample)
    assert len(entries) == 8
    transform = bp.val_transforms()
    for entry in entries[:3] + entries[-1:]:  # HGG and LGG cases; every case would take ~2 s each
        out = transform(entry)
        image, regions = out["image"], out["label"].bool()
        assert tuple(image.shape) == (4, 240, 240, 155)
        assert tuple(regions.shape) == (3, 240, 240, 155)
        tc, wt, et = regions
        assert wt.sum() > 0
        assert torch.all(wt | ~tc), "TC must lie inside WT"
        assert torch.all(tc | ~et), "ET must lie inside TC"
        assert tc.sum() < wt.sum()


def test_real_case_modalities_in_t1ce_t1_t2_flair_order(brats_sample):
    entry = sample_entries(brats_sample)[0]
    assert [p.rsplit("_", 1)[1] for p in entry["image"]] == ["t1ce.nii.gz", "t1.nii.gz", "t2.nii.gz", "flair.nii.gz"]
    image = bp.val_transforms()(entry)["image"]
    brain = image[0] != 0
    # after per-channel normalisation every modality has mean 0 over its non-zero voxels
    for channel in image:
        assert float(channel[channel != 0].mean()) == pytest.approx(0.0, abs=1e-3)
    assert brain.sum() > 1e6  # a real brain: over a million voxels
