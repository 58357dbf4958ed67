"""Tiny hand-made BraTS cases on disk, in any release's naming, with labels whose region volumes are known exactly."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from dataset_brats18.layouts import BRATS2023_NAMING, LABEL_PART, LEGACY_NAMING, Naming

SHAPE = (8, 8, 8)
# Each label fills one 2x2x2 block (8 voxels): TC = necrosis + ET = 16, WT = 24, ET = 8 voxels.
BLOCKS = {
    "et": (slice(1, 3), slice(1, 3), slice(1, 3)),
    1: (slice(3, 5), slice(1, 3), slice(1, 3)),
    2: (slice(5, 7), slice(1, 3), slice(1, 3)),
}
KNOWN_VOXELS = {"tc": 16, "wt": 24, "et": 8}
PARTS = ("t1ce", "t1", "t2", "flair", LABEL_PART)


def known_label(et_label: int, shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    label = np.zeros(shape, dtype=np.uint8)
    for value, block in BLOCKS.items():
        label[block] = et_label if value == "et" else value
    return label


def known_image(part_index: int, shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    """Non-zero int16 image, different per modality (so channel order can be checked)."""
    return np.full(shape, 100 * (part_index + 1), dtype=np.int16)


def file_name(case_id: str, part: str, naming: Naming, ext: str = ".nii.gz") -> str:
    return f"{case_id}{naming.separator}{naming.suffixes[part]}{ext}"


def write_case(
    folder: Path,
    case_id: str,
    naming: Naming = LEGACY_NAMING,
    ext: str = ".nii.gz",
    skip: tuple[str, ...] = (),
    arrays: dict[str, np.ndarray] | None = None,
    affines: dict[str, np.ndarray] | None = None,
    spacing: float = 1.0,
) -> dict[str, Path]:
    """Write one case's five files (minus `skip`); `arrays` / `affines` replace single parts. Returns part -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays, affines = arrays or {}, affines or {}
    default_affine = np.diag([spacing, spacing, spacing, 1.0])
    written = {}
    for i, part in enumerate(PARTS):
        if part in skip:
            continue
        data = arrays.get(part, known_label(naming.et_label) if part == LABEL_PART else known_image(i))
        path = folder / file_name(case_id, part, naming, ext)
        nib.save(nib.Nifti1Image(data, affines.get(part, default_affine)), path)
        written[part] = path
    return written


def touch_case(
    folder: Path, case_id: str, naming: Naming = LEGACY_NAMING, ext: str = ".nii.gz", skip: tuple[str, ...] = ()
) -> None:
    """Empty files with the right names: enough for the builder, which never opens a file."""
    folder.mkdir(parents=True, exist_ok=True)
    for part in PARTS:
        if part not in skip:
            (folder / file_name(case_id, part, naming, ext)).touch()


__all__ = ["BRATS2023_NAMING", "LEGACY_NAMING", "KNOWN_VOXELS", "SHAPE", "known_label", "write_case", "touch_case"]
