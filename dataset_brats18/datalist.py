"""Datalist files: writing them, and the cheap checks job.py runs before every job.

A datalist is a JSON file ``{"training": [entry, ...], "validation": [entry, ...], "et_label": 4}`` where each entry
is ``{"image": [t1ce, t1, t2, flair], "label": seg}`` with paths relative to the dataset base folder. ``et_label``
(optional, default 4) records the label convention: 4 for BraTS 2017-2021, 3 for BraTS 2023 and later.
A federation of N sites reads ``site-1.json`` ... ``site-N.json``; the centralised baseline reads ``site-All.json``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import nibabel as nib

from brats_fl.job_results import write_atomically
from brats_fl.pipeline import ET_LABEL_BRATS2017, ET_LABEL_BRATS2023
from brats_fl.pipeline import MODALITIES as MODALITY_ORDER  # one channel order for the pipeline and the datalists
from brats_fl.settings import site_names

REQUIRED_KEYS = ("training", "validation")
MAX_NAMED = 3  # how many offending files an error line names


class DatalistError(ValueError):
    """A problem with a datalist or the files it lists; the message is one line a user can act on."""


def site_datalist_names(n_clients: int) -> list[str]:
    """Datalist files (without .json) a job with n_clients reads."""
    return ["site-All"] if n_clients == 1 else site_names(n_clients)


def brats18_case_entry(case_id: str, grade: str) -> dict:
    """Datalist entry of a case in the official BraTS 2018 layout ``training/<grade>/<id>/<id>_<mod>.nii.gz``."""
    folder = f"training/{grade}/{case_id}"
    return {
        "image": [f"{folder}/{case_id}_{m}.nii.gz" for m in MODALITY_ORDER],
        "label": f"{folder}/{case_id}_seg.nii.gz",
    }


def write_datalist(
    path: str | Path, training: list[dict], validation: list[dict], et_label: int = ET_LABEL_BRATS2017
) -> None:
    """Write one datalist JSON with a stable layout (sorted keys, 2-space indent, trailing newline), atomically: a job
    reading it while another job writes the same datalist (the demo's jobs at once) reads a whole file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"et_label": et_label, "training": training, "validation": validation}, indent=2, sort_keys=True)
    write_atomically(path, lambda tmp: tmp.write_text(text + "\n"))


def _name_some(items: Sequence[str]) -> str:
    named = ", ".join(items[:MAX_NAMED])
    return named + (f" (and {len(items) - MAX_NAMED} more)" if len(items) > MAX_NAMED else "")


def load_datalist(path: str | Path) -> dict:
    """Read and structurally validate one datalist; DatalistError names the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise DatalistError(f"datalist {path} not found")
    try:
        content = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatalistError(f"datalist {path} is not valid JSON ({e}); regenerate it or fix the syntax") from None
    if not isinstance(content, dict) or any(k not in content for k in REQUIRED_KEYS):
        raise DatalistError(f"datalist {path} must be a JSON object with 'training' and 'validation' lists")
    for key in REQUIRED_KEYS:
        entries = content[key]
        if not isinstance(entries, list) or not entries:
            raise DatalistError(f"datalist {path}: '{key}' must be a non-empty list of cases")
        for i, entry in enumerate(entries):
            if not _is_valid_entry(entry):
                raise DatalistError(
                    f'datalist {path}: {key}[{i}] must be {{"image": [t1ce, t1, t2, flair], "label": seg}}'
                )
    et_label = content.get("et_label", ET_LABEL_BRATS2017)
    if et_label not in (ET_LABEL_BRATS2017, ET_LABEL_BRATS2023):
        raise DatalistError(f"datalist {path}: 'et_label' must be 4 (BraTS 2017-2021) or 3 (BraTS 2023+)")
    return content


def _is_valid_entry(entry) -> bool:
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("image"), list)
        and len(entry["image"]) == len(MODALITY_ORDER)
        and all(isinstance(p, str) for p in entry["image"])
        and isinstance(entry.get("label"), str)
    )


def entry_files(entry: dict) -> list[str]:
    return list(entry["image"]) + [entry["label"]]


def all_entries(datalist: dict) -> list[dict]:
    return list(datalist["training"]) + list(datalist["validation"])


def missing_files(entries: Iterable[dict], base_dir: str | Path) -> list[str]:
    base = Path(base_dir)
    return [p for e in entries for p in entry_files(e) if not (base / p).is_file()]


def shape_mismatches(entries: Iterable[dict], base_dir: str | Path) -> list[str]:
    """Cases whose 5 files differ in spatial shape (read from the NIfTI headers only)."""
    base = Path(base_dir)
    bad = []
    for entry in entries:
        shapes = {}
        for p in entry_files(entry):
            try:
                shapes[p] = tuple(nib.load(base / p).shape[:3])
            except Exception as e:  # nibabel raises several types for corrupt headers
                raise DatalistError(f"cannot read NIfTI header of {base / p}: {e}") from None
        if len(set(shapes.values())) > 1:
            described = ", ".join(f"{Path(p).name} {'x'.join(map(str, s))}" for p, s in shapes.items())
            bad.append(f"{entry['label'].rsplit('/', 1)[0]} ({described})")
    return bad


def check_job_datalists(
    datalist_dir: str | Path, dataset_base_dir: str | Path, names: Sequence[str]
) -> dict[str, dict]:
    """Everything job.py verifies before a real-data job; returns the loaded datalists by name.

    Checks: folders exist, each needed site JSON exists and is well formed, every listed file exists, and the
    modalities of each case agree in shape. Raises DatalistError with a one-line message at the first problem.
    """
    datalist_dir, base = Path(datalist_dir), Path(dataset_base_dir)
    if not base.is_dir():
        raise DatalistError(f"--dataset_base_dir {base} does not exist; point it at the folder holding training/")
    if not datalist_dir.is_dir():
        raise DatalistError(f"--datalist_json_path {datalist_dir} does not exist; it must hold site-N.json files")
    absent = [f"{n}.json" for n in names if not (datalist_dir / f"{n}.json").is_file()]
    if absent:
        raise DatalistError(
            f"--datalist_json_path {datalist_dir} lacks {_name_some(absent)} needed for this number of clients; "
            "build them with python -m dataset_brats18.build_datalist"
        )
    loaded = {n: load_datalist(datalist_dir / f"{n}.json") for n in names}
    checked: set[str] = set()
    for name, datalist in loaded.items():
        entries = [e for e in all_entries(datalist) if e["label"] not in checked]
        missing = missing_files(entries, base)
        if missing:
            raise DatalistError(
                f"{len(missing)} file(s) listed in {datalist_dir / (name + '.json')} do not exist under "
                f"{base}: {_name_some(missing)}"
            )
        mismatched = shape_mismatches(entries, base)
        if mismatched:
            raise DatalistError(f"modalities differ in shape in {_name_some(mismatched)}")
        checked.update(e["label"] for e in entries)
    return loaded
