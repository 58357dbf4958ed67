"""Evaluate trained models on a datalist's validation cases: the paper's results table, per case and per job.

    python -m result_stat.evaluate                     # the paper's jobs found in the default workspace
    python -m result_stat.evaluate --workspace /tmp/nvflare/simulation --job_names brats18_1 brats18_4 brats18_4_dp
    python -m result_stat.evaluate --checkpoint central=/path/to/best_FL_global_model.pt \\
        --dataset_base_dir /data/MICCAI_BraTS_2018_Data_Training \\
        --datalist_json_path dataset_brats18/datalist/site-All.json

Each model (a job's best_FL_global_model.pt, or any checkpoint of BratsSegResNet) runs through the clients' own
pipeline (brats_fl/pipeline.py: transforms, sliding-window inference, thresholds) on GPU 0 when torch sees CUDA
(another with --gpu), else on the CPU.
Scored per case and region TC, WT, ET as the BraTS challenge scores (brats_fl/metrics.py), means over the cases:

  first table, the paper's: Dice per region and overall Dice (the mean of the three);
  second table, per region: HD95, lesion-wise Dice and HD95 (BraTS 2023+), sensitivity, specificity, and with
  --hd95_directed the project's earlier directed-max HD95. The columns' definitions are listed at the end.

Empty regions: empty in prediction and truth scores Dice 1 / HD95 0 / lesion-wise 1 and 0 / sensitivity 1; empty in
one only scores Dice 0 / HD95 = the image diagonal (373.13 mm for BraTS volumes; this project's cap, the BraTS 2023
code uses 374 mm) / lesion-wise 0 and the diagonal / sensitivity 0. Like the paper's pipeline and the training-time
validation, the network's three output channels are scored as they are; with --score_label_maps the regions of the
label map instead (ET inside TC inside WT, as --save_predictions writes it and the BraTS evaluator reads it), which
differs when the channels are not nested. The labels follow the datalist's et_label (ET = 3 for BraTS 2023+).

The Dice that training logs (val_dice) differs in one rule only: a region absent from a case's truth is left out
of that region's mean. It is recomputed too (column "Re-evaluated val_dice"), so the saved best model can be checked
against the value the job logged for its best round.

Outputs in --output_dir: per_case.csv (one row per model and case), summary.md (the tables printed at the end) and,
with --save_predictions, predictions/<configuration>/<case_id>.nii.gz: label maps in BraTS values {0, 1, 2, 4}
(or {0, 1, 2, 3} for BraTS 2023+ datalists) on the original voxel grid with the input's affine.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import brats_fl.pipeline as bp
from brats_fl import metrics as bm
from brats_fl.cache import CaseCache
from brats_fl.evaluation import case_id_of, spacing_of
from brats_fl.job_results import JobPaths, best_round_of, read_round_metrics
from brats_fl.settings import (
    CACHE_FOLDER,
    DEFAULT_WORKSPACE,
    EXIT_BAD_INPUT,
    PAPER_JOB_NAMES,
    SETTINGS_FILE,
    SHIPPED_DATALIST_DIR,
    SettingsError,
    TrainingSettings,
    default,
    roi_size_problem,
)

SHIPPED_DATALIST = SHIPPED_DATALIST_DIR / "site-All.json"
JOB_SETTINGS = Path("custom") / SETTINGS_FILE  # the settings the job's sites used, next to the best model
FIRST_CONV_KEY = "convInit.conv.weight"  # SegResNet's first conv: out-channels = init_filters
SUMMARY_COLUMNS = ("Configuration", "Val Overall Dice", "Val TC Dice", "Val WT Dice", "Val ET Dice")
DETAIL_HEADINGS = {  # second table, per configuration and region: brats_fl.metrics.SCORE_KINDS but Dice
    "hd95": "HD95 (mm)",
    "hd95_directed": "HD95 directed-max (mm)",
    "lesion_dice": "Lesion-wise Dice",
    "lesion_hd95": "Lesion-wise HD95 (mm)",
    "sensitivity": "Sensitivity",
    "specificity": "Specificity",
}
DISTANCE_KINDS = ("hd95", "hd95_directed", "lesion_hd95")  # printed in mm with 2 decimals, the others with 4
CSV_COLUMNS = (
    "configuration",
    "case_id",
    "dice_overall",
    *(f"{kind}_{region}" for kind in bm.SCORE_KINDS + bm.LESION_COUNT_KINDS for region in bp.REGIONS),
    *(f"voxels_truth_{region}" for region in bp.REGIONS),
    *(f"voxels_pred_{region}" for region in bp.REGIONS),
)


class EvaluationInputError(ValueError):
    """A bad flag or file, found before any model runs; reported as one line, exit code 2."""


# ---------------------------------------------------------------------------------------------------------------
# What to evaluate
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class ModelSpec:
    """One model to evaluate and where its validation data comes from."""

    label: str
    model_path: Path
    dataset_base_dir: Path | None = None
    datalist_path: Path | None = None
    infer_roi_size: tuple[int, int, int] | None = None
    job_paths: JobPaths | None = None  # set when the model is a job's best model: its logged metrics are shown
    cache_dir: Path | None = None  # the disk cache of preprocessed cases; None: preprocess every case afresh


@dataclass
class CaseResult:
    case_id: str
    scores: dict[str, float]  # brats_fl.metrics.region_scores: every score of every region
    training_rule_dice: np.ndarray  # brats_fl.pipeline.dice_per_region: nan where the truth of a region is empty
    voxels_truth: tuple[int, int, int]
    voxels_pred: tuple[int, int, int]
    prediction_file: Path | None = None


@dataclass
class ModelResult:
    spec: ModelSpec
    cases: list[CaseResult] = field(default_factory=list)

    def mean(self, key: str) -> float:
        return float(np.mean([c.scores[key] for c in self.cases]))

    def training_rule_metrics(self) -> dict[str, float]:
        """val_dice, val_dice_tc/wt/et exactly as brats_fl.pipeline.evaluate_dice computes them during training."""
        return bp.aggregate_dice([c.training_rule_dice for c in self.cases])


def job_settings(model_path: Path) -> dict:
    """Dataset, datalist and inference size the job's sites used, from the settings shipped with the job (found
    beside the best model). Returns {} for a checkpoint outside a job folder."""
    settings_path = model_path.parent / JOB_SETTINGS
    if not settings_path.is_file():
        return {}
    try:
        settings = TrainingSettings.read(settings_path)
    except SettingsError as e:
        raise EvaluationInputError(f"{e}; give the data flags") from None
    return {
        k: v
        for k, v in vars(settings).items()
        if k in ("dataset_base_dir", "datalist_json_path", "infer_roi_size", "cache_dir") and v is not None
    }


def cache_dir_for(spec: ModelSpec, workspace: Path, cache_dir: str | None, no_cache: bool) -> Path | None:
    """The disk cache of preprocessed cases: --cache_dir, else the one the job's sites filled, else
    <workspace>/preprocessed (where job.py puts it); None with --no_cache."""
    if no_cache:
        return None
    return Path(cache_dir or job_settings(spec.model_path).get("cache_dir") or workspace / CACHE_FOLDER)


def datalist_file(path: Path) -> Path:
    """A datalist JSON; for a folder of site datalists, site-All.json (every site shares the validation cases)."""
    if path.is_dir():
        candidates = [path / "site-All.json", *sorted(path.glob("site-*.json"))]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise EvaluationInputError(
                f"--datalist_json_path {path}: folder holds no site-*.json; give a datalist JSON file"
            )
        return found[0]
    return path


def job_paths_of(model_path: Path) -> JobPaths | None:
    """The simulator job a model file belongs to (<workspace>/<job>/server/simulate_job/app_server/x.pt), if any."""
    resolved = model_path.resolve()
    if len(resolved.parts) < 6 or resolved.parts[-4:-1] != ("server", "simulate_job", "app_server"):
        return None
    return JobPaths(resolved.parents[4], resolved.parents[3].name)


def parse_model_flag(value: str) -> tuple[str, Path]:
    """'LABEL=PATH' or 'PATH' (label: the job folder name for a simulator workspace path, else the file stem)."""
    label, sep, path = value.partition("=")
    if not sep or Path(value).is_file():  # a bare path, possibly with '=' in it
        path, label = value, ""
    model_path = Path(path)
    if not label:
        job = job_paths_of(model_path)
        label = job.job_name if job else model_path.stem
    return label, model_path


def paper_jobs_run(workspace: Path, log=print) -> list[str]:
    """The paper's configurations (job.py's default job names) that have a best model under workspace."""
    found = []
    for job in PAPER_JOB_NAMES:
        if JobPaths(workspace, job).best_model.is_file():
            found.append(job)
        else:
            log(f"skipping {job}: not run (no best model under {workspace / job})")
    if not found:
        raise EvaluationInputError(
            f"none of {', '.join(PAPER_JOB_NAMES)} has a best model under --workspace {workspace}; run job.py "
            "first, or give --job_names or --checkpoint"
        )
    return found


def build_specs(args: argparse.Namespace) -> list[ModelSpec]:
    """Every model to evaluate, with its data settings resolved; raises EvaluationInputError on the first problem."""
    specs = []
    workspace = Path(args.workspace)
    job_names = args.job_names
    if not job_names and not args.checkpoint:
        job_names = paper_jobs_run(workspace)
    for job in job_names or []:
        paths = JobPaths(workspace, job)
        if not paths.best_model.is_file():
            raise EvaluationInputError(
                f"--job_names {job}: no best model at {paths.best_model}; run the job first (python job.py "
                f"--workspace {workspace} ...) or check --workspace"
            )
        specs.append(ModelSpec(job, paths.best_model, job_paths=paths))
    for value in args.checkpoint or []:
        label, path = parse_model_flag(value)
        if not path.is_file():
            raise EvaluationInputError(f"--checkpoint {value}: model file {path} not found")
        specs.append(ModelSpec(label, path, job_paths=job_paths_of(path)))
    labels = [s.label for s in specs]
    duplicated = sorted({x for x in labels if labels.count(x) > 1})
    if duplicated:
        raise EvaluationInputError(f"configuration names {duplicated} appear twice; name models as LABEL=PATH")
    for spec in specs:
        resolve_data(spec, args.dataset_base_dir, args.datalist_json_path, args.infer_roi_size)
        spec.cache_dir = cache_dir_for(spec, workspace, args.cache_dir, args.no_cache)
    return specs


def resolve_data(
    spec: ModelSpec, dataset_base_dir: str | None, datalist: str | None, infer_roi_size: list[int] | None
) -> None:
    """Fill in the spec's data settings. Flags win; otherwise what the job's clients used; otherwise (datalist
    only) the shipped paper split. Checks that every validation file exists."""
    from dataset_brats18.datalist import DatalistError, load_datalist, missing_files

    job_args = job_settings(spec.model_path)
    base = dataset_base_dir or job_args.get("dataset_base_dir")
    if base is None:
        raise EvaluationInputError(
            f"{spec.label}: no --dataset_base_dir given and {spec.model_path} has no job config beside it; "
            "pass --dataset_base_dir (the folder datalist paths are relative to)"
        )
    spec.dataset_base_dir = Path(base)
    if not spec.dataset_base_dir.is_dir():
        raise EvaluationInputError(f"--dataset_base_dir {spec.dataset_base_dir} does not exist ({spec.label})")
    if datalist:
        spec.datalist_path = datalist_file(Path(datalist))
    elif "datalist_json_path" in job_args:
        spec.datalist_path = datalist_file(Path(job_args["datalist_json_path"]))
    else:
        spec.datalist_path = SHIPPED_DATALIST
    try:
        content = load_datalist(spec.datalist_path)
    except DatalistError as e:
        raise EvaluationInputError(f"--datalist_json_path: {e}") from None
    missing = missing_files(content["validation"], spec.dataset_base_dir)
    if missing:
        raise EvaluationInputError(
            f"{len(missing)} validation file(s) of {spec.datalist_path} are missing under {spec.dataset_base_dir}, "
            f"e.g. {missing[0]}; check --dataset_base_dir and --datalist_json_path"
        )
    roi = infer_roi_size or job_args.get("infer_roi_size") or default("infer_roi_size")
    problem = roi_size_problem(roi, "--infer_roi_size")
    if problem:
        raise EvaluationInputError(problem)
    spec.infer_roi_size = tuple(int(s) for s in roi)


# ---------------------------------------------------------------------------------------------------------------
# Model and inference
# ---------------------------------------------------------------------------------------------------------------
def load_state_dict(model_path: Path) -> dict[str, torch.Tensor]:
    """Weights of a checkpoint, loaded safely (weights_only=True): an NVFlare persistor dict {"model": ...} or a
    plain state dict."""
    try:
        checkpoint = torch.load(model_path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and weights_only errors come in several types
        raise EvaluationInputError(f"cannot load {model_path} as a weights-only torch checkpoint: {e}") from None
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or FIRST_CONV_KEY not in state:
        raise EvaluationInputError(f"{model_path} holds no BratsSegResNet weights (no '{FIRST_CONV_KEY}')")
    return {k: torch.as_tensor(v) for k, v in state.items()}


def infer_init_filters(state: dict[str, torch.Tensor]) -> int:
    """SegResNet's base width, read from the first convolution's output channels."""
    return int(state[FIRST_CONV_KEY].shape[0])


def load_model(model_path: Path, device: torch.device) -> torch.nn.Module:
    from model import BratsSegResNet

    state = load_state_dict(model_path)
    model = BratsSegResNet(init_filters=infer_init_filters(state))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise EvaluationInputError(f"{model_path} does not match BratsSegResNet: {str(e).splitlines()[0]}") from None
    return model.to(device).eval()


nested_regions = bp.nested_regions  # kept under its old name: the tests and older scripts call it from here


def save_label_map(prediction, label_item, preprocess, label_path: Path, et_label: int, out_path: Path) -> None:
    """Write a predicted TC/WT/ET tensor as a BraTS label map on the label's grid, with its affine
    (brats_fl.pipeline.save_label_map, the label as the reference)."""
    bp.save_label_map(prediction, label_item, preprocess, "label", label_path, et_label, out_path)


def evaluate_model(
    model: torch.nn.Module,
    spec: ModelSpec,
    device: torch.device,
    use_amp: bool = False,
    prediction_dir: Path | None = None,
    log=print,
    case_ids: set[str] | None = None,
    score_label_maps: bool = False,
) -> ModelResult:
    """Run the clients' validation pipeline on every validation case (or those named in case_ids) and score it
    both ways. BraTS metrics score the network's TC/WT/ET channels, or with score_label_maps the regions of the
    label map written for the case (nested, see nested_regions)."""
    from monai.data import decollate_batch

    datalist = bp.read_datalist(spec.datalist_path)
    et_label = bp.datalist_et_label(datalist)
    entries = bp.resolve_entries(datalist["validation"], spec.dataset_base_dir)
    if case_ids is not None:
        entries = [e for e in entries if case_id_of(e["label"]) in case_ids]
    cache = CaseCache(spec.cache_dir) if spec.cache_dir else None
    dataset = bp.make_dataset(entries, bp.validation_steps(et_label), cache, et_label=et_label)
    loader = bp.make_loader(dataset, shuffle=False)
    result = ModelResult(spec)
    model.eval()
    for batch in loader:
        prediction = bp.predict_regions(model, batch["image"].to(device), spec.infer_roi_size, use_amp=use_amp)
        items = decollate_batch(batch)
        for b, item in enumerate(items):
            label = item["label"]
            truth = np.asarray(label.detach().cpu()) > 0.5
            pred = np.asarray(prediction[b].detach().cpu()) > 0.5
            if score_label_maps:
                pred = nested_regions(pred, et_label)
            case = CaseResult(
                case_id=case_id_of(label.meta.get("filename_or_obj", f"case{len(result.cases)}")),
                scores=bm.region_scores(pred, truth, spacing_of(label), bp.REGIONS),
                training_rule_dice=bp.dice_per_region(prediction[b], batch["label"][b]),
                voxels_truth=tuple(int(v) for v in truth.reshape(3, -1).sum(axis=1)),
                voxels_pred=tuple(int(v) for v in pred.reshape(3, -1).sum(axis=1)),
            )
            if prediction_dir is not None:
                case.prediction_file = prediction_dir / f"{case.case_id}.nii.gz"
                save_label_map(
                    prediction[b],
                    label,
                    dataset.preprocess,
                    Path(label.meta["filename_or_obj"]),
                    et_label,
                    case.prediction_file,
                )
            result.cases.append(case)
            log(f"  {spec.label} {case.case_id}: {case_line(case.scores)}")
    return result


# ---------------------------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------------------------
def markdown_table(header: tuple[str, ...] | list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def case_line(scores: dict[str, float]) -> str:
    """One case's Dice, HD95 and lesion-wise Dice per region, for the progress log."""
    return "; ".join(
        f"{r.upper()} Dice {scores[f'dice_{r}']:.4f} HD95 {scores[f'hd95_{r}']:.2f} mm "
        f"lesion-wise Dice {scores[f'lesion_dice_{r}']:.4f}"
        for r in bp.REGIONS
    )


