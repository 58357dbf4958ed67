"""What the BraTS challenge computes per tumour region, in one place: the evaluation, the sites' final evaluation and
the tests all score with this module, so a number here means the same wherever it is printed.

Per region (TC, WT, ET channels, built from the label map with the datalist's et_label), ``SCORE_KINDS`` in table
order; ``SCORE_DEFINITIONS`` says in one line each what is computed and why:

- ``dice``: 2|P∩T| / (|P|+|T|).
- ``hd95``: the official 95th-percentile Hausdorff distance in mm: the 95th percentile of the surface distances of
  both directions pooled together (medpy's ``hd95``, which panoptica and so the official ``brats-evaluation``
  package compute).
- ``hd95_directed``: the larger of the two directed 95th percentiles (MONAI's ``compute_hausdorff_distance``, the
  DeepMind ``surface-distance`` robust Hausdorff without surfel weights); never smaller than ``hd95``.
- ``lesion_dice``, ``lesion_hd95``: the BraTS 2023+ lesion-wise scores (see ``lesion_wise_scores``).
- ``sensitivity``, ``specificity``: voxel-wise, over the whole image, as the BraTS 2023 code computes them.

Surfaces and surface distances come from MONAI (``get_mask_edges``: voxels with a face-neighbour outside the mask,
the array border counting as outside, as in medpy and panoptica; ``get_surface_distance``: exact Euclidean distances
with the voxel spacing). Connected components and dilations are scipy's.

Empty regions, stated once (the constants below carry the sources):

- both empty: Dice 1, HD95 0 (both definitions), lesion-wise Dice 1 / HD95 0, sensitivity 1;
- truth empty, prediction not: Dice 0, HD95 = the image diagonal, every predicted component is a false-positive
  lesion (lesion-wise 0 / image diagonal), sensitivity 0;
- prediction empty, truth not: Dice 0, HD95 = the image diagonal, every truth lesion is missed (lesion-wise 0 / image
  diagonal; but 1 / 0 when all truth lesions are below the lesion volume threshold), sensitivity 0.

The image diagonal (``max_distance_mm``) is 373.13 mm for 240 x 240 x 155 volumes at 1 mm: the value the BraTS
2018-2021 evaluation gave a missing region. It is this project's own cap, used for every distance that cannot be
measured, including missed and false-positive lesions; the BraTS 2023 code uses a fixed 374 mm there and the
``brats-evaluation`` parser 373 mm (at most 0.87 mm apart on BraTS volumes; per case, diluted by the lesion count).

Panoptica (the engine of ``brats-evaluation``) is not a dependency: it pins numpy < 2.3 (this project runs numpy 2.4)
and does not compute the 2023 lesion-wise definition (no dilation-based matching, no penalty for unmatched lesions in
its ``sq_dsc``/``sq_hd95``), so that definition is implemented here on numpy/scipy; docs/evaluation.md compares the
two on the demo's predictions.

The training-time val_dice (brats_fl.pipeline.dice_per_region) keeps its own rule on purpose: a region absent from a
case's truth is left out of that region's mean (result_stat/evaluate.py reports both).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from monai.metrics.utils import get_mask_edges, get_surface_distance
from scipy import ndimage

HD_PERCENTILE = 95.0  # linear interpolation between ranks, as numpy's (and so medpy's and panoptica's) percentile

# --- empty-region rules ------------------------------------------------------------------------------------------
# Both empty: Dice 1, HD95 0; one empty: Dice 0. Sources: nnU-Net's re-implementation of the BraTS evaluation
# (MIC-DKFZ/nnUNet, nnunet/dataset_conversion/Task082_BraTS_2020.py, compute_BraTS_dice / compute_BraTS_HD95) and
# the BraTS 2023 code (rachitsaluja/BraTS-2023-Metrics, metrics.py, eval.py in older commits: get_LesionWiseScores,
# full_dice and full_hd95).
DICE_BOTH_EMPTY = 1.0
DICE_ONE_EMPTY = 0.0
HD95_BOTH_EMPTY = 0.0
# One empty: HD95 = the image diagonal (max_distance_mm), 373.13 mm on BraTS volumes; nnU-Net's copy of the BraTS
# 2018-2021 evaluation hard-codes 373.12866. Kept by this project for every unmeasurable distance (see the docstring).
BRATS_IMAGE_DIAGONAL_MM = 373.13  # sqrt(240^2 + 240^2 + 155^2), rounded: what the tables and docs quote

# Sensitivity TP/(TP+FN) and specificity TN/(TN+FP), voxel-wise over the whole image: BraTS 2023 code, metrics.py,
# get_sensitivity_and_specificity (taken from GaNDLF). Its tiny denominator turns 0/0 into 0, except that a region
# empty in both prediction and truth scores sensitivity 1.
SENSITIVITY_BOTH_EMPTY = 1.0
SENSITIVITY_TRUTH_EMPTY = 0.0  # truth empty, prediction not: 0/0 -> 0 in the challenge code
SPECIFICITY_NO_BACKGROUND = 0.0  # truth fills the whole image (no negative voxel): 0/0 -> 0 in the challenge code

# --- lesion-wise (BraTS 2023+, glioma settings) --------------------------------------------------------------------
# Sources: rachitsaluja/BraTS-2023-Metrics metrics.py (get_LesionWiseScores, get_GTseg_combinedByDilation,
# get_LesionWiseResults) and the organisers' description (synapse.org Synapse:syn51156910, discussion thread 10357).
# Two choices are this project's: a matched lesion's HD95 is the official pooled one (the 2023 code used DeepMind's
# surface-distance robust Hausdorff: directed-max, weighted by surfel areas), and unmeasurable distances score the
# image diagonal instead of 374 mm. The official package today (brats-evaluation, config_gli.yaml on panoptica)
# matches differently: one-to-one (maximum bipartite matching on Dice > 1e-6), no dilation, no volume threshold, and
# its lesion-wise Dice and HD95 (sq_dsc, sq_hd95) average matched pairs only, leaving unmatched lesions to its F1.
LESION_CONNECTIVITY = 3  # scipy rank-3 full connectivity = 26 neighbours (2023 code: cc3d connectivity=26)
LESION_DILATION_CONNECTIVITY = 2  # 18 neighbours (2023 code: generate_binary_structure(3, 2))
LESION_DILATION_ITERATIONS = 3  # BraTS-GLI, SSA and PED: 3 ("3x3x3mm dilation"); MEN and MET: 1
LESION_MIN_VOLUME_MM3 = 50.0  # truth lesions of at most this volume are left out of the score (GLI/SSA/MEN/PED)
MISSED_LESION_DICE = 0.0  # a truth lesion no predicted component reaches; its HD95 is the image diagonal
FALSE_POSITIVE_LESION_DICE = 0.0  # a predicted component that reaches no truth lesion; HD95 the image diagonal
NO_SCORED_LESION_DICE = 1.0  # nothing to score (no truth lesion above the volume and no false positive): the 2023 code
NO_SCORED_LESION_HD95 = 0.0  # turns its 0/0 = nan into Dice 1 and HD95 0

SCORE_KINDS = ("dice", "hd95", "hd95_directed", "lesion_dice", "lesion_hd95", "sensitivity", "specificity")
LESION_COUNT_KINDS = ("lesion_tp", "lesion_fn", "lesion_fp")  # detected and missed truth lesions, false positives
SCORE_DEFINITIONS = {  # one line each: what is computed, and why it is reported
    "dice": "2|P∩T| / (|P|+|T|) over the region's voxels; the paper's score and every BraTS year's overlap score",
    "hd95": "95th percentile of the surface distances of both directions pooled, in mm; the official package's "
    "definition (panoptica, as medpy), so tables compare with published BraTS numbers",
    "hd95_directed": "larger of the two directed 95th percentiles, in mm (MONAI's compute_hausdorff_distance); the "
    "HD95 this project reported before, shown on request for comparison; never smaller than HD95",
    "lesion_dice": "BraTS 2023+: truth lesions (26-connected components, merged when within 3 dilations of each "
    "other) matched to the predicted components touching their 3-fold dilation, truth lesions of at most 50 mm^3 "
    "left out, missed and false-positive lesions scoring 0, mean per case; the challenge's ranking score since 2023",
    "lesion_hd95": "BraTS 2023+: the pooled HD95 of each lesion matched as above, missed and false-positive lesions "
    "scoring the image diagonal, mean per case; the challenge's ranking distance since 2023",
    "sensitivity": "TP / (TP+FN) over the image's voxels; BraTS (since 2017) and FeTS report it to expose "
    "under-segmentation",
    "specificity": "TN / (TN+FP) over the image's voxels, background included (hence close to 1); BraTS and FeTS "
    "report it to expose over-segmentation",
}


def _as_bool(mask) -> np.ndarray:
    """Binary view of a mask given as bool, 0/1 integers or 0.0/1.0 floats."""
    array = np.asarray(mask)
    return array if array.dtype == bool else array > 0.5


def _check_pair(prediction: np.ndarray, truth: np.ndarray) -> None:
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction shape {prediction.shape} differs from truth shape {truth.shape}")


def _check_spacing(mask: np.ndarray, spacing: Sequence[float]) -> tuple[float, ...]:
    if len(spacing) != mask.ndim:
        raise ValueError(f"spacing {tuple(spacing)} does not match a {mask.ndim}-D mask")
    return tuple(float(s) for s in spacing)


# --- Dice, sensitivity, specificity --------------------------------------------------------------------------------
def dice_brats(prediction, truth) -> float:
    """Dice of one binary region; 1 when both masks are empty, 0 when exactly one is."""
    pred, true = _as_bool(prediction), _as_bool(truth)
    _check_pair(pred, true)
    n_pred, n_true = int(pred.sum()), int(true.sum())
    if n_pred == 0 and n_true == 0:
        return DICE_BOTH_EMPTY
    if n_pred == 0 or n_true == 0:
        return DICE_ONE_EMPTY
    return 2.0 * int(np.logical_and(pred, true).sum()) / (n_pred + n_true)


def sensitivity_specificity(prediction, truth) -> tuple[float, float]:
    """Voxel-wise (sensitivity, specificity) over the whole image, with the BraTS 2023 code's empty rules."""
    pred, true = _as_bool(prediction), _as_bool(truth)
    _check_pair(pred, true)
    tp = int(np.logical_and(pred, true).sum())
    n_pred, n_true = int(pred.sum()), int(true.sum())
    fp, fn = n_pred - tp, n_true - tp
    tn = pred.size - n_pred - fn
    if n_true == 0:
        sensitivity = SENSITIVITY_BOTH_EMPTY if n_pred == 0 else SENSITIVITY_TRUTH_EMPTY
    else:
        sensitivity = tp / (tp + fn)
    specificity = tn / (tn + fp) if tn + fp > 0 else SPECIFICITY_NO_BACKGROUND
    return float(sensitivity), float(specificity)


