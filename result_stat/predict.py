"""Segment new cases with a trained model: one BraTS label map per case, no ground truth needed.

    python -m result_stat.predict --model <job>/server/simulate_job/app_server/best_FL_global_model.pt \\
        --input /data/new_cases --output_dir /data/new_cases_segmented
    python -m result_stat.predict --model model.pt --input datalist.json --dataset_base_dir /data/brats

The model is a job's best model or any checkpoint of BratsSegResNet (its width is read from the weights). The cases
are a folder in the BraTS layout (every folder below --input that holds <case>_t1ce/_t1/_t2/_flair.nii.gz, or the
BraTS 2023+ names <case>-t1c/-t1n/-t2w/-t2f.nii.gz, is a case; label files are ignored) or a datalist JSON whose
entries list the four modalities in the order t1ce, t1, t2, flair. Every case runs through the pipeline of training
and evaluation (brats_fl/pipeline.py: RAS at 1 mm, per-channel normalisation over the brain, sliding-window
inference, sigmoid > 0.5) and is written as <output_dir>/<case>.nii.gz: label values {0, 1, 2, 4} ({0, 1, 2, 3} for
BraTS 2023+ names or a datalist with "et_label": 3), on the case's original voxel grid with its header and affine.
The label maps equal what `python -m result_stat.evaluate --save_predictions` writes for the same model.

A case that cannot be read (a modality missing, not NIfTI or unreadable, modalities of different shapes) is reported
in one line naming the case and the file; the other cases are still segmented, and the exit code is 1 at the end.
Bad flags exit with code 2 before any case runs, as does an existing label map without --overwrite.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import brats_fl.pipeline as bp
from brats_fl.settings import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, default, roi_size_problem
from dataset_brats18.layouts import NAMINGS, nifti_stem, parse_file_name, scan_dataset
from result_stat.evaluate import (
    EvaluationInputError,
    add_infer_roi_size_flag,
    job_settings,
    load_model,
    quiet_monai_warnings,
    select_device,
)

DATALIST_KEYS = ("testing", "validation", "training")  # looked up in this order when --datalist_key is not given


@dataclass
class NewCase:
    """One case to segment: its id, its four modality files in the network's channel order, its label convention,
    and why it cannot be segmented (None when its files look usable)."""

    case_id: str
    images: list[Path]
    et_label: int
    problem: str | None = None


# ---------------------------------------------------------------------------------------------------------------
# Finding the cases
# ---------------------------------------------------------------------------------------------------------------
def cases_in_folder(folder: Path) -> list[NewCase]:
    """Every case under folder, found by BraTS file names (either naming); label files are not needed."""
    cases = []
    for scanned in scan_dataset(folder).cases:
        images = [folder / scanned.files[m] for m in bp.MODALITIES if m in scanned.files]
        case = NewCase(scanned.case_id, images, scanned.naming.et_label)
        missing = [m for m in bp.MODALITIES if m not in scanned.files]
        if missing:
            case.problem = missing_modality_problem(folder / scanned.folder, scanned.case_id, missing, scanned.naming)
        elif scanned.duplicates:
            case.problem = f"more than one file for a modality: {', '.join(scanned.duplicates)}"
        cases.append(case)
    return [c for c in cases if c.images or c.problem]


def missing_modality_problem(case_folder: Path, case_id: str, missing: list[str], naming) -> str:
    """Names the file that was expected, or the file with that modality's name that is not NIfTI."""
    for part in missing:
        stem = f"{case_id}{naming.separator}{naming.suffixes[part]}"
        others = sorted(p.name for p in case_folder.glob(f"{stem}.*") if nifti_stem(p.name) is None)
        if others:
            return f"{case_folder / others[0]} is not NIfTI (.nii or .nii.gz needed)"
    expected = ", ".join(f"{case_id}{naming.separator}{naming.suffixes[p]}.nii.gz" for p in missing)
    return f"no {expected} in {case_folder}"


def cases_in_datalist(path: Path, base_dir: Path, key: str | None) -> list[NewCase]:
    """The entries of a datalist: {"image": [t1ce, t1, t2, flair], ...}, paths relative to base_dir."""
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise EvaluationInputError(f"--input {path}: cannot read it as a datalist JSON: {e}") from None
    if not isinstance(content, dict):
        raise EvaluationInputError(f"--input {path}: a datalist is a JSON object with a list of cases")
    key = key or next((k for k in DATALIST_KEYS if k in content), None)
    entries = content.get(key) if key else None
    if not isinstance(entries, list):
        raise EvaluationInputError(
            f"--input {path}: no list of cases under {repr(key) if key else ' or '.join(DATALIST_KEYS)}; "
            "give --datalist_key"
        )
    et_label = bp.datalist_et_label(content) if "et_label" in content else None
    cases = []
    for i, entry in enumerate(entries):
        images = entry.get("image") if isinstance(entry, dict) else None
        if not (isinstance(images, list) and len(images) == len(bp.MODALITIES)):
            raise EvaluationInputError(
                f'--input {path}: entry {i} of {key!r} needs "image": [t1ce, t1, t2, flair] (4 file paths)'
            )
        files = [base_dir / p for p in images]
        cases.append(NewCase(case_id_from_files(files), files, et_label or naming_et_label(files[0])))
    return cases


