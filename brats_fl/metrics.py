"""BraTS's two official metrics per tumour region: Dice and the 95th-percentile Hausdorff distance (HD95, in mm).

Pure functions on binary masks (numpy), with the BraTS conventions for empty regions:

=================================  ======  =====================================
prediction / truth                 Dice    HD95
=================================  ======  =====================================
both empty                         1       0
exactly one empty                  0       ``max_distance_mm`` (image diagonal)
both non-empty                     2|P∩T| / (|P|+|T|)   see below
=================================  ======  =====================================

HD95 of two non-empty masks: the surface of a mask is its voxels with at least one face-neighbour outside it (the
array border counts as outside). For every surface voxel of the prediction, the distance in mm to the nearest
surface voxel of the truth is measured, and the other way round; HD95 is the larger of the two 95th percentiles
(linear interpolation between ranks), i.e. the symmetric "robust Hausdorff distance". Voxel spacing is honoured, so
anisotropic volumes are measured in mm, not in voxels.

When exactly one mask is empty the distance is undefined (infinite). It is replaced by the diagonal of the image in
mm, the largest distance two voxels of the volume can have: sqrt(240^2 + 240^2 + 155^2) = 373.13 mm for BraTS
volumes. The BraTS 2023 evaluation code caps infinite HD95 values at 374, just above that diagonal
(rachitsaluja/BraTS-2023-Metrics, eval.py, ``replace(np.inf, 374)``); the same code scores two empty masks as
Dice 1 and HD95 0.

These differ on purpose from the training-time rule in brats_fl.pipeline.dice_per_region, where a region absent from
the truth gives nan and is left out of the mean (see result_stat/evaluate.py, which reports both).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

HD_PERCENTILE = 95.0


def _as_bool(mask) -> np.ndarray:
    """Binary view of a mask given as bool, 0/1 integers or 0.0/1.0 floats."""
    array = np.asarray(mask)
    return array if array.dtype == bool else array > 0.5


def _check_pair(prediction: np.ndarray, truth: np.ndarray) -> None:
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction shape {prediction.shape} differs from truth shape {truth.shape}")


def dice_brats(prediction, truth) -> float:
    """Dice of one binary region; 1 when both masks are empty, 0 when exactly one is."""
    pred, true = _as_bool(prediction), _as_bool(truth)
    _check_pair(pred, true)
    n_pred, n_true = int(pred.sum()), int(true.sum())
    if n_pred == 0 and n_true == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, true).sum()) / (n_pred + n_true)


def max_distance_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Diagonal of the image in mm: the HD95 used when exactly one of prediction and truth is empty."""
    return float(math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing))))


def _bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    """Smallest box holding every True voxel, grown by margin voxels and clipped to the array."""
    coords = np.nonzero(mask)
    return tuple(
        slice(max(int(c.min()) - margin, 0), min(int(c.max()) + margin + 1, n)) for c, n in zip(coords, mask.shape)
    )


def surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of the mask with a face-neighbour outside it (outside the array counts as outside)."""
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def surface_distances(from_mask, to_mask, spacing: Sequence[float]) -> np.ndarray:
    """Distance in mm from each surface voxel of from_mask to the nearest surface voxel of to_mask.

    Both masks must be non-empty. Work is done in the bounding box of the two masks (plus one voxel, so the
    surfaces are the same as in the whole array), which keeps 240 x 240 x 155 volumes fast.
    """
    a, b = _as_bool(from_mask), _as_bool(to_mask)
    _check_pair(a, b)
    if not a.any() or not b.any():
        raise ValueError("surface distances need two non-empty masks")
    box = _bounding_box(a | b, margin=1)
    a, b = a[box], b[box]
    distance_to_b = ndimage.distance_transform_edt(~surface(b), sampling=[float(s) for s in spacing])
    return distance_to_b[surface(a)]


def hausdorff_percentile(
    prediction, truth, spacing: Sequence[float], percentile: float = HD_PERCENTILE, empty_value: float | None = None
) -> float:
    """Symmetric percentile Hausdorff distance in mm (HD95 by default) with the BraTS empty-mask conventions.

    empty_value is what exactly one empty mask scores; default: the image diagonal (max_distance_mm).
    """
    pred, true = _as_bool(prediction), _as_bool(truth)
    _check_pair(pred, true)
    if len(spacing) != pred.ndim:
        raise ValueError(f"spacing {tuple(spacing)} does not match a {pred.ndim}-D mask")
    has_pred, has_true = bool(pred.any()), bool(true.any())
    if not has_pred and not has_true:
        return 0.0
    if not has_pred or not has_true:
        return max_distance_mm(pred.shape, spacing) if empty_value is None else float(empty_value)
    forward = np.percentile(surface_distances(pred, true, spacing), percentile)
    backward = np.percentile(surface_distances(true, pred, spacing), percentile)
    return float(max(forward, backward))


def region_scores(
    prediction_regions, truth_regions, spacing: Sequence[float], region_names: Sequence[str] = ("tc", "wt", "et")
) -> dict[str, float]:
    """{dice_<region>, hd95_<region>} for region channels (shape R x H x W x D) of one case, plus dice_overall
    (mean Dice over the regions, as BraTS ranks)."""
    pred, true = _as_bool(prediction_regions), _as_bool(truth_regions)
    _check_pair(pred, true)
    if pred.shape[0] != len(region_names):
        raise ValueError(f"expected {len(region_names)} region channels, got {pred.shape[0]}")
    scores: dict[str, float] = {}
    for i, region in enumerate(region_names):
        scores[f"dice_{region}"] = dice_brats(pred[i], true[i])
        scores[f"hd95_{region}"] = hausdorff_percentile(pred[i], true[i], spacing)
    scores["dice_overall"] = float(np.mean([scores[f"dice_{r}"] for r in region_names]))
    return scores