# --- Hausdorff distances -------------------------------------------------------------------------------------------
def max_distance_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Diagonal of the image in mm: the HD95 of every distance that cannot be measured (one side empty)."""
    return float(math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing))))


def surface_distance_pair(prediction, truth, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """(prediction -> truth, truth -> prediction): the distance in mm from each surface voxel of one mask to the
    nearest surface voxel of the other. Both masks must be non-empty. MONAI crops to their bounding box first."""
    pred, true = _as_bool(prediction), _as_bool(truth)
    _check_pair(pred, true)
    sampling = _check_spacing(pred, spacing)
    if not pred.any() or not true.any():
        raise ValueError("surface distances need two non-empty masks")
    edges_pred, edges_true = get_mask_edges(pred, true)
    forward = get_surface_distance(edges_pred, edges_true, spacing=sampling)
    backward = get_surface_distance(edges_true, edges_pred, spacing=sampling)
    return np.asarray(forward, dtype=np.float64), np.asarray(backward, dtype=np.float64)


def hausdorff_percentiles(
    prediction, truth, spacing: Sequence[float], percentile: float = HD_PERCENTILE, empty_value: float | None = None
) -> tuple[float, float]:
    """(pooled, directed-max) percentile Hausdorff distances in mm, from one computation of the surface distances.

    pooled: the percentile of both directions' distances together (the official HD95); directed-max: the larger of
    the two directed percentiles. empty_value is what exactly one empty mask scores; default: the image diagonal.
    """
    pred, true = _as_bool(prediction), _as_bool(truth)
    _check_pair(pred, true)
    _check_spacing(pred, spacing)
    has_pred, has_true = bool(pred.any()), bool(true.any())
    if not has_pred and not has_true:
        return HD95_BOTH_EMPTY, HD95_BOTH_EMPTY
    if not has_pred or not has_true:
        value = max_distance_mm(pred.shape, spacing) if empty_value is None else float(empty_value)
        return value, value
    forward, backward = surface_distance_pair(pred, true, spacing)
    pooled = np.percentile(np.concatenate([forward, backward]), percentile)
    directed = max(np.percentile(forward, percentile), np.percentile(backward, percentile))
    return float(pooled), float(directed)


def hausdorff_percentile(
    prediction,
    truth,
    spacing: Sequence[float],
    percentile: float = HD_PERCENTILE,
    empty_value: float | None = None,
    directed_max: bool = False,
) -> float:
    """Percentile Hausdorff distance in mm (the official pooled HD95 by default; directed_max for the larger of the
    two directed percentiles), with the empty-mask rules of this module."""
    pooled, directed = hausdorff_percentiles(prediction, truth, spacing, percentile, empty_value)
    return directed if directed_max else pooled


# --- lesion-wise ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LesionWiseScores:
    """One region's lesion-wise result: the two scores and the counts behind them."""

    dice: float
    hd95: float
    detected: int  # truth lesions above the volume threshold reached by at least one predicted component
    missed: int  # truth lesions above the volume threshold reached by none
    false_positives: int  # predicted components that reach no truth lesion (of any volume)