def summary_row(result: ModelResult) -> list[str]:
    """The paper's table: overall Dice and Dice per region."""
    return [result.spec.label, *(f"{result.mean(k):.4f}" for k in ("dice_overall", "dice_tc", "dice_wt", "dice_et"))]


def detail_kinds(hd95_directed: bool) -> tuple[str, ...]:
    """The score kinds of the second table, in brats_fl.metrics.SCORE_KINDS order; directed-max HD95 on request."""
    return tuple(k for k in bm.SCORE_KINDS if k in DETAIL_HEADINGS and (hd95_directed or k != "hd95_directed"))


def detail_rows(result: ModelResult, kinds: tuple[str, ...]) -> list[list[str]]:
    """The second table's rows of one configuration: one per region, the mean over cases of each kind."""
    rows = []
    for region in bp.REGIONS:
        cells = [f"{result.mean(f'{k}_{region}'):.{2 if k in DISTANCE_KINDS else 4}f}" for k in kinds]
        rows.append([result.spec.label, region.upper(), *cells])
    return rows


def definitions_text(kinds: tuple[str, ...]) -> str:
    """One line per column: what it computes and why (brats_fl.metrics.SCORE_DEFINITIONS)."""
    names = {"dice": "Dice", **DETAIL_HEADINGS}
    lines = [f"- {names[k]}: {bm.SCORE_DEFINITIONS[k]}." for k in ("dice", *kinds)]
    return "\n".join(textwrap.fill(line, 116, subsequent_indent="  ", break_on_hyphens=False) for line in lines)


