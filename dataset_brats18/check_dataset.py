"""Open every case a set of datalists lists and report, before hours of training, anything that would break it.

    python -m dataset_brats18.check_dataset --dataset_base_dir /data/brats18 --datalist_json_path /data/brats18/datalist
    python -m dataset_brats18.check_dataset --dataset_base_dir /data/brats18 \\
        --datalist_json_path /data/brats18/datalist/site-1.json /data/brats18/datalist/site-All.json

Per case (each listed case once, however many datalists list it):
- errors (the case is unusable): missing or unreadable files, images that are not 3-D, modalities whose shape or
  affine differ from each other or from the label, label values outside {0, 1, 2, ET} (ET = the datalist's
  et_label: 4 for BraTS 2017-2021, 3 for 2023+), an image whose voxels are all zero, NaN or Inf voxels;
- warnings (usable): voxel spacing other than 1 mm (the pipeline resamples to 1 mm) and label maps without tumour.
Per datalist: training and validation cases and the median [min-max] tumour volume of TC, WT and ET in ml.

Cost: headers are read for every file, label voxels for every case; image voxels are read too (the all-zero and
NaN/Inf checks need them) unless --headers_only, which takes about a fifth of the time (docs/data.md gives the
time per case measured on real BraTS 2018 cases). Exit codes: 0 every case usable; 1 some case unusable; 2 bad flag
or datalist.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from brats_fl.pipeline import ET_LABEL_BRATS2017, REGIONS, region_label_sets
from brats_fl.settings import EXIT_BAD_INPUT, EXIT_FAILED, SHIPPED_DATALIST_DIR
from dataset_brats18.datalist import MODALITY_ORDER, DatalistError, entry_files, load_datalist

AFFINE_TOLERANCE_MM = 1e-3
SPACING_TOLERANCE_MM = 1e-3
PART_NAMES = (*MODALITY_ORDER, "label")


@dataclass
class CaseCheck:
    """Outcome of checking one case; volumes_ml is None when the label could not be read."""

    case: str  # the case folder, relative to the dataset base folder
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    volumes_ml: dict[str, float] | None = None
    seconds: float = 0.0
    opened: bool = False  # at least one file was there to open (the time per case counts only those)

    @property
    def usable(self) -> bool:
        return not self.errors


def case_name(entry: dict) -> str:
    label = entry["label"]
    return label.rsplit("/", 1)[0] if "/" in label else label


# ---------------------------------------------------------------------------------------------------------------
# One case
# ---------------------------------------------------------------------------------------------------------------
def check_case(
    entry: dict, base_dir: str | Path, et_label: int = ET_LABEL_BRATS2017, read_images: bool = True
) -> CaseCheck:
    """Every check of one case (see the module docstring); never raises for a bad file, it reports it."""
    start = time.perf_counter()
    result = CaseCheck(case_name(entry))
    base = Path(base_dir)
    headers = load_headers(entry, base, result)
    if headers:
        compare_geometry(headers, result)
    if "label" in headers:
        check_label(headers["label"], et_label, result)
    if read_images:
        for part in MODALITY_ORDER:
            if part in headers:
                check_image_voxels(part, headers[part], result)
    result.seconds = time.perf_counter() - start
    return result


def load_headers(entry: dict, base: Path, result: CaseCheck) -> dict[str, nib.spatialimages.SpatialImage]:
    """part -> loaded image (header only; voxels stay on disk); missing and unreadable files become errors."""
    loaded = {}
    files = entry_files(entry)
    if not any((base / rel).is_file() for rel in files):
        folder = Path(files[-1]).parent.as_posix()
        state = "exists but holds none of them" if (base / folder).is_dir() else "does not exist"
        result.errors.append(f"missing: none of the 5 files is there (folder {folder} {state})")
        return loaded
    result.opened = True
    for part, rel in zip(PART_NAMES, files):
        path = base / rel
        if not path.is_file():
            result.errors.append(f"missing {part} file {rel}")
            continue
        try:
            img = nib.load(path)
        except Exception as e:  # nibabel raises several types for corrupt or non-NIfTI files
            result.errors.append(f"unreadable {part} file {rel}: {_short(e)}")
            continue
        shape = img.shape
        if len(shape) == 4 and shape[3] == 1:
            shape = shape[:3]
        if len(shape) != 3:
            result.errors.append(f"{part} file {rel} is not a 3-D volume (shape {_fmt_shape(img.shape)})")
            continue
        if 0 in shape:
            result.errors.append(f"{part} file {rel} is empty (shape {_fmt_shape(img.shape)})")
            continue
        loaded[part] = img
    return loaded


def compare_geometry(headers: dict, result: CaseCheck) -> None:
    """Same shape and affine for all files of the case (they are stacked voxel by voxel); spacing 1 mm."""
    shapes = {part: tuple(img.shape[:3]) for part, img in headers.items()}
    if len(set(shapes.values())) > 1:
        described = ", ".join(f"{part} {_fmt_shape(s)}" for part, s in shapes.items())
        result.errors.append(f"shapes differ: {described}")
    parts = list(headers)
    reference = headers[parts[0]].affine
    for part in parts[1:]:
        difference = float(np.max(np.abs(headers[part].affine - reference)))
        if difference > AFFINE_TOLERANCE_MM:
            result.errors.append(
                f"affine of {part} differs from {parts[0]} by up to {difference:.3g} mm (modalities not co-registered)"
            )
    spacings = {part: tuple(float(z) for z in img.header.get_zooms()[:3]) for part, img in headers.items()}
    odd = {part: s for part, s in spacings.items() if any(abs(z - 1.0) > SPACING_TOLERANCE_MM for z in s)}
    if odd:
        described = ", ".join(f"{part} {'x'.join(f'{z:g}' for z in s)}" for part, s in odd.items())
        result.warnings.append(f"voxel spacing is not 1 mm ({described} mm); the pipeline resamples to 1 mm")


def check_label(img, et_label: int, result: CaseCheck) -> None:
    """Label values must be {0, 1, 2, et_label}; also measures the TC/WT/ET volumes."""
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as e:
        result.errors.append(f"cannot read the label voxels: {_short(e)}")
        return
    counts = value_counts(data)
    allowed = {0, *region_label_sets(et_label)["wt"]}
    unexpected = sorted(v for v in counts if v not in allowed)
    if unexpected:
        hint = ""
        if et_label == 4 and 3 in unexpected:
            hint = " (label 3 is BraTS 2023+'s enhancing tumour: a 2023 label map, or a corrupt one)"
        elif et_label == 3 and 4 in unexpected:
            hint = ' (label 4 is BraTS 2017-2021\'s enhancing tumour: the datalist should say "et_label": 4)'
        result.errors.append(
            f"label values {_fmt_values(unexpected)} outside the expected set "
            f"{sorted(allowed)} (et_label {et_label}){hint}"
        )
        return
    voxel_ml = float(np.prod(img.header.get_zooms()[:3])) / 1000.0
    result.volumes_ml = {
        region: sum(counts.get(v, 0) for v in labels) * voxel_ml
        for region, labels in region_label_sets(et_label).items()
    }
    if result.volumes_ml["wt"] == 0:
        result.warnings.append("label map holds no tumour (all voxels 0)")


def value_counts(data: np.ndarray) -> dict[float, int]:
    """{value: voxel count}; bincount for small non-negative integers (fast), np.unique otherwise."""
    if data.dtype.kind in "ui" and data.size and int(data.min()) >= 0 and int(data.max()) < 1024:
        counts = np.bincount(data.ravel())
        return {int(v): int(counts[v]) for v in np.flatnonzero(counts)}
    values, counts = np.unique(data, return_counts=True)
    return {_as_number(v): int(c) for v, c in zip(values, counts)}


def check_image_voxels(part: str, img, result: CaseCheck) -> None:
    """Reads the voxels: unreadable data, NaN/Inf and all-zero volumes are errors."""
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as e:
        result.errors.append(f"cannot read the voxels of {part}: {_short(e)}")
        return
    if data.dtype.kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(data)))
        if bad:
            result.errors.append(f"{part} has {bad} NaN/Inf voxel(s)")
            return
    if not data.any():
        result.errors.append(f"{part} is all zero (an empty scan)")


def _as_number(value) -> float | int:
    value = float(value)
    return int(value) if value.is_integer() else value


def _fmt_values(values: Iterable) -> str:
    return "[" + ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values) + "]"


def _fmt_shape(shape: Sequence[int]) -> str:
    return "x".join(str(s) for s in shape)


def _short(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:200]


# ---------------------------------------------------------------------------------------------------------------
# Datalists and summary
# ---------------------------------------------------------------------------------------------------------------
def datalist_names(datalist_dir: Path) -> list[str]:
    """site-1, site-2, ..., site-10, ..., site-All found in the folder, in that order."""

    def key(name: str):
        number = name.split("-", 1)[1]
        return (0, int(number), "") if number.isdigit() else (1, 0, number)

    return sorted((p.stem for p in datalist_dir.glob("site-*.json")), key=key)


def datalist_files(paths: Sequence[str | Path]) -> list[Path]:
    """The datalist files --datalist_json_path names: a file as it is, a folder as its site-*.json (in
    datalist_names order); each file once."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = [path / f"{n}.json" for n in datalist_names(path)]
            if not found:
                raise DatalistError(
                    f"--datalist_json_path {path} holds no site-*.json; build them with "
                    "python -m dataset_brats18.build_datalist"
                )
        elif path.is_file():
            found = [path]
        else:
            raise DatalistError(
                f"--datalist_json_path {path} does not exist; build datalists with "
                "python -m dataset_brats18.build_datalist"
            )
        files += [f for f in found if f.resolve() not in {g.resolve() for g in files}]
    return files


