"""Export a trained model as a MONAI bundle, to run with MONAI's own runner where this project is not installed.

    python -m result_stat.export_bundle --model <job>/server/simulate_job/app_server/best_FL_global_model.pt \\
        --output_dir brats_segresnet_bundle
    python -m monai.bundle run --config_file brats_segresnet_bundle/configs/inference.json \\
        --bundle_root brats_segresnet_bundle --dataset_dir /data/new_cases --output_dir /data/segmented

The bundle folder holds configs/metadata.json (inputs, outputs, label values, the training job, its Dice, and the
privacy mechanism and epsilon it was trained under, read from the job folder when the model lies in one),
configs/inference.json (MONAI's SegResNet with this model's architecture; the project's inference: channels t1ce,
t1, t2, flair, RAS at 1 mm, per-channel normalisation over non-zero voxels, sliding window, sigmoid >= 0.5, back to
the case's grid, BraTS label values), models/model.pt (the weights, a plain state dict), scripts/ (finding the cases
and writing the label map; MONAI and PyTorch only) and docs/README.md. Its label maps equal result_stat.predict's
for the same model (up to voxels whose probability is exactly 0.5).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import brats_fl.pipeline as bp
from brats_fl.job_results import JobPaths, read_round_metrics
from brats_fl.settings import EXIT_BAD_INPUT, EXIT_OK, SettingsError, TrainingSettings
from result_stat.evaluate import (
    EvaluationInputError,
    add_infer_roi_size_flag,
    job_paths_of,
    load_model,
    logged_best,
    quiet_monai_warnings,
)

SCRIPTS_SOURCE = Path(__file__).resolve().parent / "bundle_scripts" / "brats_inference.py"
SCHEMA_URL = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
SCHEMA_REQUIRED = (  # the fields MONAI's metadata schema (meta_schema_20240725) requires at the top level
    "schema",
    "version",
    "monai_version",
    "pytorch_version",
    "numpy_version",
    "required_packages_version",
    "task",
    "description",
    "authors",
    "copyright",
    "network_data_format",
)
TENSOR_REQUIRED = ("type", "format", "num_channels", "spatial_shape", "dtype", "value_range")  # each input/output
MODEL_ARGUMENTS = (
    "spatial_dims",
    "init_filters",
    "in_channels",
    "out_channels",
    "dropout_prob",
    "blocks_down",
    "blocks_up",
)
LABEL_NAMES = {0: "background", 1: "necrotic and non-enhancing tumour core", 2: "peritumoral edema"}


# ---------------------------------------------------------------------------------------------------------------
# What the job says about the model
# ---------------------------------------------------------------------------------------------------------------
def training_record(model_path: Path) -> dict:
    """The training job of a job's best model: its name, best round and Dice, final evaluation and privacy; for a
    checkpoint outside a job folder, only where it came from."""
    job = job_paths_of(model_path)
    if job is None:
        return {"checkpoint": str(model_path.resolve()), "job": None, "privacy": {"mechanism": None}}
    record = {"checkpoint": str(model_path.resolve()), "job": job.job_name, "workspace": str(job.workspace_root)}
    if job.round_metrics.is_file():
        best = logged_best_metrics(job)
        if best:
            record.update(best)
    settings = job_training_settings(job)
    record["privacy"] = privacy_record(job, settings)
    if settings is not None:
        record["num_rounds"] = settings.num_rounds
    return record


def logged_best_metrics(job: JobPaths) -> dict:
    """The best round and the validation Dice (overall, TC, WT, ET) the job logged for it."""
    from result_stat.evaluate import ModelSpec

    best = logged_best(ModelSpec(job.job_name, job.best_model, job_paths=job))
    if best is None:
        return {}
    metrics = next(r.metrics for r in read_round_metrics(job.round_metrics) if r.round == best[0])
    return {"best_round": best[0], "val_dice": {k: round(v, 6) for k, v in sorted(metrics.items()) if "dice" in k}}


def job_training_settings(job: JobPaths) -> TrainingSettings | None:
    if not job.settings_file.is_file():
        return None
    try:
        return TrainingSettings.read(job.settings_file)
    except SettingsError:
        return None


def privacy_record(job: JobPaths, settings: TrainingSettings | None) -> dict:
    """The mechanism the sites trained under and the epsilon they spent (privacy_report.json), or none."""
    mechanism = settings.dp_mechanism if settings is not None else None
    if not mechanism:
        return {"mechanism": None, "note": "trained without differential privacy"}
    record: dict = {"mechanism": mechanism}
    if job.privacy_report.is_file():
        report = json.loads(job.privacy_report.read_text())
        record["epsilon"] = report.get("max_epsilon")
        deltas = sorted({s.get("delta", 0.0) for s in report.get("sites", {}).values()})
        record["delta"] = deltas[-1] if deltas else None
        record["guarantee"] = report.get("guarantee")
        record["report"] = str(job.privacy_report)
    return record


def job_et_label(model_path: Path) -> int:
    """ET label of the datalist the job trained on (3 for BraTS 2023+ data), else BraTS 2017-2021's 4."""
    job = job_paths_of(model_path)
    settings = job_training_settings(job) if job else None
    datalist = getattr(settings, "datalist_json_path", None) if settings else None
    if datalist:
        path = Path(datalist)
        path = path / "site-All.json" if path.is_dir() else path
        if path.is_file():
            return bp.datalist_et_label(bp.read_datalist(path))
    return bp.ET_LABEL_BRATS2017