def logged_best(spec: ModelSpec) -> tuple[int, float] | None:
    """(best round, val_dice the job logged for it), when the model is a job's best model with round metrics."""
    if spec.job_paths is None or not spec.job_paths.round_metrics.is_file():
        return None
    rounds = read_round_metrics(spec.job_paths.round_metrics)
    best = best_round_of(rounds)
    value = next((r.metrics.get("val_dice", math.nan) for r in rounds if r.round == best), math.nan)
    return (best, value) if best >= 0 else None


def check_row(result: ModelResult) -> list[str]:
    logged = logged_best(result.spec)
    recomputed = result.training_rule_metrics()["val_dice"]
    return [
        result.spec.label,
        str(len(result.cases)),
        str(logged[0]) if logged else "-",
        f"{logged[1]:.4f}" if logged else "-",
        f"{recomputed:.4f}",
    ]


def render_summary(results: list[ModelResult], score_label_maps: bool = False, hd95_directed: bool = False) -> str:
    kinds = detail_kinds(hd95_directed)
    main_table = markdown_table(SUMMARY_COLUMNS, [summary_row(r) for r in results])
    detail_table = markdown_table(
        ("Configuration", "Region", *(DETAIL_HEADINGS[k] for k in kinds)),
        [row for r in results for row in detail_rows(r, kinds)],
    )
    check_table = markdown_table(
        ("Configuration", "Cases", "Best round", "Logged val_dice", "Re-evaluated val_dice"),
        [check_row(r) for r in results],
    )
    return (
        f"Validation results of the {'label maps (nested regions)' if score_label_maps else 'network channels'}, "
        "BraTS conventions (mean over cases; empty region in prediction and truth: Dice 1; in one only: Dice 0):\n\n"
        f"{main_table}\n\n"
        "Distances, lesion-wise scores (BraTS 2023+), sensitivity and specificity (mean over cases). A distance that "
        "cannot be measured (a region empty in prediction or truth only, a missed or a false-positive lesion) is the "
        f"image diagonal, {bm.BRATS_IMAGE_DIAGONAL_MM} mm on BraTS volumes: this project's cap, where the BraTS 2023 "
        "code uses 374 mm:\n\n"
        f"{detail_table}\n\n"
        f"{definitions_text(kinds)}\n\n"
        "Training-time rule (regions absent from a case's truth left out), to compare with the job's log:\n\n"
        f"{check_table}\n"
    )


