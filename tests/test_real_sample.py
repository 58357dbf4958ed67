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


def test_a_real_case_through_the_cache_is_the_same_case_at_a_third_of_the_size(brats_sample, tmp_path):
    from brats_fl.cache import CaseCache

    entry = sample_entries(brats_sample)[0]
    uncached = bp.make_dataset([entry], bp.validation_steps())[0]
    cache = CaseCache(tmp_path)
    bp.make_dataset([entry], bp.validation_steps(), cache)[0]  # fills the cache
    cached = bp.make_dataset([entry], bp.validation_steps(), cache)[0]  # reads it (another dataset, as a new round)
    assert (cache.misses, cache.hits) == (1, 1)
    for key in ("image", "label"):
        assert torch.equal(cached[key], uncached[key])  # the model sees the same numbers
    size = cache.entries()[0].stat().st_size
    assert 70e6 < size < 85e6  # int16 image + uint8 label map: not the 143 MB of float32


def test_predictions_from_cached_cases_land_on_the_original_grid(brats_sample, tmp_path):
    import nibabel as nib
    import numpy as np

    from brats_fl.cache import CaseCache
    from result_stat import evaluate as ev

    entry = sample_entries(brats_sample)[0]
    cache = CaseCache(tmp_path / "cache")
    bp.make_dataset([entry], bp.validation_steps(), cache)[0]
    dataset = bp.make_dataset([entry], bp.validation_steps(), cache)  # a fresh process would see the same
    item = dataset[0]
    ev.save_label_map(item["label"], item["label"], dataset.preprocess, entry["label"], 4, tmp_path / "pred.nii.gz")
    written, original = nib.load(tmp_path / "pred.nii.gz"), nib.load(entry["label"])
    np.testing.assert_array_equal(np.asarray(written.dataobj), np.asarray(original.dataobj))
    np.testing.assert_array_equal(written.affine, original.affine)
