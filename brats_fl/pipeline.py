"""The imaging pipeline, written once: used by client.py, the evaluation and the tests alike.

Data flow for one case: 4 NIfTI modalities stacked as channels in the order t1ce, t1, t2, flair; the label map
converted to 3 overlapping binary channels TC, WT, ET (tumour core, whole tumour, enhancing tumour); RAS orientation
and 1 mm spacing; intensities normalised per channel over non-zero (brain) voxels.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai.data import DataLoader, Dataset
from monai.inferers import sliding_window_inference
from monai.losses import DiceLoss
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropd,
    Spacingd,
    SpatialPadd,
)

from brats_fl.cache import CaseCache

MODALITIES = ("t1ce", "t1", "t2", "flair")  # channel order of the network input
REGIONS = ("tc", "wt", "et")  # channel order of the network output
ET_LABEL_BRATS2017 = 4  # BraTS 2017-2021: enhancing tumour is label 4
ET_LABEL_BRATS2023 = 3  # BraTS 2023+: enhancing tumour is label 3
NECROSIS_LABEL = 1
EDEMA_LABEL = 2


# ---------------------------------------------------------------------------------------------------------------
# Labels
# ---------------------------------------------------------------------------------------------------------------
def region_label_sets(et_label: int = ET_LABEL_BRATS2017) -> dict[str, tuple[int, ...]]:
    """Which BraTS labels make up each region: TC = {1, ET}, WT = {1, 2, ET}, ET = {ET}."""
    if et_label not in (ET_LABEL_BRATS2017, ET_LABEL_BRATS2023):
        raise ValueError(f"et_label must be 4 (BraTS 2017-2021) or 3 (BraTS 2023+), got {et_label}")
    return {
        "tc": (NECROSIS_LABEL, et_label),
        "wt": (NECROSIS_LABEL, EDEMA_LABEL, et_label),
        "et": (et_label,),
    }


def labels_to_regions(
    label: np.ndarray | torch.Tensor, et_label: int = ET_LABEL_BRATS2017
) -> np.ndarray | torch.Tensor:
    """Convert a label map (optionally with a leading channel of size 1) to 3 channels TC, WT, ET.

    Raises ValueError on label values outside {0, 1, 2, et_label}: a 3 in a 2018-style case (or a 4 in a 2023-style
    case) means the wrong convention was chosen, and silently dropping those voxels would corrupt training.
    """
    is_tensor = isinstance(label, torch.Tensor)
    if label.ndim == 4:
        if label.shape[0] != 1:
            raise ValueError(f"expected a single-channel label map, got shape {tuple(label.shape)}")
        label = label[0]
    is_value = label_value_masks(label, et_label)
    channels = []
    for labels in region_label_sets(et_label).values():
        mask = is_value[labels[0]]
        for v in labels[1:]:
            mask = mask | is_value[v]
        channels.append(mask)
    return torch.stack(channels).float() if is_tensor else np.stack(channels).astype(np.float32)


def label_value_masks(label: np.ndarray | torch.Tensor, et_label: int) -> dict:
    """{value: mask} for the values a BraTS label map may hold; ValueError naming any other value. One comparison per
    value instead of sorting the volume: this runs on whole volumes."""
    is_value = {v: label == v for v in (0, NECROSIS_LABEL, EDEMA_LABEL, et_label)}
    known = is_value[0] | is_value[NECROSIS_LABEL] | is_value[EDEMA_LABEL] | is_value[et_label]
    if not bool(known.all()):
        values = (torch.unique(label[~known]) if isinstance(label, torch.Tensor) else np.unique(label[~known])).tolist()
        unexpected = sorted(int(v) if float(v).is_integer() else v for v in values)
        raise ValueError(
            f"label values {unexpected} are not in the expected set {sorted(is_value)} (et_label={et_label}); "
            'check the dataset\'s label convention (BraTS 2023+ uses 3 for enhancing tumour: set "et_label": 3 '
            "in the datalist)"
        )
    return is_value


def regions_to_labels(regions: np.ndarray, et_label: int = ET_LABEL_BRATS2017) -> np.ndarray:
    """Inverse of labels_to_regions for (possibly predicted, non-nested) binary TC/WT/ET channels.

    Nesting is enforced the BraTS way: ET wins, then the rest of TC is necrosis, then the rest of WT is edema.
    """
    tc, wt, et = (np.asarray(regions[i]) > 0 for i in range(3))
    label = np.zeros(tc.shape, dtype=np.uint8)
    label[wt] = EDEMA_LABEL
    label[tc] = NECROSIS_LABEL
    label[et] = et_label
    return label


def nested_regions(regions: np.ndarray, et_label: int) -> np.ndarray:
    """TC/WT/ET channels as a BraTS label map holds them (ET inside TC inside WT), i.e. what a viewer or the BraTS
    evaluator sees in a written prediction; the network's raw channels need not be nested."""
    return labels_to_regions(regions_to_labels(regions, et_label), et_label) > 0.5


