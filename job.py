"""Federated BraTS 2018 brain-tumour segmentation (Li et al., MLMI 2019) on NVIDIA FLARE's Job Recipe API.

    python job.py                                   # demo: synthetic data, 4 clients, a few minutes on a CPU
    python job.py --dataset_base_dir /data/MICCAI_BraTS_2018_Data_Training --n_clients 1    # centralised
    python job.py --dataset_base_dir /data/MICCAI_BraTS_2018_Data_Training --n_clients 4    # federated
    python job.py --dataset_base_dir /data/MICCAI_BraTS_2018_Data_Training --n_clients 4 --enable_dp
    python job.py --dataset_base_dir /data/MICCAI_BraTS_2018_Data_Training --n_clients 4 --enable_dp \
        --dp_mechanism dpsgd --dp_target_epsilon 8

Builds a FedAvg recipe around BratsSegResNet (clients send weight differences, the server keeps the global model
with the best validation Dice), runs it in the NVFlare simulator and prints a summary of what it produced.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

# Importing nvflare.recipe strips NVFlare's own --export / --export-dir flags from sys.argv (recipe.execute honours
# them), so it must happen before our parser runs.
import nvflare.recipe  # noqa: F401,E402

import privacy  # noqa: E402  (accounting only: no torch, no NVFlare)

REPO_DIR = Path(__file__).resolve().parent
SHIPPED_DATALIST_DIR = REPO_DIR / "dataset_brats18" / "datalist"
KEY_METRIC = "val_dice"
EXIT_BAD_INPUT = 2
EXIT_JOB_FAILED = 1

# Paper-sized defaults, and the demo's (used only when no dataset is given and the flag is not set explicitly).
DEFAULTS = {
    "n_clients": 4,
    "num_rounds": 600,
    "aggregation_epochs": 1,
    "learning_rate": 1e-4,
    "roi_size": [224, 224, 144],
    "infer_roi_size": [240, 240, 160],
}
DEMO_DEFAULTS = {
    "num_rounds": 10,
    "learning_rate": 2e-3,
    "roi_size": [48, 48, 32],
    "infer_roi_size": [64, 64, 48],
}
DEMO_SHAPE = (64, 64, 48)
DEMO_TRAIN_CASES = 32  # dealt round-robin to the sites
DEMO_VALIDATION_CASES = 4


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Flags marked 'demo: X' take X in the built-in demo (no --dataset_base_dir) unless given explicitly. "
        "NVFlare's own flags also work: --export [--export-dir DIR] writes the job folder (default ./fl_job) "
        "instead of running it.",
    )
    fl = p.add_argument_group("federation")
    fl.add_argument("--n_clients", type=int, help="number of sites; 1 = centralised baseline on site-All.json (default: 4)")
    fl.add_argument("--num_rounds", type=int, help="FL rounds, >= 2: round 0's metric is never a best model (default: 600; demo: 10)")
    fl.add_argument("--aggregation_epochs", type=int, help="local epochs per round (default: 1)")
    fl.add_argument("--job_name", help="job folder name (default: brats18_<n_clients>, with _dp appended for SVT and "
                                       "_dpsgd for DP-SGD)")
    fl.add_argument("--workspace", default="/tmp/nvflare/simulation",
                    help="simulator workspace root; the job runs in <workspace>/<job_name>, which is wiped at start "
                         "(default: /tmp/nvflare/simulation)")

    tr = p.add_argument_group("training")
    tr.add_argument("--learning_rate", type=float, help="Adam learning rate (default: 1e-4; demo: 2e-3)")
    tr.add_argument("--fedproxloss_mu", type=float, default=0.0, help="FedProx proximal weight; 0 = off (default: 0)")
    tr.add_argument("--cache_dataset", type=float, default=0.0,
                    help="fraction of each site's cases cached in memory after loading, in [0, 1] (default: 0)")
    tr.add_argument("--roi_size", type=int, nargs=3, metavar=("X", "Y", "Z"),
                    help="random training crop, multiples of 8 (default: 224 224 144; demo: 48 48 32)")
    tr.add_argument("--infer_roi_size", type=int, nargs=3, metavar=("X", "Y", "Z"),
                    help="sliding-window size for validation, multiples of 8 (default: 240 240 160; demo: 64 64 48)")
    tr.add_argument("--init_filters", type=int, default=16, help="SegResNet base width (default: 16)")
    tr.add_argument("--no_amp", action="store_true", help="turn mixed precision off on CUDA (on by default there)")
    tr.add_argument("--seed", type=int, default=0,
                    help="seed of the initial weights and of the clients' sampling and augmentation (default: 0)")

    data = p.add_argument_group("data (leave both out to run the synthetic demo)")
    data.add_argument("--dataset_base_dir", help="folder holding the BraTS training/ tree that datalist paths are relative to")
    data.add_argument("--datalist_json_path",
                      help="folder with site-1.json ... site-N.json and site-All.json "
                           f"(default with --dataset_base_dir: the paper's split in {SHIPPED_DATALIST_DIR.relative_to(REPO_DIR)})")

    hw = p.add_argument_group("hardware")
    hw.add_argument("--gpu", help="GPU ids, e.g. '0' or '0,1,2,3': clients are placed on them round-robin (default: none, "
                                  "CPU unless CUDA is visible)")
    hw.add_argument("--threads", type=int,
                    help="clients running at once, 1..n_clients; '--gpu 0 --threads 4' puts 4 clients on one GPU "
                         "(default: n_clients)")
    hw.add_argument("--num_workers", type=int, default=0,
                    help="data-loading worker processes per client; >0 overlaps NIfTI loading with GPU work "
                         "(default: 0, load in the client's own process)")

    dp = p.add_argument_group(
        "differential privacy (the spent epsilon of every site and round goes to <job>/server/simulate_job/"
        "privacy_report.json and TensorBoard tag privacy_epsilon; predict it with `python -m privacy svt|dpsgd`)"
    )
    dp.add_argument("--enable_dp", action="store_true",
                    help="protect every client's update (mechanism: --dp_mechanism)")
    dp.add_argument("--dp_mechanism", choices=privacy.MECHANISMS, default="svt",
                    help="svt: NVFlare's SVTPrivacy filter on each outgoing weight difference, as in the paper "
                         "(site-level, pure DP); dpsgd: per-case clipped, noised local training calibrated to "
                         "--dp_target_epsilon (patient-level) (default: svt)")
    dp.add_argument("--dp_fraction", type=float, default=0.9,
                    help="SVT: fraction of the update's values released, in (0, 1] (default: 0.9)")
    dp.add_argument("--dp_epsilon", type=float, default=0.001,
                    help="SVT: budget of the threshold and query noise only, > 0; releasing the values costs another "
                         "(released values) x --dp_noise_var per round, see the report (default: 0.001)")
    dp.add_argument("--dp_noise_var", type=float, default=1.0,
                    help="SVT: release noise, Laplace scale 2*gamma/noise_var per value and epsilon noise_var per "
                         "value, > 0 (default: 1.0)")
    dp.add_argument("--dp_gamma", type=float, default=1e-4,
                    help="SVT: clipping bound of each value (per local step), > 0 (default: 1e-4)")
    dp.add_argument("--dp_target_epsilon", type=float, default=8.0,
                    help="DP-SGD: epsilon protecting each training case of each site after all rounds, > 0 "
                         "(default: 8)")
    dp.add_argument("--dp_delta", type=float,
                    help="DP-SGD: delta of that guarantee, in (0, 1) and below 1/(training cases) at every site "
                         "(default: 0.1 / training cases, per site)")
    dp.add_argument("--dp_max_grad_norm", type=float, default=1.0,
                    help="DP-SGD: L2 bound each case's gradient is clipped to, > 0 (default: 1.0)")

    return p


class InputError(ValueError):
    """A user error found before anything runs; reported as one line, exit code 2."""


@dataclass
class JobInputs:
    args: argparse.Namespace
    demo: bool
    dataset_base_dir: Path
    datalist_dir: Path
    dpsgd_plans: dict = field(default_factory=dict)  # site name -> privacy.DPSGDPlan, with --dp_mechanism dpsgd


def apply_defaults(args: argparse.Namespace) -> bool:
    """Fill unset flags with the paper's defaults, or the demo's when no dataset is given; returns demo or not."""
    demo = args.dataset_base_dir is None and args.datalist_json_path is None
    for key, value in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, DEMO_DEFAULTS.get(key, value) if demo else value)
    if args.threads is None:
        args.threads = args.n_clients
    if args.job_name is None:
        suffix = {"svt": "_dp", "dpsgd": "_dpsgd"}[args.dp_mechanism] if args.enable_dp else ""
        args.job_name = f"brats18_{args.n_clients}{suffix}"
    return demo


def check_flags(args: argparse.Namespace) -> None:
    """Every flag value the job cannot run with, reported before anything is written."""
    from brats_pipeline import check_roi_size

    if args.n_clients < 1:
        raise InputError(f"--n_clients {args.n_clients}: need at least 1 client")
    if args.num_rounds < 2:
        raise InputError(f"--num_rounds {args.num_rounds}: need >= 2 (round 0 validates the initial model, so a "
                         "1-round job never writes a best model)")
    if args.aggregation_epochs < 1:
        raise InputError(f"--aggregation_epochs {args.aggregation_epochs}: need >= 1")
    if not args.learning_rate > 0:
        raise InputError(f"--learning_rate {args.learning_rate}: need > 0")
    if args.fedproxloss_mu < 0:
        raise InputError(f"--fedproxloss_mu {args.fedproxloss_mu}: need >= 0 (0 turns FedProx off)")
    if not 0.0 <= args.cache_dataset <= 1.0:
        raise InputError(f"--cache_dataset {args.cache_dataset}: need a fraction in [0, 1]")
    if args.init_filters < 8 or args.init_filters % 8:
        raise InputError(f"--init_filters {args.init_filters}: need a positive multiple of 8 (GroupNorm uses 8 groups)")
    for flag in ("roi_size", "infer_roi_size"):
        try:
            check_roi_size(getattr(args, flag), f"--{flag}")
        except ValueError as e:
            raise InputError(str(e)) from None
    if not 1 <= args.threads <= args.n_clients:
        raise InputError(f"--threads {args.threads}: need 1 <= threads <= --n_clients ({args.n_clients})")
    if args.num_workers < 0:
        raise InputError(f"--num_workers {args.num_workers}: need >= 0")
    if args.gpu is not None:
        ids = args.gpu.split(",")
        if not all(i.strip().isdigit() for i in ids):
            raise InputError(f"--gpu {args.gpu!r}: need comma-separated integer GPU ids, e.g. 0 or 0,1,2,3")
        if len(ids) > args.n_clients:
            raise InputError(f"--gpu {args.gpu}: more GPUs ({len(ids)}) than clients ({args.n_clients})")
    if args.enable_dp and args.dp_mechanism == "dpsgd":
        try:
            privacy.check_dpsgd_values(args.dp_target_epsilon, args.dp_delta, args.dp_max_grad_norm)
        except privacy.PrivacyConfigError as e:
            raise InputError(str(e)) from None
    if args.enable_dp and args.dp_mechanism == "svt":
        if not 0.0 < args.dp_fraction <= 1.0:
            raise InputError(f"--dp_fraction {args.dp_fraction}: need a fraction in (0, 1]")
        for flag in ("dp_epsilon", "dp_noise_var", "dp_gamma"):
            if not getattr(args, flag) > 0:
                raise InputError(f"--{flag} {getattr(args, flag)}: need > 0")
    if args.job_name in ("", ".", "..") or "/" in args.job_name:
        raise InputError(f"--job_name {args.job_name!r}: need a plain folder name")


def resolve_data(args: argparse.Namespace, demo: bool) -> tuple[Path, Path]:
    """Dataset and datalist folders; makes the synthetic demo dataset when none is given."""
    from dataset_brats18.datalist import DatalistError, check_job_datalists, site_datalist_names

    if demo:
        from dataset_brats18.synthetic import generate_dataset, write_federated_datalists

        data_dir = Path(args.workspace) / "synthetic_brats18"
        cases = generate_dataset(data_dir, DEMO_TRAIN_CASES + DEMO_VALIDATION_CASES, DEMO_SHAPE)
        datalist_dir = write_federated_datalists(
            cases, data_dir / f"datalist_{args.n_clients}_sites", max(args.n_clients, 1), DEMO_VALIDATION_CASES
        )
        print(f"No dataset given: running the synthetic demo ({len(cases)} BraTS-like cases of "
              f"{'x'.join(map(str, DEMO_SHAPE))} voxels in {data_dir}, datalists in {datalist_dir}).", flush=True)
        return data_dir, datalist_dir
    if args.dataset_base_dir is None:
        raise InputError("--datalist_json_path needs --dataset_base_dir (the folder its paths are relative to)")
    datalist_dir = Path(args.datalist_json_path) if args.datalist_json_path else SHIPPED_DATALIST_DIR
    try:
        check_job_datalists(datalist_dir, args.dataset_base_dir, site_datalist_names(args.n_clients))
    except DatalistError as e:
        raise InputError(str(e)) from None
    return Path(args.dataset_base_dir), datalist_dir


def plan_dpsgd_sites(args: argparse.Namespace, datalist_dir: Path) -> dict:
    """Calibrate each site's DP-SGD noise now, so a target the accountant cannot reach stops the job before it runs.

    The client repeats the same (deterministic) calibration from its own datalist."""
    from brats_pipeline import read_datalist
    from dataset_brats18.datalist import site_datalist_names

    plans = {}
    for i, name in enumerate(site_datalist_names(args.n_clients), start=1):
        n_train = len(read_datalist(datalist_dir / f"{name}.json")["training"])
        try:
            plans[f"site-{i}"] = privacy.plan_dpsgd(n_train, args.num_rounds, args.aggregation_epochs,
                                                    args.dp_target_epsilon, args.dp_delta, args.dp_max_grad_norm,
                                                    site=f"site-{i} ({name}.json)")
        except privacy.PrivacyConfigError as e:
            raise InputError(str(e)) from None
    return plans


def client_arguments(args: argparse.Namespace, dataset_dir: Path, datalist_dir: Path) -> str:
    """Command line handed to client.py at every site."""
    torch_threads = max(1, (os.cpu_count() or 1) // args.threads)
    parts = [
        f"--dataset_base_dir {dataset_dir.resolve()}",
        f"--datalist_json_path {datalist_dir.resolve()}",
        f"--aggregation_epochs {args.aggregation_epochs}",
        f"--learning_rate {args.learning_rate}",
        f"--fedproxloss_mu {args.fedproxloss_mu}",
        f"--cache_dataset {args.cache_dataset}",
        f"--roi_size {' '.join(map(str, args.roi_size))}",
        f"--infer_roi_size {' '.join(map(str, args.infer_roi_size))}",
        f"--init_filters {args.init_filters}",
        f"--torch_threads {torch_threads}",
        f"--num_workers {args.num_workers}",
        f"--seed {args.seed}",
        f"--num_rounds {args.num_rounds}",
    ]
    if args.enable_dp:
        parts.append(f"--dp_mechanism {args.dp_mechanism}")
    if args.enable_dp and args.dp_mechanism == "dpsgd":
        parts += [f"--dp_target_epsilon {args.dp_target_epsilon}", f"--dp_max_grad_norm {args.dp_max_grad_norm}"]
        if args.dp_delta is not None:
            parts.append(f"--dp_delta {args.dp_delta}")
    if args.n_clients == 1:
        parts.append("--centralised")
    if args.no_amp:
        parts.append("--no_amp")
    return " ".join(parts)


def build_recipe(args: argparse.Namespace, dataset_dir: Path, datalist_dir: Path):
    """The FedAvg job: weight differences from the clients, best model kept by val_dice, TensorBoard on."""
    from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe
    from nvflare.client.config import TransferType
    from nvflare.recipe.utils import add_experiment_tracking

    from model import BratsSegResNet

    recipe = FedAvgRecipe(
        name=args.job_name,
        model=BratsSegResNet(init_filters=args.init_filters, init_seed=args.seed),  # rebuilt as is on the server
        min_clients=args.n_clients,
        num_rounds=args.num_rounds,
        train_script=str(REPO_DIR / "client.py"),
        train_args=client_arguments(args, dataset_dir, datalist_dir),
        params_transfer_type=TransferType.DIFF,
        key_metric=KEY_METRIC,
    )
    for module in ("brats_pipeline.py", "model.py", "privacy.py", "dpsgd.py"):
        recipe.add_client_file(str(REPO_DIR / module))
    add_experiment_tracking(recipe, "tensorboard")
    if args.enable_dp:
        add_privacy(recipe, args)
    return recipe


def add_privacy(recipe, args: argparse.Namespace) -> None:
    """The chosen mechanism (SVT: a client filter; DP-SGD: lives in client.py) and the server's privacy report."""
    from privacy_components import PrivacyReportCollector

    if args.dp_mechanism == "svt":
        add_svt_filter(recipe, args)
    recipe.add_server_file(str(REPO_DIR / "privacy.py"))
    recipe.add_server_input_filter(PrivacyReportCollector(args.dp_mechanism, privacy_settings(args)), tasks=["train"])