def write_per_case_csv(results: list[ModelResult], path: Path) -> None:
    """Every score of every case: the columns of CSV_COLUMNS."""
    score_keys = CSV_COLUMNS[2 : -2 * len(bp.REGIONS)]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for result in results:
            for case in result.cases:
                writer.writerow(
                    [
                        result.spec.label,
                        case.case_id,
                        *(csv_value(key, case.scores[key]) for key in score_keys),
                        *case.voxels_truth,
                        *case.voxels_pred,
                    ]
                )


def csv_value(key: str, value: float) -> str:
    """Distances in mm with 4 decimals, lesion counts as integers, ratios with 6 decimals."""
    if key.startswith(tuple(f"{k}_" for k in bm.LESION_COUNT_KINDS)):
        return str(int(value))
    if key.startswith(tuple(f"{k}_" for k in DISTANCE_KINDS)):
        return f"{value:.4f}"
    return f"{value:.6f}"


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------
def add_infer_roi_size_flag(parser) -> None:
    """--infer_roi_size, as every command that runs the model takes it (evaluate, predict, export_bundle, plot_case)."""
    parser.add_argument(
        "--infer_roi_size",
        type=int,
        nargs=3,
        metavar=("X", "Y", "Z"),
        help="sliding-window size, multiples of 8 (default: the job's when the model lies in a job folder, else "
        f"{' '.join(map(str, default('infer_roi_size')))})",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m result_stat.evaluate",
        description=__doc__,
        epilog="Columns (brats_fl/metrics.py; docs/evaluation.md says more):\n" + definitions_text(detail_kinds(True)),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = p.add_argument_group("models (default: the paper's jobs found under --workspace)")
    what.add_argument(
        "--workspace",
        default=DEFAULT_WORKSPACE,
        help=f"simulator workspace root that the jobs are in (default: {DEFAULT_WORKSPACE})",
    )
    what.add_argument(
        "--job_names",
        nargs="+",
        metavar="JOB",
        help="job folder names under --workspace; each job's best model "
        "(server/simulate_job/app_server/best_FL_global_model.pt) is evaluated (default, when "
        f"--checkpoint is not given either: those of {', '.join(PAPER_JOB_NAMES)} that were run)",
    )
    what.add_argument(
        "--checkpoint",
        nargs="+",
        metavar="[LABEL=]PATH",
        help="one or more BratsSegResNet checkpoint files (NVFlare persistor dict or plain state dict), evaluated "
        "besides any --job_names; LABEL names a checkpoint's row (default LABEL: the job folder for a path inside "
        "a workspace, else the file name) (default: none)",
    )
    data = p.add_argument_group("data (default: what each job's sites used, read from the job's brats_settings.json)")
    data.add_argument("--dataset_base_dir", help="folder the datalist paths are relative to")
    data.add_argument(
        "--datalist_json_path",
        help="a datalist JSON file whose 'validation' cases are evaluated, or a folder of site-N.json files "
        "(its site-All.json is used) (default: the job's; with --dataset_base_dir and no job config: "
        "dataset_brats18/datalist/site-All.json)",
    )
    run = p.add_argument_group("inference")
    add_infer_roi_size_flag(run)
    run.add_argument(
        "--cache_dir",
        help="disk cache of preprocessed cases (default: the one the job's sites used, else "
        f"<workspace>/{CACHE_FOLDER}); cases it lacks are added",
    )
    run.add_argument("--no_cache", action="store_true", help="preprocess every case afresh instead")
    run.add_argument(
        "--gpu",
        type=int,
        metavar="ID",
        help="run on GPU ID, i.e. cuda:ID (default: GPU 0 when torch sees CUDA, else the CPU; "
        "CUDA_VISIBLE_DEVICES= forces the CPU)",
    )
    run.add_argument(
        "--no_amp", action="store_true", help="turn mixed precision off on CUDA (on by default there, as in training)"
    )
    out = p.add_argument_group("outputs")
    out.add_argument(
        "--output_dir", help="where per_case.csv, summary.md and predictions/ go (default: <workspace>/evaluation)"
    )
    out.add_argument(
        "--save_predictions",
        action="store_true",
        help="also write each case's predicted label map as NIfTI (BraTS label values, input's affine)",
    )
    out.add_argument(
        "--score_label_maps",
        action="store_true",
        help="score the label maps' nested regions (ET in TC in WT) instead of the network's channels: "
        "what the BraTS evaluator gives for the --save_predictions files",
    )
    out.add_argument(
        "--hd95_directed",
        action="store_true",
        help="add the directed-max HD95 (the larger of the two directed 95th percentiles: the HD95 this project "
        "reported before) to the second table, next to the official pooled HD95; per_case.csv always has both",
    )
    return p


def select_device(gpu: int | None) -> torch.device:
    """--gpu ID: cuda:ID, checked; without it GPU 0 when torch sees CUDA, else the CPU."""
    if gpu is None:
        return bp.select_device()
    if not torch.cuda.is_available():
        raise EvaluationInputError(f"--gpu {gpu}: torch sees no CUDA device; leave --gpu out to run on the CPU")
    count = torch.cuda.device_count()
    if not 0 <= gpu < count:
        raise EvaluationInputError(f"--gpu {gpu}: torch sees {count} CUDA device(s), ids 0 to {count - 1}")
    return torch.device(f"cuda:{gpu}")


def quiet_monai_warnings() -> None:
    """MONAI's deprecation notices about its own defaults say nothing actionable to a user of this script."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"monai\.")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_monai_warnings()
    try:
        specs = build_specs(args)
        device = select_device(args.gpu)
        output_dir = Path(args.output_dir) if args.output_dir else Path(args.workspace) / "evaluation"
        output_dir.mkdir(parents=True, exist_ok=True)
        models = [load_model(s.model_path, device) for s in specs]
    except EvaluationInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as e:
        print(f"error: cannot create --output_dir: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    use_amp = device.type == "cuda" and not args.no_amp
    results = []
    for spec, model in zip(specs, models):
        print(
            f"Evaluating {spec.label}: {spec.model_path} on the validation cases of {spec.datalist_path} "
            f"({device}, window {'x'.join(map(str, spec.infer_roi_size))})",
            flush=True,
        )
        prediction_dir = output_dir / "predictions" / spec.label if args.save_predictions else None
        results.append(
            evaluate_model(model, spec, device, use_amp, prediction_dir, score_label_maps=args.score_label_maps)
        )
    summary = render_summary(results, args.score_label_maps, args.hd95_directed)
    write_per_case_csv(results, output_dir / "per_case.csv")
    (output_dir / "summary.md").write_text(summary)
    print()
    print(summary)
    print(
        f"Wrote {output_dir / 'per_case.csv'} and {output_dir / 'summary.md'}"
        + (f" and label maps under {output_dir / 'predictions'}" if args.save_predictions else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
