"""A small, deterministic, BraTS-like synthetic dataset, so the project runs without a BraTS registration.

Each case is written as real NIfTI files in the official BraTS 2018 layout
``training/<HGG|LGG>/<id>/<id>_{t1,t1ce,t2,flair,seg}.nii.gz`` with raw-looking int16 intensities, 1 mm voxels and
an LPS affine like the real release. Tumours are nested as in real gliomas: peritumoral edema (label 2) around a
tumour core, whose outer shell enhances (label 4) around necrosis (label 1). Every fourth case is a "LGG" with no
enhancing tumour, so the ET-absent rules of the metrics are exercised. Each modality has its own contrast, so the
regions are separable only by combining modalities, as in real data.

Usage: ``python -m dataset_brats18.synthetic --output_dir /tmp/syn --n_cases 12 --shape 64 64 48``
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

MODALITY_FILE_SUFFIXES = ("t1", "t1ce", "t2", "flair")

# Mean intensity of each tissue (background, brain, edema, necrosis, enhancing) per modality, in made-up scanner
# units. The contrasts mimic real MRI: ET is bright on T1ce, edema bright on T2 and FLAIR, necrosis dark on T1ce.
TISSUE_MEANS = {
    "t1": (0.0, 600.0, 480.0, 380.0, 640.0),
    "t1ce": (0.0, 620.0, 560.0, 330.0, 1250.0),
    "t2": (0.0, 500.0, 1100.0, 1350.0, 880.0),
    "flair": (0.0, 420.0, 1050.0, 620.0, 800.0),
}
NOISE_SD = 35.0


@dataclass(frozen=True)
class ScannerStyle:
    """How one hospital's cases differ from the reference (the defaults reproduce the uniform demo voxel for voxel).

    contrast: per modality (t1, t1ce, t2, flair), how far each tissue's mean lies from normal brain, relative to the
    reference (1: the same; 0.5: half the tissue contrast, e.g. less contrast agent on T1ce). gain: overall intensity
    scale of the scanner. noise_sd: noise in scanner units (after gain). tumour_scale: the tumour's radii relative to
    the reference. n_tumours: separate lesions per case."""

    contrast: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    gain: float = 1.0
    noise_sd: float = NOISE_SD
    tumour_scale: float = 1.0
    n_tumours: int = 1

    def tissue_means(self, modality: str) -> np.ndarray:
        means = np.asarray(TISSUE_MEANS[modality], dtype=np.float32)
        contrast = self.contrast[MODALITY_FILE_SUFFIXES.index(modality)]
        if contrast != 1.0:
            brain = means[1]
            means[1:] = brain + contrast * (means[1:] - brain)
        return means


REFERENCE_STYLE = ScannerStyle()


@dataclass(frozen=True)
class SyntheticCase:
    case_id: str
    grade: str  # "HGG" or "LGG"
    folder: Path


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int, int], coarse: int = 4) -> np.ndarray:
    """Smooth random field in [-1, 1]: random coarse grid, trilinearly upsampled (numpy only, deterministic)."""
    grid = rng.uniform(-1.0, 1.0, size=(coarse, coarse, coarse))
    axes = [np.linspace(0, coarse - 1, n) for n in shape]
    out = grid
    for axis, pos in enumerate(axes):
        lo = np.floor(pos).astype(int).clip(0, coarse - 2)
        frac = pos - lo
        a = np.take(out, lo, axis=axis)
        b = np.take(out, lo + 1, axis=axis)
        view = [1, 1, 1]
        view[axis] = -1
        out = a * (1 - frac.reshape(view)) + b * frac.reshape(view)
    return out


def _ellipsoid_distance(shape: tuple[int, int, int], centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Normalised ellipsoidal distance: < 1 inside the ellipsoid."""
    grids = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    return np.sqrt(sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii)))