def privacy_settings(args: argparse.Namespace) -> dict:
    """The flags that fix the guarantee, copied into privacy_report.json."""
    common = {"num_rounds": args.num_rounds, "aggregation_epochs": args.aggregation_epochs, "n_clients": args.n_clients}
    if args.dp_mechanism == "svt":
        svt = privacy.SVTSettings(args.dp_fraction, args.dp_epsilon, args.dp_noise_var, args.dp_gamma)
        return {**common, **vars(svt)}
    return {**common, "target_epsilon": args.dp_target_epsilon, "delta": args.dp_delta,
            "max_grad_norm": args.dp_max_grad_norm, "accountant": privacy.DPSGD_ACCOUNTANT}


def add_svt_filter(recipe, args: argparse.Namespace) -> None:
    """NVFlare's sparse-vector-technique filter on every client's outgoing train result (the weight difference)."""
    from nvflare.apis.dxo import DataKind
    from nvflare.app_common.filters.svt_privacy import SVTPrivacy

    svt = SVTPrivacy(
        fraction=args.dp_fraction,
        epsilon=args.dp_epsilon,
        noise_var=args.dp_noise_var,
        gamma=args.dp_gamma,
        tau=privacy.SVTSettings.tau,
        replace=privacy.SVTSettings.replace,
        data_kinds=[DataKind.WEIGHT_DIFF],  # the update only: never perturb (or leak through) full weights
    )
    recipe.add_client_output_filter(svt, tasks=["train"])