def load_datalists(files: Sequence[Path]) -> dict[str, dict]:
    """The datalists by name: the file name without .json, or the whole path where two files share a name."""
    stems = [f.stem for f in files]
    names = [f.stem if stems.count(f.stem) == 1 else str(f) for f in files]
    loaded = {name: load_datalist(f) for name, f in zip(names, files)}
    conventions = {int(d.get("et_label", 4)) for d in loaded.values()}
    if len(conventions) > 1:
        raise DatalistError(
            f"the datalists {', '.join(names)} disagree on et_label ({sorted(conventions)}); "
            "rebuild them with python -m dataset_brats18.build_datalist"
        )
    return loaded


def unique_entries(datalists: dict[str, dict]) -> list[dict]:
    """Every listed case once (keyed by its label file), in order of first appearance."""
    seen, out = set(), []
    for datalist in datalists.values():
        for entry in datalist["training"] + datalist["validation"]:
            if entry["label"] not in seen:
                seen.add(entry["label"])
                out.append(entry)
    return out


def volume_stats(checks: Sequence[CaseCheck]) -> dict[str, tuple[float, float, float]]:
    """Median, min and max volume (ml) per region over the cases whose label could be measured."""
    stats = {}
    for region in REGIONS:
        values = [c.volumes_ml[region] for c in checks if c.volumes_ml is not None]
        stats[region] = (
            (float(np.median(values)), float(min(values)), float(max(values))) if values else (math.nan,) * 3
        )
    return stats


