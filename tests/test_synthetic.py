"""The synthetic BraTS-like generator: official layout, nested labels, determinism."""

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy.ndimage import binary_dilation

from dataset_brats18.datalist import load_datalist, site_datalist_names
from dataset_brats18.synthetic import generate_dataset, write_federated_datalists

SHAPE = (24, 24, 16)


def dataset_fingerprint(out_dir) -> str:
    """SHA-256 over every NIfTI file's voxels, in sorted order."""
    digest = hashlib.sha256()
    for path in sorted(Path(out_dir).rglob("*.nii.gz")):
        digest.update(path.relative_to(out_dir).as_posix().encode())
        digest.update(np.asarray(nib.load(path).dataobj).tobytes())
    return digest.hexdigest()


def test_official_layout_and_dtypes(tmp_path):
    cases = generate_dataset(tmp_path, 4, SHAPE)
    assert [c.grade for c in cases] == ["HGG", "HGG", "HGG", "LGG"]
    for case in cases:
        for suffix in ("t1", "t1ce", "t2", "flair", "seg"):
            img = nib.load(tmp_path / "training" / case.grade / case.case_id / f"{case.case_id}_{suffix}.nii.gz")
            assert img.shape == SHAPE
            assert img.get_data_dtype() == (np.uint8 if suffix == "seg" else np.int16)
            assert np.allclose(np.abs(np.diag(img.affine)[:3]), 1.0)  # 1 mm voxels


def test_labels_are_nested_like_gliomas(tmp_path):
    cases = generate_dataset(tmp_path, 4, SHAPE)
    for case in cases:
        label = np.asarray(nib.load(case.folder / f"{case.case_id}_seg.nii.gz").dataobj)
        values = set(np.unique(label).tolist())
        if case.grade == "HGG":
            assert values == {0, 1, 2, 4}
        else:
            assert values == {0, 1, 2}  # low grade: no enhancing tumour
        # edema surrounds the core: the core grown by one voxel stays inside the whole tumour
        core = np.isin(label, [1, 4])
        assert core.sum() < (label > 0).sum()
        assert np.all(label[binary_dilation(core)] > 0)


def test_modalities_have_their_own_contrast(tmp_path):
    case = generate_dataset(tmp_path, 1, SHAPE)[0]
    label = np.asarray(nib.load(case.folder / f"{case.case_id}_seg.nii.gz").dataobj)
    t1ce = np.asarray(nib.load(case.folder / f"{case.case_id}_t1ce.nii.gz").dataobj).astype(float)
    t2 = np.asarray(nib.load(case.folder / f"{case.case_id}_t2.nii.gz").dataobj).astype(float)
    assert t1ce[label == 4].mean() > 1.5 * t1ce[label == 2].mean()  # enhancing rim bright on T1ce
    assert t2[label == 2].mean() > 1.5 * t2[(label == 0) & (t2 > 0)].mean()  # edema bright on T2


def test_same_seed_same_voxels_other_seed_differs(tmp_path):
    generate_dataset(tmp_path / "a", 3, SHAPE, seed=5)
    generate_dataset(tmp_path / "b", 3, SHAPE, seed=5)
    generate_dataset(tmp_path / "c", 3, SHAPE, seed=6)
    assert dataset_fingerprint(tmp_path / "a") == dataset_fingerprint(tmp_path / "b")
    assert dataset_fingerprint(tmp_path / "a") != dataset_fingerprint(tmp_path / "c")


def test_existing_dataset_with_same_settings_is_reused(tmp_path):
    generate_dataset(tmp_path, 2, SHAPE)
    seg = next(tmp_path.rglob("*_seg.nii.gz"))
    before = seg.stat().st_mtime_ns
    generate_dataset(tmp_path, 2, SHAPE)
    assert seg.stat().st_mtime_ns == before
    assert json.loads((tmp_path / "synthetic_manifest.json").read_text())["settings"]["n_cases"] == 2


def test_federated_datalists_partition_training_and_share_validation(tmp_path):
    cases = generate_dataset(tmp_path, 9, SHAPE)
    datalist_dir = write_federated_datalists(cases, tmp_path / "dl", n_sites=3, n_validation=2)
    sites = [load_datalist(datalist_dir / f"{n}.json") for n in site_datalist_names(3)]
    everything = load_datalist(datalist_dir / "site-All.json")
    train_sets = [{e["label"] for e in s["training"]} for s in sites]
    assert [len(t) for t in train_sets] == [3, 2, 2]
    assert set.union(*train_sets) == {e["label"] for e in everything["training"]}
    assert sum(len(t) for t in train_sets) == 7  # disjoint
    assert all(s["validation"] == everything["validation"] for s in sites)
    assert not {e["label"] for e in everything["validation"]} & set.union(*train_sets)