def save_label_map(
    prediction: torch.Tensor,
    reference,
    preprocess: Compose,
    reference_key: str,
    reference_file: str | Path,
    et_label: int,
    out_path: Path,
) -> None:
    """Write a predicted TC/WT/ET tensor as a BraTS label map on the original grid, with the header and affine of
    reference_file. Used by the evaluation (reference: the label) and by result_stat.predict (reference: the image).

    The prediction lives in the pipeline's space (RAS, 1 mm); MONAI inverts the reference's own preprocessing
    (orientation, spacing; nearest neighbour) on it, so it lands voxel for voxel on the original scan. Written to a
    temporary file first, then renamed: a label map that exists is complete.
    """
    import os

    import nibabel as nib
    from monai.data import MetaTensor
    from monai.transforms import Invertd

    data = {
        reference_key: reference,
        "pred": MetaTensor(
            prediction.detach().cpu(), meta=dict(reference.meta), applied_operations=list(reference.applied_operations)
        ),
    }
    inverted = Invertd(keys="pred", transform=preprocess, orig_keys=reference_key, nearest_interp=True)(data)["pred"]
    labels = regions_to_labels(np.asarray(inverted.detach().cpu()), et_label)
    original = nib.load(str(reference_file))
    if labels.shape != original.shape[:3]:
        raise RuntimeError(f"inverted prediction {labels.shape} does not match {reference_file} {original.shape}")
    header = original.header.copy()
    header.set_data_dtype(np.uint8)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    temporary = out_path.with_name(f".{os.getpid()}.{out_path.name}")  # keeps the .nii.gz ending nibabel reads
    nib.save(nib.Nifti1Image(labels, original.affine, header), str(temporary))
    os.replace(temporary, out_path)


class CheckBratsLabelsd(MapTransform):
    """Refuse a label map with values outside {0, 1, 2, et_label}, naming the file; the data pass unchanged. Part of
    preprocessing, so every case is checked whole, even where training only looks at a crop of it."""

    def __init__(self, keys: str | Sequence[str], et_label: int = ET_LABEL_BRATS2017) -> None:
        super().__init__(keys)
        region_label_sets(et_label)  # validates et_label early
        self.et_label = et_label

    def __call__(self, data):
        for key in self.key_iterator(data):
            try:
                label_value_masks(data[key], self.et_label)
            except ValueError as e:
                source = getattr(data[key], "meta", {}).get("filename_or_obj", key)
                raise ValueError(f"{source}: {e}") from None
        return data


class ConvertToBratsRegionsd(MapTransform):
    """Dictionary transform wrapping labels_to_regions for MONAI pipelines."""

    def __init__(self, keys: str | Sequence[str], et_label: int = ET_LABEL_BRATS2017) -> None:
        super().__init__(keys)
        region_label_sets(et_label)  # validates et_label early
        self.et_label = et_label

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            try:
                regions = labels_to_regions(d[key], self.et_label)
            except ValueError as e:
                source = getattr(d[key], "meta", {}).get("filename_or_obj", key)
                raise ValueError(f"{source}: {e}") from None
            d[key] = _with_same_meta(d[key], regions)
        return d


def _with_same_meta(original, new: torch.Tensor | np.ndarray):
    """Keep MONAI MetaTensor metadata (affine) when replacing the array."""
    if hasattr(original, "copy_meta_from") and isinstance(new, torch.Tensor):
        from monai.data import MetaTensor

        return MetaTensor(new, meta=original.meta, applied_operations=original.applied_operations)
    return new


# ---------------------------------------------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------------------------------------------
def preprocessing_transforms(et_label: int = ET_LABEL_BRATS2017, with_label: bool = True) -> Compose:
    """The deterministic part of loading a case, which the disk cache stores: the 4 modalities as channels and the
    label map, in RAS orientation at 1 mm (MONAI leaves a volume already at 1 mm as it is), label values checked.
    The steps after it work on float32 (the cache hands back the files' own compact types: the same numbers).
    Without the label (new cases, result_stat.predict) the image steps are the same ones."""
    keys = ["image", "label"] if with_label else ["image"]
    steps = [
        LoadImaged(keys=keys, image_only=True),
        EnsureChannelFirstd(keys=keys),
        EnsureTyped(keys=keys, dtype=torch.float32),
        Orientationd(keys=keys, axcodes="RAS"),
        Spacingd(keys=keys, pixdim=(1.0, 1.0, 1.0), mode=("bilinear", "nearest")[: len(keys)]),
    ]
    if with_label:
        steps.append(CheckBratsLabelsd(keys="label", et_label=et_label))
    return Compose(steps)