def summary_rows(datalists: dict[str, dict], by_label: dict[str, CaseCheck]) -> list[tuple[str, ...]]:
    """One row per datalist (its training cases), then one per distinct validation set."""
    rows = []
    for name, datalist in datalists.items():
        checks = [by_label[e["label"]] for e in datalist["training"]]
        rows.append(_stats_row(name, checks, str(len(datalist["validation"]))))
    validation_sets: dict[tuple[str, ...], list[str]] = {}
    for name, datalist in datalists.items():
        validation_sets.setdefault(tuple(e["label"] for e in datalist["validation"]), []).append(name)
    for labels, names in validation_sets.items():
        label = "validation (shared)" if len(validation_sets) == 1 else f"validation of {', '.join(names)}"
        rows.append(_stats_row(label, [by_label[lab] for lab in labels], "-", training=False))
    return rows


def _stats_row(name: str, checks: Sequence[CaseCheck], n_val: str, training: bool = True) -> tuple[str, ...]:
    stats = volume_stats(checks)
    cells = [f"{m:.1f} [{lo:.1f}-{hi:.1f}]" if not math.isnan(m) else "-" for m, lo, hi in stats.values()]
    n_cases = str(len(checks))
    return (
        name,
        n_cases if training else "-",
        n_val if training else n_cases,
        str(sum(not c.usable for c in checks)),
        *cells,
    )


def render_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    return "\n".join(
        "  ".join([r[0].ljust(widths[0])] + [r[c].rjust(widths[c]) for c in range(1, len(header))])
        for r in [header, *rows]
    )


def render_case(check: CaseCheck) -> list[str]:
    if check.volumes_ml is not None:
        volumes = "  ".join(f"{r.upper()} {check.volumes_ml[r]:6.1f} ml" for r in REGIONS)
    else:
        volumes = ""
    lines = [f"{'ok' if check.usable else 'UNUSABLE':8s} {check.case}  {volumes}".rstrip()]
    lines += [f"         error: {e}" for e in check.errors]
    lines += [f"         warning: {w}" for w in check.warnings]
    return lines