def _structure(connectivity: int) -> np.ndarray:
    return ndimage.generate_binary_structure(3, connectivity)


def _dilate(mask: np.ndarray) -> np.ndarray:
    return ndimage.binary_dilation(mask, _structure(LESION_DILATION_CONNECTIVITY), LESION_DILATION_ITERATIONS)


def _padded_box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    """Bounding box of the mask's True voxels grown by margin voxels, clipped to the array."""
    coords = np.nonzero(mask)
    return tuple(
        slice(max(int(c.min()) - margin, 0), min(int(c.max()) + margin + 1, n)) for c, n in zip(coords, mask.shape)
    )


def truth_lesions(truth: np.ndarray) -> tuple[np.ndarray, int]:
    """(labels, count) of the truth's lesions: its 26-connected components, those whose dilations touch merged into
    one, so that satellite voxels near a tumour are not separate lesions (2023 code, get_GTseg_combinedByDilation)."""
    dilated_labels, count = ndimage.label(_dilate(truth), _structure(LESION_CONNECTIVITY))
    return np.where(truth, dilated_labels, 0), int(count)


def lesion_wise_scores(prediction, truth, spacing: Sequence[float]) -> LesionWiseScores:
    """BraTS 2023+ lesion-wise Dice and HD95 of one region.

    Each truth lesion (truth_lesions) is matched with every 26-connected predicted component that touches the lesion
    dilated 3 times; a component may match several lesions. A matched lesion scores Dice and HD95 (the official pooled
    definition) against the union of its components; a missed lesion scores Dice 0 and the image diagonal. Lesions of
    at most LESION_MIN_VOLUME_MM3 are left out, but the components they reach are not false positives. Each
    component that reaches no lesion adds a false positive, Dice 0 and the image diagonal. The case's score is the
    mean over scored lesions and false positives; with none of either, Dice 1 and HD95 0.
    """
    pred, true = _as_bool(prediction), _as_bool(truth)
    _check_pair(pred, true)
    _check_spacing(true, spacing)
    penalty = max_distance_mm(true.shape, spacing)
    if not pred.any() and not true.any():
        return LesionWiseScores(NO_SCORED_LESION_DICE, NO_SCORED_LESION_HD95, 0, 0, 0)
    # labelling and dilating in the padded bounding box gives the same components as the whole image, much faster
    box = _padded_box(pred | true, margin=LESION_DILATION_ITERATIONS + 1)
    pred, true = pred[box], true[box]
    lesions, n_lesions = truth_lesions(true)
    components, n_components = ndimage.label(pred, _structure(LESION_CONNECTIVITY))
    voxel_mm3 = float(np.prod(spacing))
    reached: set[int] = set()
    dice_sum = hd95_sum = 0.0
    detected = missed = 0
    for lesion_id in range(1, n_lesions + 1):
        lesion = lesions == lesion_id
        matched = np.unique(components[_dilate(lesion)])
        matched = matched[matched > 0]
        reached.update(int(m) for m in matched)
        if lesion.sum() * voxel_mm3 <= LESION_MIN_VOLUME_MM3:
            continue
        if matched.size == 0:
            missed += 1
            dice_sum += MISSED_LESION_DICE
            hd95_sum += penalty
            continue
        detected += 1
        matched_prediction = np.isin(components, matched)
        dice_sum += dice_brats(matched_prediction, lesion)
        hd95_sum += hausdorff_percentile(matched_prediction, lesion, spacing, empty_value=penalty)
    false_positives = n_components - len(reached)
    scored = detected + missed + false_positives
    if scored == 0:
        return LesionWiseScores(NO_SCORED_LESION_DICE, NO_SCORED_LESION_HD95, 0, 0, 0)
    dice_sum += false_positives * FALSE_POSITIVE_LESION_DICE
    hd95_sum += false_positives * penalty
    return LesionWiseScores(dice_sum / scored, hd95_sum / scored, detected, missed, false_positives)


