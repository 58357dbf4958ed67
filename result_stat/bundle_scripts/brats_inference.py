"""Helpers of the exported MONAI bundle (copied into <bundle>/scripts/ by result_stat.export_bundle).

Standalone on purpose: MONAI, PyTorch and the standard library only, so the bundle runs where the project that
trained the model is not installed. What it does mirrors the project's inference: finding a case's four modalities by
their BraTS names, the TC/WT/ET -> BraTS label conversion, and the loop over the cases.
"""

from __future__ import annotations

import glob
import os

import torch

# channel order of the network input (t1ce, t1, t2, flair), in each BraTS naming
MODALITY_SUFFIXES = {
    "BraTS 2017-2021": ("_t1ce", "_t1", "_t2", "_flair"),
    "BraTS 2023+": ("-t1c", "-t1n", "-t2w", "-t2f"),
}
NIFTI_ENDINGS = (".nii.gz", ".nii")
NECROSIS_LABEL, EDEMA_LABEL = 1, 2


def find_cases(dataset_dir: str) -> list[dict]:
    """Every case under dataset_dir whose four modalities are there, as {"image": [t1ce, t1, t2, flair]}, found by
    the first modality's file name; sorted by path. None found is an error, not an empty run."""
    cases = []
    for suffixes in MODALITY_SUFFIXES.values():
        for ending in NIFTI_ENDINGS:
            pattern = os.path.join(dataset_dir, "**", f"*{suffixes[0]}{ending}")
            for first in sorted(glob.glob(pattern, recursive=True)):
                stem = os.path.basename(first)[: -len(suffixes[0] + ending)]
                folder = os.path.dirname(first)
                images = [os.path.join(folder, f"{stem}{s}{ending}") for s in suffixes]
                if all(os.path.isfile(p) for p in images):
                    cases.append({"image": images})
    if not cases:
        raise FileNotFoundError(
            f"no case under dataset_dir {dataset_dir}: expected <case>_t1ce/_t1/_t2/_flair.nii.gz or "
            "<case>-t1c/-t1n/-t2w/-t2f.nii.gz files"
        )
    return sorted(cases, key=lambda c: c["image"][0])


def case_id_of(path: str) -> str:
    """The case id in a modality file's name (Brats18_X_t1ce.nii.gz -> Brats18_X), else the name without ending."""
    name = os.path.basename(str(path))
    for ending in NIFTI_ENDINGS:
        if name.endswith(ending):
            name = name[: -len(ending)]
            break
    for suffixes in MODALITY_SUFFIXES.values():
        for suffix in suffixes:
            if name.endswith(suffix) and len(name) > len(suffix):
                return name[: -len(suffix)]
    return name


def case_id_name(metadict: dict, saver) -> dict:
    """SaveImage's output name: the case id (<case>.nii.gz), as result_stat.predict names it."""
    source = metadict.get("filename_or_obj", "case")
    if isinstance(source, (list, tuple)):
        source = source[0]
    return {"subject": case_id_of(source), "idx": None}


def regions_to_labels(regions: torch.Tensor, et_label: int) -> torch.Tensor:
    """Binary TC/WT/ET channels (3 x ...) -> one BraTS label channel (1 x ...): ET wins, then the rest of TC is
    necrosis, then the rest of WT is edema, as the BraTS challenge nests the regions."""
    tc, wt, et = (regions[i : i + 1] > 0 for i in range(3))
    label = torch.zeros_like(regions[0:1], dtype=torch.uint8)
    label[wt] = EDEMA_LABEL
    label[tc] = NECROSIS_LABEL
    label[et] = et_label
    return label


def segment(network, dataloader, inferer, postprocessing, device) -> int:
    """Sliding-window inference of every case, then the postprocessing chain (sigmoid, threshold, back to the
    original grid, label map, saved); returns the number of cases written."""
    from monai.data import decollate_batch

    network.eval()
    written = 0
    for batch in dataloader:
        with torch.no_grad():
            batch["pred"] = inferer(batch["image"].to(device), network).cpu()
        for item in decollate_batch(batch):
            postprocessing(item)
            written += 1
            print(f"segmented {case_id_of(item['image'].meta.get('filename_or_obj', written))}", flush=True)
    return written