def training_steps(roi_size: Sequence[int], et_label: int = ET_LABEL_BRATS2017) -> Compose:
    """After preprocessing, for training: a random roi_size crop (padded first if the volume is smaller), taken before
    anything else so that only the crop is converted, then TC/WT/ET channels, flips, intensity normalisation and
    augmentation."""
    return Compose(
        [
            SpatialPadd(keys=["image", "label"], spatial_size=list(roi_size)),
            RandSpatialCropd(keys=["image", "label"], roi_size=list(roi_size), random_size=False),
            EnsureTyped(keys=["image", "label"], dtype=torch.float32),
            ConvertToBratsRegionsd(keys="label", et_label=et_label),
            RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=0),
            RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=1),
            RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=2),
            NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True),
            RandScaleIntensityd(keys="image", factors=0.1, prob=1.0),
            RandShiftIntensityd(keys="image", offsets=0.1, prob=1.0),
        ]
    )


def validation_steps(et_label: int = ET_LABEL_BRATS2017, with_label: bool = True) -> Compose:
    """After preprocessing, for validation and inference: TC/WT/ET channels and normalisation of the whole volume
    (no crop: sliding-window inference pads each window to a SegResNet-compatible size)."""
    keys = ["image", "label"] if with_label else ["image"]
    steps = [EnsureTyped(keys=keys, dtype=torch.float32)]
    if with_label:
        steps.append(ConvertToBratsRegionsd(keys="label", et_label=et_label))
    steps.append(NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True))
    return Compose(steps)


def train_transforms(roi_size: Sequence[int], et_label: int = ET_LABEL_BRATS2017) -> Compose:
    """The whole training chain from file paths, without any cache."""
    return Compose([*preprocessing_transforms(et_label).transforms, *training_steps(roi_size, et_label).transforms])


def val_transforms(et_label: int = ET_LABEL_BRATS2017) -> Compose:
    """The whole validation chain from file paths, without any cache."""
    return Compose([*preprocessing_transforms(et_label).transforms, *validation_steps(et_label).transforms])


# ---------------------------------------------------------------------------------------------------------------
# Datalists and datasets
# ---------------------------------------------------------------------------------------------------------------
def read_datalist(path: str | Path) -> dict:
    """Read a datalist JSON ({"training": [...], "validation": [...], optional "et_label"})."""
    with open(path) as f:
        return json.load(f)


def datalist_et_label(datalist: dict) -> int:
    """Label convention recorded in the datalist by the builder; BraTS 2017-2021 (ET = 4) when absent."""
    return int(datalist.get("et_label", ET_LABEL_BRATS2017))


def resolve_entries(entries: list[dict], base_dir: str | Path) -> list[dict]:
    """Make the relative image/label paths of datalist entries absolute under base_dir."""
    base = Path(base_dir)
    return [{**e, "image": [str(base / p) for p in e["image"]], "label": str(base / e["label"])} for e in entries]


class CaseDataset(Dataset):
    """Datalist entries as network-ready cases: preprocessing (from the disk cache when one is given, or kept in
    memory for the first memory_fraction of the cases), then ``steps`` (random crops and augmentation, or the
    validation normalisation) on every access."""

    def __init__(
        self,
        entries: list[dict],
        steps: Compose,
        cache: CaseCache | None = None,
        memory_fraction: float = 0.0,
        et_label: int = ET_LABEL_BRATS2017,
    ):
        super().__init__(entries, transform=steps)
        self.preprocess = preprocessing_transforms(et_label)  # its instances are the ones an inverse must use
        self.variant = f"et_label={et_label}"  # what the cached entry was checked against
        self.cache = cache
        self.in_memory = {i: None for i in range(math.ceil(memory_fraction * len(entries)))}

    def preprocessed(self, index: int) -> dict:
        if self.in_memory.get(index) is not None:
            return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in self.in_memory[index].items()}
        entry = dict(self.data[index])
        if self.cache is not None:
            item = self.cache.get_or_build(entry, self.preprocess, self.variant)
        else:
            item = self.preprocess(entry)
        if index in self.in_memory:
            self.in_memory[index] = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in item.items()}
        return item

    def _transform(self, index: int):
        return self.transform(self.preprocessed(index))