# ---------------------------------------------------------------------------------------------------------------
# The bundle's files
# ---------------------------------------------------------------------------------------------------------------
def network_definition(model: torch.nn.Module) -> dict:
    """MONAI's own SegResNet with the architecture of the trained model (BratsSegResNet keeps every argument)."""
    arguments = {name: getattr(model, name) for name in MODEL_ARGUMENTS}
    arguments = {k: list(v) if isinstance(v, tuple) else v for k, v in arguments.items()}
    return {"_target_": "SegResNet", **arguments}


def inference_config(model: torch.nn.Module, infer_roi_size: tuple[int, int, int], et_label: int) -> dict:
    """configs/inference.json: the project's inference (brats_fl/pipeline.py) in MONAI's config language."""
    return {
        "imports": ["$import glob", "$import os", "$import torch", "$import scripts"],
        "bundle_root": ".",
        "dataset_dir": "/workspace/data/brats_cases",
        "output_dir": "$@bundle_root + '/eval'",
        "et_label": et_label,
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "datalist": "$scripts.brats_inference.find_cases(@dataset_dir)",
        "network_def": network_definition(model),
        "network": "$@network_def.to(@device)",
        "checkpoint": "$os.path.join(@bundle_root, 'models', 'model.pt')",
        "load_weights": "$@network.load_state_dict(torch.load(@checkpoint, map_location=@device, weights_only=True))",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "image", "image_only": True},
                {"_target_": "EnsureChannelFirstd", "keys": "image"},
                {"_target_": "EnsureTyped", "keys": "image", "dtype": "$torch.float32"},
                {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
                {"_target_": "Spacingd", "keys": "image", "pixdim": [1.0, 1.0, 1.0], "mode": "bilinear"},
                {"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": True, "channel_wise": True},
            ],
        },
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "dataloader": {
            "_target_": "DataLoader",
            "dataset": "@dataset",
            "batch_size": 1,
            "shuffle": False,
            "num_workers": 0,
        },
        "inferer": {
            "_target_": "SlidingWindowInferer",
            "roi_size": list(infer_roi_size),
            "sw_batch_size": 1,
            "overlap": 0.5,
        },
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "Activationsd", "keys": "pred", "sigmoid": True},
                {"_target_": "AsDiscreted", "keys": "pred", "threshold": 0.5},
                {
                    "_target_": "Invertd",
                    "keys": "pred",
                    "transform": "@preprocessing",
                    "orig_keys": "image",
                    "nearest_interp": True,
                    "to_tensor": True,
                },
                {
                    "_target_": "Lambdad",
                    "keys": "pred",
                    "func": "$lambda x: scripts.brats_inference.regions_to_labels(x, @et_label)",
                },
                {
                    "_target_": "SaveImaged",
                    "keys": "pred",
                    "output_dir": "@output_dir",
                    "output_postfix": "",
                    "output_ext": ".nii.gz",
                    "output_dtype": "$torch.uint8",
                    "resample": False,
                    "separate_folder": False,
                    "output_name_formatter": "$scripts.brats_inference.case_id_name",
                    "print_log": False,
                },
            ],
        },
        "run": [
            "$@load_weights",
            "$scripts.brats_inference.segment(@network, @dataloader, @inferer, @postprocessing, @device)",
        ],
    }


