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
from monai.data import CacheDataset, DataLoader, Dataset
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
    values = torch.unique(label).tolist() if is_tensor else np.unique(label).tolist()
    allowed = {0, NECROSIS_LABEL, EDEMA_LABEL, et_label}
    unexpected = sorted(int(v) if float(v).is_integer() else v for v in values if v not in allowed)
    if unexpected:
        raise ValueError(
            f"label values {unexpected} are not in the expected set {sorted(allowed)} (et_label={et_label}); "
            'check the dataset\'s label convention (BraTS 2023+ uses 3 for enhancing tumour: set "et_label": 3 '
            "in the datalist)"
        )
    if label.ndim == 4:
        if label.shape[0] != 1:
            raise ValueError(f"expected a single-channel label map, got shape {tuple(label.shape)}")
        label = label[0]
    channels = []
    for labels in region_label_sets(et_label).values():
        if is_tensor:
            mask = torch.zeros_like(label, dtype=torch.bool)
            for v in labels:
                mask |= label == v
        else:
            mask = np.isin(label, labels)
        channels.append(mask)
    return torch.stack(channels).float() if is_tensor else np.stack(channels).astype(np.float32)


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
def load_transforms(et_label: int = ET_LABEL_BRATS2017) -> list:
    """Load the 4 modalities as channels and the label as TC/WT/ET, in RAS orientation at 1 mm."""
    return [
        LoadImaged(keys=["image", "label"], image_only=True),
        EnsureChannelFirstd(keys=["image", "label"]),
        EnsureTyped(keys=["image", "label"], dtype=torch.float32),
        ConvertToBratsRegionsd(keys="label", et_label=et_label),
        Orientationd(keys=["image", "label"], axcodes="RAS"),
        Spacingd(keys=["image", "label"], pixdim=(1.0, 1.0, 1.0), mode=("bilinear", "nearest")),
    ]


def train_transforms(roi_size: Sequence[int], et_label: int = ET_LABEL_BRATS2017) -> Compose:
    """Random roi_size crop (padded first if the volume is smaller), flips, intensity augmentation."""
    return Compose(
        load_transforms(et_label)
        + [
            SpatialPadd(keys=["image", "label"], spatial_size=list(roi_size)),
            RandSpatialCropd(keys=["image", "label"], roi_size=list(roi_size), random_size=False),
            RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=0),
            RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=1),
            RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=2),
            NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True),
            RandScaleIntensityd(keys="image", factors=0.1, prob=1.0),
            RandShiftIntensityd(keys="image", offsets=0.1, prob=1.0),
        ]
    )


def val_transforms(et_label: int = ET_LABEL_BRATS2017) -> Compose:
    """Whole volume, no crop: sliding-window inference pads each window to a SegResNet-compatible size."""
    return Compose(load_transforms(et_label) + [NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True)])


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


def make_dataset(entries: list[dict], transform: Compose, cache_rate: float = 0.0, num_workers: int = 0) -> Dataset:
    """CacheDataset keeps ``cache_rate`` of the cases' deterministic part in memory; plain Dataset when 0."""
    if cache_rate > 0:
        return CacheDataset(
            entries, transform=transform, cache_rate=cache_rate, num_workers=num_workers, progress=False
        )
    return Dataset(entries, transform=transform)


def make_loader(dataset: Dataset, shuffle: bool, num_workers: int = 0, batch_size: int = 1) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers)


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