def write_csv(path: Path, checks: Sequence[CaseCheck]) -> None:
    """One row per case: status, volumes, errors and warnings (';'-joined), read time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["case", "usable", *(f"{r}_ml" for r in REGIONS), "errors", "warnings", "seconds"])
        for c in checks:
            volumes = [f"{c.volumes_ml[r]:.3f}" if c.volumes_ml else "" for r in REGIONS]
            writer.writerow(
                [c.case, int(c.usable), *volumes, "; ".join(c.errors), "; ".join(c.warnings), f"{c.seconds:.3f}"]
            )


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dataset_brats18.check_dataset",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dataset_base_dir", required=True, help="folder the datalist paths are relative to")
    p.add_argument(
        "--datalist_json_path",
        nargs="+",
        default=[str(SHIPPED_DATALIST_DIR)],
        metavar="PATH",
        help="one or more datalists to check, each a folder (every site-*.json in it) or a datalist JSON file, "
        "e.g. L or L/site-1.json L/site-All.json (default: the paper's split shipped in dataset_brats18/datalist)",
    )
    p.add_argument(
        "--headers_only",
        action="store_true",
        help="skip reading image voxels (headers and labels only): faster, but all-zero images, NaN/Inf "
        "and truncated image files go unnoticed",
    )
    p.add_argument("--num_workers", type=int, default=1, help="cases checked in parallel processes (default: 1)")
    p.add_argument("--problems_only", action="store_true", help="list only the cases with errors or warnings")
    p.add_argument("--csv", help="also write one row per case (status, volumes, errors, warnings, seconds) to this CSV")
    return p


def check_inputs(args: argparse.Namespace) -> dict[str, dict]:
    """Flag and datalist problems (exit 2), found before any case is opened; returns the datalists by name."""
    base = Path(args.dataset_base_dir)
    if not base.is_dir():
        raise DatalistError(f"--dataset_base_dir {base} does not exist or is not a folder")
    if args.num_workers < 1:
        raise DatalistError(f"--num_workers {args.num_workers}: need >= 1")
    return load_datalists(datalist_files(args.datalist_json_path))


def run_checks(entries: Sequence[dict], base: Path, et_label: int, read_images: bool, workers: int) -> list[CaseCheck]:
    args = [(e, base, et_label, read_images) for e in entries]
    if workers == 1:
        return [check_case(*a) for a in args]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_check_case_star, args, chunksize=1))


def _check_case_star(a: tuple) -> CaseCheck:
    return check_case(*a)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        datalists = check_inputs(args)
    except DatalistError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    base = Path(args.dataset_base_dir)
    et_label = int(next(iter(datalists.values())).get("et_label", 4))
    entries = unique_entries(datalists)
    what = "headers and labels" if args.headers_only else "headers, labels and image voxels"
    print(
        f"checking {len(entries)} case(s) listed in {', '.join(datalists)} under {base} (et_label {et_label}; {what})",
        flush=True,
    )
    start = time.perf_counter()
    checks = run_checks(entries, base, et_label, not args.headers_only, args.num_workers)
    wall = time.perf_counter() - start
    for check in checks:
        if not args.problems_only or check.errors or check.warnings:
            print("\n".join(render_case(check)))
    by_label = {e["label"]: c for e, c in zip(entries, checks)}
    header = ("datalist", "training", "validation", "unusable", "TC ml", "WT ml", "ET ml")
    print(
        "\ntumour volume in ml, median [min-max] over each datalist's training cases (validation rows: over the "
        "validation cases)"
    )
    print(render_table(header, summary_rows(datalists, by_label)))
    if args.csv:
        write_csv(Path(args.csv), checks)
    unusable = [c for c in checks if not c.usable]
    warned = [c for c in checks if c.warnings]
    opened = [c for c in checks if c.opened]
    per_case = sum(c.seconds for c in opened) / max(len(opened), 1)
    print(
        f"\n{len(checks)} case(s): {len(checks) - len(unusable)} usable, {len(unusable)} unusable, "
        f"{len(warned)} with warnings; {wall:.1f} s with {args.num_workers} worker(s), "
        f"{per_case:.2f} s per case present on disk ({what})"
    )
    if unusable:
        print(
            f"error: {len(unusable)} case(s) unusable (listed above as UNUSABLE); fix or remove them and rebuild "
            "the datalists",
            file=sys.stderr,
        )
        return EXIT_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