def make_dataset(
    entries: list[dict],
    steps: Compose,
    cache: CaseCache | None = None,
    memory_fraction: float = 0.0,
    et_label: int = ET_LABEL_BRATS2017,
) -> CaseDataset:
    return CaseDataset(entries, steps, cache, memory_fraction, et_label)


def make_loader(
    dataset: Dataset,
    shuffle: bool,
    num_workers: int = 0,
    batch_size: int = 1,
    pin_memory: bool = False,
    generator: torch.Generator | None = None,
) -> DataLoader:
    """Workers overlap loading with compute; pinned memory speeds the copy to a GPU. Workers live as long as the
    loader (persistent), so the rounds do not start them again. With a generator, the loader's order and its
    transforms' seeds come from it instead of torch's global generator."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        generator=generator,
    )


# ---------------------------------------------------------------------------------------------------------------
# Loss, inference, metrics
# ---------------------------------------------------------------------------------------------------------------
def make_loss() -> DiceLoss:
    """Soft Dice on sigmoid outputs with squared denominators, as in the paper's pipeline."""
    return DiceLoss(sigmoid=True, squared_pred=True, smooth_nr=0.0, smooth_dr=1e-5)


def predict_regions(
    model: torch.nn.Module,
    image: torch.Tensor,
    infer_roi_size: Sequence[int],
    overlap: float = 0.5,
    use_amp: bool = False,
) -> torch.Tensor:
    """Binary TC/WT/ET prediction (B x 3 x H x W x D) of a whole volume by sliding-window inference."""
    with torch.no_grad(), torch.autocast(device_type=image.device.type, enabled=use_amp):
        logits = sliding_window_inference(
            image, roi_size=list(infer_roi_size), sw_batch_size=1, predictor=model, overlap=overlap
        )
    return (torch.sigmoid(logits.float()) > 0.5).float()


def dice_per_region(prediction: torch.Tensor | np.ndarray, truth: torch.Tensor | np.ndarray) -> np.ndarray:
    """Dice of each region channel of one case (shape 3 x ...); nan where the truth of a region is empty.

    nan, not 0 or 1: a case without enhancing tumour says nothing about how well ET is segmented, so it must not
    pull the ET mean either way (see aggregate_dice).
    """
    pred = np.asarray(prediction.detach().cpu() if isinstance(prediction, torch.Tensor) else prediction) > 0.5
    true = np.asarray(truth.detach().cpu() if isinstance(truth, torch.Tensor) else truth) > 0.5
    scores = np.full(pred.shape[0], np.nan)
    for c in range(pred.shape[0]):
        n_true = true[c].sum()
        if n_true == 0:
            continue
        scores[c] = 2.0 * np.logical_and(pred[c], true[c]).sum() / (pred[c].sum() + n_true)
    return scores


def aggregate_dice(per_case: Sequence[Sequence[float]]) -> dict[str, float]:
    """Mean Dice per region over cases, ignoring nan (region absent in that case); overall = mean of regions.

    A region absent from every case gives nan for that region and is left out of the overall mean.
    """
    table = np.asarray(per_case, dtype=np.float64).reshape(-1, len(REGIONS))
    metrics = {}
    for i, region in enumerate(REGIONS):
        column = table[:, i][~np.isnan(table[:, i])]
        metrics[f"val_dice_{region}"] = float(column.mean()) if column.size else math.nan
    finite = [v for v in metrics.values() if not math.isnan(v)]
    metrics["val_dice"] = float(np.mean(finite)) if finite else math.nan
    return metrics


def evaluate_dice(
    model: torch.nn.Module,
    loader: DataLoader,
    device: torch.device,
    infer_roi_size: Sequence[int],
    use_amp: bool = False,
) -> dict[str, float]:
    """val_dice, val_dice_tc, val_dice_wt, val_dice_et of a model over a validation loader."""
    model.eval()
    per_case = []
    for batch in loader:
        image = batch["image"].to(device)
        prediction = predict_regions(model, image, infer_roi_size, use_amp=use_amp)
        for b in range(prediction.shape[0]):
            per_case.append(dice_per_region(prediction[b], batch["label"][b]))
    return aggregate_dice(per_case)


def select_device(prefer_cuda: bool = True) -> torch.device:
    return torch.device("cuda" if prefer_cuda and torch.cuda.is_available() else "cpu")