def run(args: argparse.Namespace, recipe) -> None:
    """Run in the simulator (the simulator raises if an in-process client fails)."""
    from nvflare.recipe import SimEnv

    env = SimEnv(
        num_clients=args.n_clients,
        num_threads=args.threads,
        gpu_config=args.gpu,
        workspace_root=str(Path(args.workspace).resolve()),
    )
    recipe.execute(env)  # with NVFlare's --export flag this writes the job folder and exits instead


def prepare(argv: list[str] | None = None) -> JobInputs:
    """Parse and check everything; raises InputError before any file is written (demo data aside)."""
    args = build_parser().parse_args(argv)
    demo = apply_defaults(args)
    check_flags(args)
    dataset_dir, datalist_dir = resolve_data(args, demo)
    plans = plan_dpsgd_sites(args, datalist_dir) if args.enable_dp and args.dp_mechanism == "dpsgd" else {}
    return JobInputs(args, demo, dataset_dir, datalist_dir, plans)


def main(argv: list[str] | None = None) -> int:
    from result_stat.job_results import JobResultError, first_client_error, summarize_job

    try:
        inputs = prepare(argv)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    args = inputs.args
    warn_if_gpu_unusable(args)
    for site, plan in inputs.dpsgd_plans.items():
        print(f"DP-SGD {site}: {plan.n_train} training cases, sampling rate {plan.sample_rate:.3g}, "
              f"{plan.total_steps} steps, noise multiplier {plan.noise_multiplier:.4g} for epsilon "
              f"{plan.target_epsilon} at delta {plan.delta:.3g}", flush=True)
    recipe = build_recipe(args, inputs.dataset_base_dir, inputs.datalist_dir)
    try:
        run(args, recipe)
    except Exception as e:  # the simulator raises when an in-process client fails
        cause = first_client_error(Path(args.workspace).resolve(), args.job_name)
        print(f"error: job {args.job_name} failed: {cause or e}", file=sys.stderr)
        return EXIT_JOB_FAILED
    try:
        summary = summarize_job(Path(args.workspace).resolve(), args.job_name, args.num_rounds, args.n_clients)
    except JobResultError as e:
        print(f"error: job {args.job_name} did not finish properly: {e}", file=sys.stderr)
        return EXIT_JOB_FAILED
    if args.enable_dp:
        try:
            summary.extra_lines += privacy_summary(summary.paths.privacy_report, args)
        except (OSError, ValueError) as e:
            print(summary.render())
            print(f"error: job {args.job_name}: privacy accounting incomplete: {e}", file=sys.stderr)
            return EXIT_JOB_FAILED
    print(summary.render())
    return 0


def warn_if_gpu_unusable(args: argparse.Namespace) -> None:
    """--gpu on a machine where torch sees no CUDA device still runs, on the CPU: say so rather than surprise."""
    import torch

    if args.gpu is not None and not torch.cuda.is_available():
        print(f"warning: --gpu {args.gpu} given but torch sees no CUDA device here; the clients will train on the CPU",
              file=sys.stderr, flush=True)


def privacy_summary(report_path: Path, args: argparse.Namespace) -> list[str]:
    """Summary lines of the privacy report; ValueError if any site/round is missing or went out unprotected."""
    report = privacy.load_report(report_path)
    privacy.check_report(report, [f"site-{i}" for i in range(1, args.n_clients + 1)], args.num_rounds)
    return privacy.summary_lines(report, report_path)


if __name__ == "__main__":
    sys.exit(main())
