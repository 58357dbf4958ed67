"""Scoring a model case by case, the same way at a site (the final evaluation) as in result_stat.evaluate.

Each case goes through the validation pipeline and sliding-window inference; its network channels (TC, WT, ET) are
scored with :func:`brats_fl.metrics.region_scores`. The per-case scores of every site make the results table: each
site's mean, and the mean over every case scored.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

# The columns of the results table: the paper's Dice, and the challenge's HD95 (brats_fl/metrics.py says how).
TABLE_SCORES = ("dice_overall", "dice_tc", "dice_wt", "dice_et", "hd95_tc", "hd95_wt", "hd95_et")
POOLED = "all sites"
CASES_KEY = "cases"  # the metrics key under which a site sends its per-case scores to the server


def case_id_of(label_path: str | Path) -> str:
    """The case id from its label file name (BraTS: <id>_seg.nii.gz)."""
    name = Path(label_path).name
    for suffix in (".nii.gz", ".nii"):
        name = name.removesuffix(suffix)
    return name.removesuffix("_seg")


def spacing_of(meta_tensor) -> tuple[float, ...]:
    """Voxel size in mm of a (channel-first) MONAI MetaTensor, from its affine."""
    affine = np.asarray(meta_tensor.affine, dtype=np.float64)
    return tuple(float(v) for v in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))


def score_cases(model, loader, device, infer_roi_size: Sequence[int], use_amp: bool = False) -> dict[str, dict]:
    """{case id: scores} of a model over a loader of validation cases (batch size 1)."""
    import torch
    from monai.data import decollate_batch

    import brats_fl.pipeline as bp
    from brats_fl.metrics import region_scores

    model.eval()
    scores = {}
    with torch.no_grad():
        for batch in loader:
            prediction = bp.predict_regions(model, batch["image"].to(device), infer_roi_size, use_amp=use_amp)
            for b, item in enumerate(decollate_batch(batch)):
                label = item["label"]
                truth = np.asarray(label.detach().cpu()) > 0.5
                pred = np.asarray(prediction[b].detach().cpu()) > 0.5
                case = case_id_of(label.meta.get("filename_or_obj", f"case{len(scores)}"))
                scores[case] = region_scores(pred, truth, spacing_of(label), bp.REGIONS)
    return scores


def checkpoint_problem(path: Path, model) -> str | None:
    """Why the checkpoint cannot be scored with model (unreadable, weights of other names or shapes), or None."""
    import torch

    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(data.get("model", data) if isinstance(data, dict) else data)
    except Exception as e:  # unreadable, or weights of another shape
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        return lines[1] if len(lines) > 1 and lines[0].endswith(":") else lines[0]
    return None


def mean_scores(cases: dict[str, dict]) -> dict[str, float]:
    return {k: float(np.mean([c[k] for c in cases.values()])) for k in TABLE_SCORES}


def table_rows(per_site: dict[str, dict[str, dict]]) -> list[tuple[str, int, dict[str, float]]]:
    """(site, number of cases, mean scores) per site, then the same over every case of every site."""
    rows = [(site, len(cases), mean_scores(cases)) for site, cases in sorted(per_site.items())]
    pooled = {f"{site}/{case}": s for site, cases in per_site.items() for case, s in cases.items()}
    if len(per_site) > 1:
        rows.append((POOLED, len(pooled), mean_scores(pooled)))
    return rows


def heading(score: str) -> str:
    """'dice_tc' -> 'TC Dice', 'hd95_et' -> 'ET HD95 (mm)', 'dice_overall' -> 'Overall Dice'."""
    kind, region = score.split("_", 1)
    return f"{region.upper() if region != 'overall' else 'Overall'} {'Dice' if kind == 'dice' else 'HD95 (mm)'}"


def render_table(per_site: dict[str, dict[str, dict]]) -> str:
    """Markdown: per site (and over all sites) the mean of each table score over its cases."""
    header = ["Site", "Cases", *(heading(k) for k in TABLE_SCORES)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for site, n, means in table_rows(per_site):
        values = [f"{means[k]:.4f}" if k.startswith("dice") else f"{means[k]:.2f}" for k in TABLE_SCORES]
        lines.append("| " + " | ".join([site, str(n), *values]) + " |")
    return "\n".join(lines)


def write_results(per_site: dict[str, dict[str, dict]], markdown_path: Path, csv_path: Path) -> None:
    """The table (markdown) and every case's every score (CSV)."""
    markdown_path.write_text(render_table(per_site) + "\n")
    keys = sorted({k for cases in per_site.values() for s in cases.values() for k in s})
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["site", "case_id", *keys])
        for site, cases in sorted(per_site.items()):
            for case, s in sorted(cases.items()):
                writer.writerow([site, case, *(f"{s[k]:.6f}" if math.isfinite(s[k]) else s[k] for k in keys)])