def network_data_format(infer_roi_size: tuple[int, int, int], et_label: int) -> dict:
    """Inputs and outputs as MONAI's metadata schema describes them, with the label values written."""
    labels = {**{str(k): v for k, v in LABEL_NAMES.items()}, str(et_label): "enhancing tumour"}
    return {
        "inputs": {
            "image": {
                "type": "image",
                "format": "magnitude",
                "modality": "MR",
                "num_channels": 4,
                "spatial_shape": list(infer_roi_size),
                "dtype": "float32",
                "value_range": [],
                "is_patch_data": True,
                "channel_def": {str(i): m.upper() for i, m in enumerate(bp.MODALITIES)},
            }
        },
        "outputs": {
            "pred": {
                "type": "image",
                "format": "segmentation",
                "num_channels": 3,
                "spatial_shape": list(infer_roi_size),
                "dtype": "float32",
                "value_range": [0, 1],
                "is_patch_data": True,
                "channel_def": {"0": "tumour core (TC)", "1": "whole tumour (WT)", "2": "enhancing tumour (ET)"},
            }
        },
        "post_processed_outputs": {
            "label": {
                "type": "image",
                "format": "labels",
                "num_channels": 1,
                "spatial_shape": ["*", "*", "*"],
                "dtype": "uint8",
                "value_range": sorted(int(k) for k in labels),
                "is_patch_data": False,
                "channel_def": labels,
            }
        },
    }