def make_case_arrays(
    shape: tuple[int, int, int], rng: np.random.Generator, with_enhancing: bool, style: ScannerStyle = REFERENCE_STYLE
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Return ({modality: int16 image}, uint8 label in {0,1,2,4}) for one synthetic case of a scanner's style."""
    dims = np.asarray(shape, dtype=np.float32)
    brain_dist = _ellipsoid_distance(shape, dims / 2.0, dims * rng.uniform(0.40, 0.46, size=3))
    brain = brain_dist < 1.0

    # Irregular tumour: an ellipsoid whose distance is warped by a smooth field.
    centre = dims / 2.0 + rng.uniform(-0.15, 0.15, size=3) * dims
    wt_radii = dims * rng.uniform(0.18, 0.27, size=3) * style.tumour_scale
    warp = 1.0 + 0.18 * _smooth_field(rng, shape)
    dist = _ellipsoid_distance(shape, centre, wt_radii) * warp
    for _ in range(style.n_tumours - 1):  # further lesions (the reference draws none: its voxels stay the same)
        other_radii = dims * rng.uniform(0.18, 0.27, size=3) * style.tumour_scale
        direction = rng.normal(size=3)
        if np.dot(direction, centre - dims / 2.0) > 0:  # towards the other side of the brain, where there is room
            direction = -direction
        step = 1.1 * (wt_radii.max() + other_radii.max()) / np.linalg.norm(direction)
        other_centre = np.clip(centre + direction * step, 0.2 * dims, 0.8 * dims)
        dist = np.minimum(dist, _ellipsoid_distance(shape, other_centre, other_radii) * warp)
    core_ratio = rng.uniform(0.50, 0.65)
    necrosis_ratio = rng.uniform(0.45, 0.65) * core_ratio

    label = np.zeros(shape, dtype=np.uint8)
    label[dist < 1.0] = 2
    if with_enhancing:
        label[dist < core_ratio] = 4
        label[dist < necrosis_ratio] = 1
    else:
        label[dist < core_ratio] = 1
    label[~brain] = 0

    tissue = np.zeros(shape, dtype=np.int64)  # index into TISSUE_MEANS
    tissue[brain] = 1
    tissue[label == 2] = 2
    tissue[label == 1] = 3
    tissue[label == 4] = 4

    images = {}
    for modality in MODALITY_FILE_SUFFIXES:
        means = style.tissue_means(modality)
        scale = rng.uniform(0.8, 1.2) * style.gain  # scanner gain differs per case and modality
        bias = 1.0 + 0.10 * _smooth_field(rng, shape, coarse=3)
        img = means[tissue] * bias * scale + rng.normal(0.0, style.noise_sd, size=shape).astype(np.float32)
        img[~brain] = 0.0
        images[modality] = np.clip(np.rint(img), 0, np.iinfo(np.int16).max).astype(np.int16)
    return images, label


def lps_affine(shape: tuple[int, int, int]) -> np.ndarray:
    """1 mm LPS affine like the real BraTS 2018 files (x and y axes flipped with respect to RAS)."""
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    affine[:3, 3] = [shape[0] / 2.0, shape[1] / 2.0, -shape[2] / 2.0]
    return affine


def case_id_for(index: int) -> str:
    return f"Brats18_SYN_{index:03d}_1"


def grade_for(index: int) -> str:
    """Every fourth case is a low-grade glioma without enhancing tumour."""
    return "LGG" if index % 4 == 3 else "HGG"


def planned_case(out_dir: Path, index: int) -> SyntheticCase:
    case_id = case_id_for(index)
    return SyntheticCase(case_id, grade_for(index), out_dir / "training" / grade_for(index) / case_id)


def write_case(
    out_dir: Path,
    index: int,
    shape: tuple[int, int, int],
    seed: int,
    style: ScannerStyle = REFERENCE_STYLE,
    case: SyntheticCase | None = None,
) -> SyntheticCase:
    """Generate and write one case; the same (index, shape, seed, style) always gives the same voxels. case: where it
    goes and its id (default: the uniform demo's case of that index)."""
    rng = np.random.default_rng([seed, index])
    case = case or planned_case(out_dir, index)
    images, label = make_case_arrays(shape, rng, with_enhancing=case.grade == "HGG", style=style)
    case_id, folder = case.case_id, case.folder
    folder.mkdir(parents=True, exist_ok=True)
    affine = lps_affine(shape)
    for modality, img in images.items():
        nib.save(nib.Nifti1Image(img, affine), folder / f"{case_id}_{modality}.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), folder / f"{case_id}_seg.nii.gz")
    return case


def generate_dataset(
    out_dir: str | Path, n_cases: int, shape: tuple[int, int, int] = (64, 64, 48), seed: int = 0
) -> list[SyntheticCase]:
    """Write ``n_cases`` cases under ``out_dir`` and a ``synthetic_manifest.json`` describing them.

    If the folder already holds a dataset made with the same parameters (same manifest), it is reused as is.
    """
    out_dir = Path(out_dir)
    settings = {"n_cases": n_cases, "shape": list(shape), "seed": seed, "generator_version": 2}
    manifest_path = out_dir / "synthetic_manifest.json"
    cases = [planned_case(out_dir, i) for i in range(n_cases)]
    if manifest_path.is_file() and json.loads(manifest_path.read_text()).get("settings") == settings:
        if all((c.folder / f"{c.case_id}_seg.nii.gz").is_file() for c in cases):
            return cases
    out_dir.mkdir(parents=True, exist_ok=True)
    cases = [write_case(out_dir, i, shape, seed) for i in range(n_cases)]
    manifest = {"settings": settings, "cases": [{"case_id": c.case_id, "grade": c.grade} for c in cases]}
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return cases


def write_federated_datalists(
    cases: list[SyntheticCase], datalist_dir: str | Path, n_sites: int, n_validation: int
) -> Path:
    """Datalists for a synthetic federation: the last n_validation cases are the shared validation set, the rest
    are dealt round-robin to site-1..site-N; site-All.json holds the union of the sites' training cases."""
    from brats_fl.settings import site_names
    from dataset_brats18.datalist import brats18_case_entry, write_datalist

    if not 1 <= n_validation < len(cases):
        raise ValueError(f"need 1 <= n_validation < {len(cases)} cases, got {n_validation}")
    train_cases, val_cases = cases[:-n_validation], cases[-n_validation:]
    if len(train_cases) < n_sites:
        raise ValueError(f"{len(train_cases)} training cases cannot feed {n_sites} sites")
    validation = [brats18_case_entry(c.case_id, c.grade) for c in val_cases]
    datalist_dir = Path(datalist_dir)
    for i, site in enumerate(site_names(n_sites)):
        training = [brats18_case_entry(c.case_id, c.grade) for c in train_cases[i::n_sites]]
        write_datalist(datalist_dir / f"{site}.json", training, validation)
    write_datalist(
        datalist_dir / "site-All.json", [brats18_case_entry(c.case_id, c.grade) for c in train_cases], validation
    )
    return datalist_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="folder to write the dataset into (created if missing)")
    parser.add_argument("--n_cases", type=int, default=12, help="number of cases (default: 12)")
    parser.add_argument(
        "--shape", type=int, nargs=3, default=[64, 64, 48], help="volume size in voxels (default: 64 64 48)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same voxels (default: 0)")
    parser.add_argument("--n_clients", type=int, default=4, help="sites to write datalists for (default: 4)")
    parser.add_argument("--n_validation", type=int, default=2, help="shared validation cases (default: 2)")
    args = parser.parse_args(argv)
    if args.n_cases < 2 or min(args.shape) < 8:
        parser.error("--n_cases must be >= 2 and every --shape entry >= 8")
    if not 1 <= args.n_validation < args.n_cases or args.n_cases - args.n_validation < args.n_clients:
        parser.error("need 1 <= --n_validation < --n_cases and at least one training case per site")
    cases = generate_dataset(args.output_dir, args.n_cases, tuple(args.shape), args.seed)
    datalist_dir = write_federated_datalists(
        cases, Path(args.output_dir) / "datalist", args.n_clients, args.n_validation
    )
    print(f"wrote {len(cases)} synthetic cases to {Path(args.output_dir).resolve()}, datalists in {datalist_dir}")


if __name__ == "__main__":
    main()