# --- all regions of a case -----------------------------------------------------------------------------------------
def single_region_scores(prediction, truth, spacing: Sequence[float]) -> dict[str, float]:
    """Every score of SCORE_KINDS and the lesion counts of one binary region, keyed by kind."""
    hd95, hd95_directed = hausdorff_percentiles(prediction, truth, spacing)
    lesions = lesion_wise_scores(prediction, truth, spacing)
    sensitivity, specificity = sensitivity_specificity(prediction, truth)
    return {
        "dice": dice_brats(prediction, truth),
        "hd95": hd95,
        "hd95_directed": hd95_directed,
        "lesion_dice": lesions.dice,
        "lesion_hd95": lesions.hd95,
        "sensitivity": sensitivity,
        "specificity": specificity,
        "lesion_tp": float(lesions.detected),
        "lesion_fn": float(lesions.missed),
        "lesion_fp": float(lesions.false_positives),
    }


def region_scores(
    prediction_regions, truth_regions, spacing: Sequence[float], region_names: Sequence[str] = ("tc", "wt", "et")
) -> dict[str, float]:
    """Flat {<kind>_<region>} for every kind of SCORE_KINDS and LESION_COUNT_KINDS, from region channels (shape
    R x X x Y x Z) of one case and the voxel spacing in mm, plus dice_overall (mean Dice over the regions, as BraTS
    ranks)."""
    pred, true = _as_bool(prediction_regions), _as_bool(truth_regions)
    _check_pair(pred, true)
    if pred.shape[0] != len(region_names):
        raise ValueError(f"expected {len(region_names)} region channels, got {pred.shape[0]}")
    scores: dict[str, float] = {}
    for i, region in enumerate(region_names):
        for kind, value in single_region_scores(pred[i], true[i], spacing).items():
            scores[f"{kind}_{region}"] = value
    scores["dice_overall"] = float(np.mean([scores[f"dice_{r}"] for r in region_names]))
    return scores
