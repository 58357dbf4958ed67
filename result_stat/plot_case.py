"""Picture of one validation case: FLAIR and T1ce through the tumour, ground truth and prediction outlined.

    python -m result_stat.plot_case --workspace /tmp/nvflare/simulation --job_name brats18_4 --output_dir figs
    python -m result_stat.plot_case --prediction evaluation/predictions/brats18_4/Brats18_X_1.nii.gz \\
        --dataset_base_dir /data/MICCAI_BraTS_2018_Data_Training \\
        --datalist_json_path dataset_brats18/datalist/site-All.json

Two rows (FLAIR, T1ce) by three views (axial, coronal, sagittal). Each view cuts through the slice with the most
ground-truth tumour (WT, TC and ET voxels counted together, so the cut goes through the core). Regions are outlined
in one colour each (WT green, TC yellow, ET red): ground truth solid, prediction dashed. Volumes are shown in RAS
orientation (patient's right on the image's right, superior and anterior up), with the voxel aspect ratio honoured.

The prediction comes from --job_name / --checkpoint (the case is run through the clients' pipeline, as
result_stat.evaluate does) or from a label map that ``result_stat.evaluate --save_predictions`` wrote (--prediction).
Either way the outlines are the regions of the predicted label map (ET inside TC inside WT). Writes a PNG
(matplotlib's Agg backend: nothing is shown on screen).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: files only
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

import brats_fl.pipeline as bp  # noqa: E402
from brats_fl.settings import DEFAULT_WORKSPACE, EXIT_BAD_INPUT  # noqa: E402
from result_stat import evaluate as ev  # noqa: E402

SHOWN_MODALITIES = ("flair", "t1ce")
REGION_COLOURS = {"wt": "#2ca02c", "tc": "#ffd21f", "et": "#e8292b"}  # green, yellow, red
# TC and ET share their outer edge in most tumours: TC is drawn first and wider, so it stays visible around ET.
REGION_LINE_WIDTHS = {"tc": 2.6, "wt": 1.4, "et": 1.2}
VIEWS = ("axial", "coronal", "sagittal")
VIEW_AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}  # RAS array axis each view cuts across


class CaseInputError(ValueError):
    """A bad flag or file, reported as one line with exit code 2."""


def to_ras(image: nib.Nifti1Image) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Voxel array in the closest RAS orientation and its voxel size in mm."""
    canonical = nib.as_closest_canonical(image)
    return np.asarray(canonical.dataobj), tuple(float(z) for z in canonical.header.get_zooms()[:3])


def largest_slices(*masks: np.ndarray) -> dict[str, int]:
    """For each view, the slice holding most voxels of the masks together (WT + TC + ET: a slice through the
    tumour core, not just its edema); the first such slice on ties, the middle slice if all masks are empty."""
    total = np.sum([np.asarray(m, dtype=np.int64) for m in masks], axis=0)
    slices = {}
    for view, axis in VIEW_AXIS.items():
        other = tuple(a for a in range(3) if a != axis)
        area = total.sum(axis=other)
        slices[view] = int(np.argmax(area)) if area.any() else total.shape[axis] // 2
    return slices


def cut(volume: np.ndarray, view: str, index: int) -> np.ndarray:
    """2-D slice ready for imshow(origin='lower'): rows run inferior->superior (or posterior->anterior for axial)."""
    return np.take(volume, index, axis=VIEW_AXIS[view]).T


def view_aspect(spacing: tuple[float, float, float], view: str) -> float:
    """Pixel height / width in mm for imshow, so anisotropic voxels keep their true proportions."""
    col_axis, row_axis = (a for a in range(3) if a != VIEW_AXIS[view])
    return spacing[row_axis] / spacing[col_axis]


def display_range(image: np.ndarray) -> tuple[float, float]:
    """1st-99th percentile of the brain (non-zero) voxels: robust to a few very bright voxels."""
    brain = image[image > 0]
    if brain.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(brain, [1, 99])
    return float(low), float(max(high, low + 1e-6))


def region_masks(label_map: np.ndarray, et_label: int) -> dict[str, np.ndarray]:
    """{tc, wt, et: bool mask} of a BraTS label map, via the pipeline's own label convention."""
    regions = bp.labels_to_regions(np.asarray(label_map).astype(np.int64), et_label) > 0.5
    return {name: regions[i] for i, name in enumerate(bp.REGIONS)}