def case_id_from_files(images: list[Path]) -> str:
    """The case id in the first modality's BraTS file name, else that file's name without its extension."""
    parsed = parse_file_name(images[0].name)
    return parsed.case_id if parsed else (nifti_stem(images[0].name) or images[0].stem)


def naming_et_label(image: Path) -> int:
    """ET label of the naming a file follows (3 for BraTS 2023+ names), else BraTS 2017-2021's 4."""
    parsed = parse_file_name(image.name)
    return parsed.naming.et_label if parsed else NAMINGS[0].et_label


def find_cases(source: Path, dataset_base_dir: str | None, datalist_key: str | None) -> list[NewCase]:
    """The cases of --input: a folder in the BraTS layout or a datalist JSON; at least one, ids unique."""
    if source.is_dir():
        cases = cases_in_folder(source)
    elif source.is_file():
        base = Path(dataset_base_dir) if dataset_base_dir else source.parent
        if not base.is_dir():
            raise EvaluationInputError(f"--dataset_base_dir {base} does not exist")
        cases = cases_in_datalist(source, base, datalist_key)
    else:
        raise EvaluationInputError(f"--input {source} not found: give a folder of cases or a datalist JSON")
    if not cases:
        raise EvaluationInputError(
            f"--input {source}: no case found (BraTS names <case>_t1ce.nii.gz ... or <case>-t1c.nii.gz ...)"
        )
    ids = [c.case_id for c in cases]
    twice = sorted({i for i in ids if ids.count(i) > 1})
    if twice:
        raise EvaluationInputError(f"--input {source}: case ids {twice} appear more than once; outputs would clash")
    return cases


# ---------------------------------------------------------------------------------------------------------------
# Checking a case before it runs
# ---------------------------------------------------------------------------------------------------------------
def file_problem(case: NewCase) -> str | None:
    """Why a case's files cannot be segmented, from their names and NIfTI headers: missing, not NIfTI, unreadable,
    not 3D, or modalities of different shapes. Each message names the file."""
    import nibabel as nib

    shapes = {}
    for path in case.images:
        if not path.is_file():
            return f"{path} not found"
        if nifti_stem(path.name) is None:
            return f"{path} is not NIfTI (.nii or .nii.gz needed)"
        try:
            shape = tuple(nib.load(str(path)).shape)
        except Exception as e:  # nibabel raises several types for files that are not NIfTI
            return f"cannot read {path} as NIfTI: {str(e).splitlines()[0]}"
        if len(shape) != 3:
            return f"{path} has shape {shape}, a 3D volume is needed"
        shapes[path] = shape
    if len(set(shapes.values())) > 1:
        described = ", ".join(f"{p.name} {'x'.join(map(str, s))}" for p, s in shapes.items())
        return f"modalities differ in shape: {described}"
    return None


# ---------------------------------------------------------------------------------------------------------------
# Segmenting
# ---------------------------------------------------------------------------------------------------------------
def segment_case(model, case: NewCase, device, infer_roi_size, use_amp: bool, out_path: Path) -> None:
    """One case through the evaluation's pipeline, without a label: preprocessing, normalisation, sliding-window
    inference, then the label map on the case's own grid (the first modality gives the header and affine)."""
    preprocess = bp.preprocessing_transforms(case.et_label, with_label=False)  # the instance the inverse uses
    item = bp.validation_steps(case.et_label, with_label=False)(preprocess({"image": [str(p) for p in case.images]}))
    image = item["image"]
    prediction = bp.predict_regions(model, image.unsqueeze(0).to(device), infer_roi_size, use_amp=use_amp)[0]
    bp.save_label_map(prediction, image, preprocess, "image", case.images[0], case.et_label, out_path)