def metadata(model: torch.nn.Module, infer_roi_size, et_label: int, training: dict, version: str) -> dict:
    import monai
    import nibabel

    dice = training.get("val_dice", {}).get("val_dice")
    job = training.get("job")
    return {
        "schema": SCHEMA_URL,
        "version": version,
        "changelog": {version: f"exported by result_stat.export_bundle from {job or training['checkpoint']}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {"nibabel": nibabel.__version__},
        "name": "BraTS federated SegResNet",
        "task": "Brain tumour segmentation in 4-modality MRI: tumour core, whole tumour, enhancing tumour",
        "description": (
            f"SegResNet ({model.init_filters} base filters) trained with federated averaging (NVIDIA FLARE)"
            + (f" in job {job}, best validation Dice {dice:.4f}" if job and dice is not None else "")
            + f"; privacy: {privacy_phrase(training['privacy'])}. Input: T1ce, T1, T2, FLAIR of one case; output: a "
            f"BraTS label map (0, 1, 2, {et_label}) on the case's grid."
        ),
        "authors": "the brats-fl project (federated BraTS segmentation with NVIDIA FLARE and MONAI)",
        "copyright": "Apache-2.0, the brats-fl project",
        "data_source": "BraTS (https://www.med.upenn.edu/cbica/brats/) or the project's synthetic demo data",
        "data_type": "nibabel",
        "image_classes": "4 channels: T1ce, T1, T2, FLAIR, each normalised over its non-zero voxels",
        "pred_classes": "3 channels: TC, WT, ET (sigmoid); written as one label map: "
        + ", ".join(
            f"{k} {v}"
            for k, v in network_data_format(infer_roi_size, et_label)["post_processed_outputs"]["label"][
                "channel_def"
            ].items()
        ),
        "label_values": {str(k): v for k, v in {**LABEL_NAMES, et_label: "enhancing tumour"}.items()},
        "eval_metrics": training.get("val_dice", {}),
        "intended_use": "Research only; not for clinical use",
        "references": [
            "Li W. et al., Privacy-preserving Federated Brain Tumour Segmentation, MLMI 2019, arXiv:1910.00962",
            "Myronenko A., 3D MRI brain tumor segmentation using autoencoder regularization, arXiv:1810.11654",
        ],
        "training": training,
        "network_data_format": network_data_format(infer_roi_size, et_label),
    }


def privacy_phrase(privacy: dict) -> str:
    if not privacy.get("mechanism"):
        return "none (no differential privacy)"
    epsilon = privacy.get("epsilon")
    figure = f", epsilon {epsilon:.4g}" if epsilon is not None else ""
    delta = privacy.get("delta")
    return f"{privacy['mechanism']}{figure}" + (f" at delta {delta:g}" if delta else "")


def missing_metadata_fields(meta: dict) -> list[str]:
    """The fields MONAI's metadata schema requires that meta lacks (what verify_metadata checks, offline)."""
    missing = [k for k in SCHEMA_REQUIRED if k not in meta]
    for section in ("inputs", "outputs"):
        for name, tensor in meta.get("network_data_format", {}).get(section, {}).items():
            missing += [f"network_data_format.{section}.{name}.{k}" for k in TENSOR_REQUIRED if k not in tensor]
    return missing


def readme(meta: dict, et_label: int) -> str:
    training = meta["training"]
    dice = training.get("val_dice", {})
    return f"""# {meta["name"]}

{meta["description"]}

Exported by `python -m result_stat.export_bundle` from `{training["checkpoint"]}`.

## Run

Needs MONAI {meta["monai_version"]}, PyTorch, nibabel, and `fire` for MONAI's command line:

```bash
python -m monai.bundle run --config_file <bundle>/configs/inference.json --bundle_root <bundle> \\
    --dataset_dir /data/new_cases --output_dir /data/segmented
```

Every folder below `dataset_dir` holding a case's four modalities (`<case>_t1ce/_t1/_t2/_flair.nii.gz`, or the BraTS
2023+ names `<case>-t1c/-t1n/-t2w/-t2f.nii.gz`) is segmented into `<output_dir>/<case>.nii.gz`: label values
{", ".join(f"{k} {v}" for k, v in meta["label_values"].items())}, on the case's own grid and affine. For BraTS 2023+
data add `--et_label 3`; a list of cases can be given instead with `--datalist "[{{'image': [t1ce, t1, t2, flair]}}]"`.

## Inference

Channels T1ce, T1, T2, FLAIR; RAS orientation at 1 mm; each channel normalised over its non-zero voxels; sliding
window {" x ".join(map(str, meta["network_data_format"]["inputs"]["image"]["spatial_shape"]))} with overlap 0.5;
sigmoid, threshold 0.5; the three regions back to the original grid (nearest neighbour) and nested into one label
map (ET wins, then the rest of TC is label 1, then the rest of WT is label 2).

## Training

- job: {training.get("job") or "not a job folder"}; best round: {training.get("best_round", "-")}
- validation Dice at that round: {", ".join(f"{k} {v:.4f}" for k, v in dice.items()) or "-"}
- privacy: {privacy_phrase(training["privacy"])}

Research use only.
"""


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------
def write_bundle(model_path: Path, output_dir: Path, infer_roi_size, et_label: int, version: str) -> dict:
    """Write the whole bundle into a temporary folder next to output_dir, then rename it: never half a bundle."""
    model = load_model(model_path, torch.device("cpu"))
    training = training_record(model_path)
    meta = metadata(model, infer_roi_size, et_label, training, version)
    missing = missing_metadata_fields(meta)
    if missing:
        raise RuntimeError(f"metadata lacks {missing}")  # a bug here, not a user error
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        for folder in ("configs", "models", "docs", "scripts"):
            (staging / folder).mkdir()
        (staging / "configs" / "metadata.json").write_text(json.dumps(meta, indent=4) + "\n")
        config = inference_config(model, infer_roi_size, et_label)
        (staging / "configs" / "inference.json").write_text(json.dumps(config, indent=4) + "\n")
        torch.save(model.state_dict(), staging / "models" / "model.pt")
        (staging / "scripts" / "__init__.py").write_text(f"from . import {SCRIPTS_SOURCE.stem}  # noqa: F401\n")
        shutil.copyfile(SCRIPTS_SOURCE, staging / "scripts" / SCRIPTS_SOURCE.name)
        (staging / "docs" / "README.md").write_text(readme(meta, et_label))
        if output_dir.exists():
            shutil.rmtree(output_dir)
        os.replace(staging, output_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return meta


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m result_stat.export_bundle",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model",
        required=True,
        help="checkpoint of BratsSegResNet: a job's best_FL_global_model.pt (then the job's Dice and privacy go "
        "into the metadata) or any NVFlare persistor dict or plain state dict of the network",
    )
    p.add_argument("--output_dir", required=True, help="the bundle folder to write")
    add_infer_roi_size_flag(p)
    p.add_argument(
        "--et_label",
        type=int,
        choices=(bp.ET_LABEL_BRATS2017, bp.ET_LABEL_BRATS2023),
        help="label value of enhancing tumour in the written maps: 4 (BraTS 2017-2021) or 3 (BraTS 2023+) "
        "(default: the job's datalist's, else 4; the bundle's et_label can also be overridden when it runs)",
    )
    p.add_argument("--version", default="0.1.0", help="the bundle's version in its metadata (default: 0.1.0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output_dir")
    return p


def main(argv: list[str] | None = None) -> int:
    from result_stat.predict import infer_roi_size_for

    args = build_parser().parse_args(argv)
    quiet_monai_warnings()
    model_path, output_dir = Path(args.model), Path(args.output_dir)
    try:
        if not model_path.is_file():
            raise EvaluationInputError(f"--model {model_path} not found")
        if output_dir.exists() and any(output_dir.iterdir()) and not args.overwrite:
            raise EvaluationInputError(f"--output_dir {output_dir} exists; pass --overwrite to replace it")
        infer_roi_size = infer_roi_size_for(model_path, args.infer_roi_size)
        et_label = args.et_label or job_et_label(model_path)
        load_model(model_path, torch.device("cpu"))  # refuses a file that is not this network, before writing
    except EvaluationInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    meta = write_bundle(model_path, output_dir, infer_roi_size, et_label, args.version)
    print(f"Wrote the MONAI bundle {output_dir} ({meta['description']})")
    print(
        f"Run it: python -m monai.bundle run --config_file {output_dir}/configs/inference.json --bundle_root "
        f"{output_dir} --dataset_dir <cases> --output_dir <label maps>"
    )
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