def draw_case(
    images: dict[str, np.ndarray],
    truth: dict[str, np.ndarray],
    prediction: dict[str, np.ndarray],
    spacing: tuple[float, float, float],
    title: str = "",
) -> tuple[plt.Figure, dict[str, int]]:
    """The 2 x 3 figure; returns it with the slice index used for each view.

    Every outline is a matplotlib contour set whose gid is '<truth|prediction>:<region>', so tests can read them.
    """
    shown = truth if truth["wt"].any() else prediction
    slices = largest_slices(shown["wt"], shown["tc"], shown["et"])
    fig, axes = plt.subplots(len(images), len(VIEWS), figsize=(3.0 * len(VIEWS), 3.1 * len(images) + 0.6), dpi=100)
    axes = np.atleast_2d(axes)
    for row, (modality, volume) in enumerate(images.items()):
        vmin, vmax = display_range(volume)
        for col, view in enumerate(VIEWS):
            ax = axes[row, col]
            index = slices[view]
            ax.imshow(
                cut(volume, view, index),
                cmap="gray",
                vmin=vmin,
                vmax=vmax,
                origin="lower",
                aspect=view_aspect(spacing, view),
                interpolation="nearest",
            )
            for source, masks, style in (("truth", truth, "solid"), ("prediction", prediction, "dashed")):
                for region, width in REGION_LINE_WIDTHS.items():
                    plane = cut(masks[region], view, index).astype(np.float32)
                    if plane.any():
                        contours = ax.contour(
                            plane,
                            levels=[0.5],
                            colors=[REGION_COLOURS[region]],
                            linestyles=style,
                            linewidths=width,
                            origin="lower",
                        )
                        contours.set_gid(f"{source}:{region}")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(f"{view} (slice {index})", fontsize=9)
            if col == 0:
                ax.set_ylabel(modality.upper() if modality != "t1ce" else "T1ce", fontsize=10)
    handles = [Line2D([], [], color=c, linewidth=2, label=r.upper()) for r, c in REGION_COLOURS.items()]
    handles += [
        Line2D([], [], color="0.2", linestyle="solid", label="ground truth"),
        Line2D([], [], color="0.2", linestyle="dashed", label="prediction"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig, slices


def find_entry(datalist_path: Path, case_id: str | None) -> dict:
    """The validation entry of case_id (default: the first validation case); training cases are accepted too."""
    datalist = bp.read_datalist(datalist_path)
    if case_id is None:
        return datalist["validation"][0]
    for entry in datalist["validation"] + datalist["training"]:
        if ev.case_id_of(entry["label"]) == case_id:
            return entry
    ids = ", ".join(ev.case_id_of(e["label"]) for e in datalist["validation"][:5])
    raise CaseInputError(f"--case {case_id}: not in {datalist_path}; validation cases include {ids}")


def predict_case(spec: ev.ModelSpec, case_id: str, device, work_dir: Path) -> Path:
    """Run the model on one case through result_stat.evaluate; returns the label map it wrote (the scores it
    prints are those of that label map, which is what the picture shows)."""
    model = ev.load_model(spec.model_path, device)
    result = ev.evaluate_model(
        model,
        spec,
        device,
        use_amp=device.type == "cuda",
        prediction_dir=work_dir,
        case_ids={case_id},
        score_label_maps=True,
    )
    if not result.cases:
        raise CaseInputError(f"--case {case_id} is not a validation case of {spec.datalist_path}")
    return result.cases[0].prediction_file


def load_case(base_dir: Path, entry: dict, prediction_file: Path, et_label: int):
    """(images by modality, truth masks, predicted masks, spacing) in RAS; checks the prediction's grid."""
    image_files = dict(zip(bp.MODALITIES, entry["image"]))
    seg = nib.load(str(base_dir / entry["label"]))
    predicted = nib.load(str(prediction_file))
    if predicted.shape[:3] != seg.shape[:3] or not np.allclose(predicted.affine, seg.affine, atol=1e-3):
        raise CaseInputError(
            f"--prediction {prediction_file}: grid {predicted.shape} differs from {entry['label']} {seg.shape}; "
            "give a label map written by result_stat.evaluate --save_predictions for this case"
        )
    images = {m: to_ras(nib.load(str(base_dir / image_files[m])))[0].astype(np.float32) for m in SHOWN_MODALITIES}
    truth_array, spacing = to_ras(seg)
    return images, region_masks(truth_array, et_label), region_masks(to_ras(predicted)[0], et_label), spacing


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m result_stat.plot_case",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_argument_group("prediction (exactly one of --job_name, --checkpoint, --prediction)")
    src.add_argument(
        "--workspace",
        default=DEFAULT_WORKSPACE,
        help=f"simulator workspace root for --job_name (default: {DEFAULT_WORKSPACE})",
    )
    src.add_argument("--job_name", help="job folder under --workspace; its best_FL_global_model.pt predicts the case")
    src.add_argument("--checkpoint", help="any BratsSegResNet checkpoint file to predict the case with")
    src.add_argument("--prediction", help="a label map written by result_stat.evaluate --save_predictions")
    data = p.add_argument_group("data (default: what the job's sites used)")
    data.add_argument("--dataset_base_dir", help="folder the datalist paths are relative to")
    data.add_argument(
        "--datalist_json_path",
        help="a datalist JSON file listing the case, or a folder of site-N.json files (its site-All.json is used) "
        "(default: the job's; with --dataset_base_dir and no job config: dataset_brats18/datalist/site-All.json)",
    )
    data.add_argument(
        "--case",
        help="case id, e.g. Brats18_TCIA01_201_1 (default: the first validation case; "
        "with --prediction: the case the file is named after)",
    )
    ev.add_infer_roi_size_flag(data)  # with --job_name/--checkpoint
    data.add_argument(
        "--gpu",
        type=int,
        metavar="ID",
        help="run --job_name/--checkpoint inference on GPU ID, i.e. cuda:ID (default: GPU 0 when torch sees CUDA, "
        "else the CPU; CUDA_VISIBLE_DEVICES= forces the CPU)",
    )
    out = p.add_argument_group("output")
    out.add_argument(
        "--output_dir",
        default="figs",
        help="folder the picture case_<case id>.png goes into, created if missing (default: figs, in the "
        "current folder)",
    )
    out.add_argument("--title", help="figure title (default: case id and where the prediction came from)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    ev.quiet_monai_warnings()
    sources = [s for s in (args.job_name, args.checkpoint, args.prediction) if s]
    try:
        if len(sources) != 1:
            raise CaseInputError("give exactly one of --job_name, --checkpoint, --prediction")
        with tempfile.TemporaryDirectory() as work_dir:
            out, title = run(args, Path(work_dir))
    except (CaseInputError, ev.EvaluationInputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"wrote {out} ({title})")
    return 0


def run(args: argparse.Namespace, work_dir: Path) -> tuple[Path, str]:
    """Resolve inputs, predict if needed, draw and save; returns (PNG path, title)."""
    if args.prediction:
        prediction_file = Path(args.prediction)
        if not prediction_file.is_file():
            raise CaseInputError(f"--prediction {prediction_file} not found")
        if not args.dataset_base_dir or not args.datalist_json_path:
            raise CaseInputError(
                "--prediction needs --dataset_base_dir and --datalist_json_path (where the case's scans are)"
            )
        spec = ev.ModelSpec(prediction_file.parent.name, prediction_file)
        case_id = args.case or ev.case_id_of(prediction_file)
    else:
        if args.job_name:
            model_path = ev.JobPaths(Path(args.workspace), args.job_name).best_model
        else:
            model_path = Path(args.checkpoint)
        if not model_path.is_file():
            raise CaseInputError(f"no model at {model_path}; run the job first or check --workspace / --checkpoint")
        spec = ev.ModelSpec(args.job_name or model_path.stem, model_path)
        case_id = args.case
    ev.resolve_data(spec, args.dataset_base_dir, args.datalist_json_path, args.infer_roi_size)
    spec.cache_dir = ev.cache_dir_for(spec, Path(args.workspace), None, no_cache=False)
    entry = find_entry(spec.datalist_path, case_id)
    case_id = ev.case_id_of(entry["label"])
    if not args.prediction:
        prediction_file = predict_case(spec, case_id, ev.select_device(args.gpu), work_dir)
    et_label = bp.datalist_et_label(bp.read_datalist(spec.datalist_path))
    images, truth, predicted, spacing = load_case(spec.dataset_base_dir, entry, prediction_file, et_label)
    title = args.title or f"{case_id}: ground truth vs {spec.label} prediction"
    fig, _ = draw_case(images, truth, predicted, spacing, title)
    out = Path(args.output_dir) / f"case_{case_id}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    plt.close(fig)
    return out, title


if __name__ == "__main__":
    sys.exit(main())