def predict_all(model, cases: list[NewCase], device, infer_roi_size, use_amp: bool, output_dir: Path):
    """Segment every usable case, one progress line each with its time; returns the [(case id, problem)] of the
    cases that could not be segmented."""
    failed = []
    started = time.perf_counter()
    for index, case in enumerate(cases, start=1):
        prefix = f"[{index}/{len(cases)}] {case.case_id}"
        problem = case.problem or file_problem(case)
        if problem is None:
            case_start = time.perf_counter()
            out_path = output_dir / f"{case.case_id}.nii.gz"
            try:
                segment_case(model, case, device, infer_roi_size, use_amp, out_path)
            except Exception as e:  # a file nibabel read the header of but not the data, and the like
                problem = f"failed on {case.images[0].parent}: {type(e).__name__}: {str(e).splitlines()[0]}"
            else:
                elapsed = time.perf_counter() - started
                eta = elapsed / index * (len(cases) - index)
                print(f"{prefix}: {time.perf_counter() - case_start:.1f} s -> {out_path} (ETA {eta:.0f} s)", flush=True)
        if problem is not None:
            failed.append((case.case_id, problem))
            print(f"error: case {case.case_id}: {problem}", file=sys.stderr, flush=True)
    return failed


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m result_stat.predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model",
        required=True,
        help="checkpoint of BratsSegResNet: a job's server/simulate_job/app_server/best_FL_global_model.pt, or any "
        "NVFlare persistor dict or plain state dict of the network (loaded weights-only)",
    )
    p.add_argument(
        "--input",
        required=True,
        help="the new cases: a folder in the BraTS layout (each case's four modalities in a folder of its own), or a "
        'datalist JSON whose entries give "image": [t1ce, t1, t2, flair]',
    )
    p.add_argument("--output_dir", required=True, help="where <case>.nii.gz label maps are written (created if needed)")
    p.add_argument(
        "--dataset_base_dir",
        help="with a datalist: the folder its relative paths start from (default: the datalist's own folder, as "
        "MONAI's load_decathlon_datalist does)",
    )
    p.add_argument(
        "--datalist_key",
        help=f"with a datalist: the list of cases to segment (default: the first of {', '.join(DATALIST_KEYS)} "
        "that the file has)",
    )
    add_infer_roi_size_flag(p)
    p.add_argument(
        "--gpu",
        type=int,
        metavar="ID",
        help="run on GPU ID, i.e. cuda:ID (default: GPU 0 when torch sees CUDA, else the CPU; "
        "CUDA_VISIBLE_DEVICES= forces the CPU)",
    )
    p.add_argument(
        "--no_amp", action="store_true", help="turn mixed precision off on CUDA (on by default there, as in training)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace label maps that already exist in --output_dir")
    return p


def infer_roi_size_for(model_path: Path, flag: list[int] | None) -> tuple[int, int, int]:
    """--infer_roi_size, else the window of the job the model comes from, else the project's default; checked."""
    roi = flag or job_settings(model_path).get("infer_roi_size") or default("infer_roi_size")
    problem = roi_size_problem(roi, "--infer_roi_size")
    if problem:
        raise EvaluationInputError(problem)
    return tuple(int(s) for s in roi)


def refuse_existing_outputs(cases: list[NewCase], output_dir: Path, overwrite: bool) -> None:
    existing = [output_dir / f"{c.case_id}.nii.gz" for c in cases if (output_dir / f"{c.case_id}.nii.gz").exists()]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise EvaluationInputError(
            f"{existing[0]} exists{more}; pass --overwrite to replace, or choose another --output_dir"
        )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_monai_warnings()
    model_path, output_dir = Path(args.model), Path(args.output_dir)
    try:
        if not model_path.is_file():
            raise EvaluationInputError(f"--model {model_path} not found")
        cases = find_cases(Path(args.input), args.dataset_base_dir, args.datalist_key)
        refuse_existing_outputs(cases, output_dir, args.overwrite)
        infer_roi_size = infer_roi_size_for(model_path, args.infer_roi_size)
        device = select_device(args.gpu)
        model = load_model(model_path, device)
        output_dir.mkdir(parents=True, exist_ok=True)
    except EvaluationInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as e:
        print(f"error: cannot create --output_dir {output_dir}: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    use_amp = device.type == "cuda" and not args.no_amp
    print(
        f"Segmenting {len(cases)} case(s) of {args.input} with {model_path} ({device}, window "
        f"{'x'.join(map(str, infer_roi_size))}) into {output_dir}",
        flush=True,
    )
    failed = predict_all(model, cases, device, infer_roi_size, use_amp, output_dir)
    done = len(cases) - len(failed)
    print(f"Wrote {done} label map(s) to {output_dir}" + (f"; {len(failed)} case(s) failed (above)" if failed else ""))
    return EXIT_FAILED if failed else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
