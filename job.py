"""Federated BraTS 2018 brain-tumour segmentation (Li et al., MLMI 2019) on NVIDIA FLARE's Job Recipe API.

    python job.py                                                       # demo: synthetic data, a few CPU minutes
    python job.py --dataset_base_dir /data/brats18 --n_clients 1        # centralised
    python job.py --dataset_base_dir /data/brats18 --n_clients 4        # federated
    python job.py --dataset_base_dir /data/brats18 --n_clients 4 --enable_dp                         # + SVT
    python job.py --dataset_base_dir /data/brats18 --n_clients 4 --enable_dp --dp_mechanism dpsgd    # + DP-SGD

Reads the flags into one set of training settings (brats_fl/settings.py), builds a FedAvg recipe around
BratsSegResNet (sites send weight differences, the server keeps the global model with the best validation Dice),
runs it in the NVFlare simulator and prints a summary of what it produced.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path

# Importing nvflare.recipe strips NVFlare's own --export / --export-dir flags from sys.argv (recipe.execute honours
# them), so it must happen before our parser runs.
import nvflare.recipe  # noqa: F401

from brats_fl.settings import (
    CACHE_FOLDER,
    DEFAULT_WORKSPACE,
    DEMO_OVERRIDES,
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    KEY_METRIC,
    MECHANISMS,
    REPO_DIR,
    SETTINGS_FILE,
    SHIPPED_DATALIST_DIR,
    SettingsError,
    TrainingSettings,
    default,
    default_job_name,
    describe_default,
)

PACKAGE_DIR = REPO_DIR / "brats_fl"
MAX_DEFAULT_WORKERS = 8
# torch, MONAI and NVFlare's job API take seconds to import: they are imported inside the functions below, so that
# `python job.py --help` and bad-input errors answer at once.


class InputError(ValueError):
    """A user error found before anything runs; reported as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="'demo: X' is the value in the built-in demo (no --dataset_base_dir) unless the flag is given. "
        "NVFlare's own flags also work: --export [--export-dir DIR] writes the job folder (default ./fl_job) "
        "instead of running it.",
    )

    def setting(group, name: str, text: str, **kwargs) -> None:
        """A flag that sets the training setting of the same name, its default taken from brats_fl/settings.py."""
        start = None if name in DEMO_OVERRIDES else default(name)
        group.add_argument(f"--{name}", default=start, help=f"{text} {describe_default(name)}", **kwargs)

    fl = p.add_argument_group("federation")
    fl.add_argument(
        "--n_clients",
        type=int,
        default=4,
        help="number of sites; 1 = centralised baseline on site-All.json (default: 4)",
    )
    setting(fl, "num_rounds", "FL rounds, >= 2: round 0's metric is never a best model", type=int)
    setting(fl, "aggregation_epochs", "local epochs per round", type=int)
    fl.add_argument(
        "--job_name",
        help="job folder name (default: brats18_<n_clients>, with _dp appended for SVT and _dpsgd for DP-SGD)",
    )
    fl.add_argument(
        "--workspace",
        default=DEFAULT_WORKSPACE,
        help="simulator workspace root; the job runs in <workspace>/<job_name>, which is wiped at start "
        f"(default: {DEFAULT_WORKSPACE})",
    )

    tr = p.add_argument_group("training")
    setting(tr, "learning_rate", "Adam learning rate", type=float)
    setting(tr, "fedproxloss_mu", "FedProx proximal weight; 0 = off", type=float)
    setting(tr, "cache_dataset", "fraction of each site's cases cached in memory after loading, in [0, 1]", type=float)
    setting(tr, "roi_size", "random training crop, multiples of 8", type=int, nargs=3, metavar=("X", "Y", "Z"))
    setting(
        tr,
        "infer_roi_size",
        "sliding-window size for validation, multiples of 8",
        type=int,
        nargs=3,
        metavar=("X", "Y", "Z"),
    )
    setting(tr, "init_filters", "SegResNet base width", type=int)
    tr.add_argument("--no_amp", action="store_true", help="turn mixed precision off on CUDA (on by default there)")
    setting(tr, "seed", "seed of the initial weights and of the sites' sampling and augmentation", type=int)
    tr.add_argument(
        "--validate_every_site",
        action="store_true",
        help="every site validates the global model every round, as the paper's workflow does (default: the first "
        "site validates it once for all, when all sites share the validation cases; every site otherwise)",
    )

    data = p.add_argument_group("data (leave both out to run the synthetic demo)")
    data.add_argument(
        "--dataset_base_dir", help="folder holding the BraTS training/ tree that datalist paths are relative to"
    )
    data.add_argument(
        "--datalist_json_path",
        help="folder with site-1.json ... site-N.json and site-All.json (default with "
        f"--dataset_base_dir: the paper's split in {SHIPPED_DATALIST_DIR.relative_to(REPO_DIR)})",
    )

    hw = p.add_argument_group("hardware")
    hw.add_argument(
        "--gpu",
        help="GPU ids, e.g. '0' or '0,1,2,3': sites are placed on them round-robin (default: "
        "none, CPU unless CUDA is visible)",
    )
    hw.add_argument(
        "--threads",
        type=int,
        help="sites running at once, 1..n_clients; '--gpu 0 --threads 4' puts 4 sites on one GPU (default: n_clients)",
    )
    hw.add_argument(
        "--num_workers",
        type=int,
        help="data-loading worker processes per site, overlapping loading with compute (default: what fits the "
        "machine: cores per running site - 1, at most 8; 0 on a 2-core machine)",
    )
    hw.add_argument(
        "--cache_dir",
        help="disk cache of preprocessed cases, shared by every site, round and job on this machine and by the "
        f"evaluation (default: <workspace>/{CACHE_FOLDER}); a case is preprocessed once, then loads in a fraction of "
        "the time",
    )
    hw.add_argument("--no_cache", action="store_true", help="load and preprocess every case at every use instead")

    dp = p.add_argument_group(
        "differential privacy (the spent epsilon of every site and round goes to <job>/server/simulate_job/"
        "privacy_report.json and TensorBoard tag privacy_epsilon; predict it with `python -m brats_fl.privacy`)"
    )
    dp.add_argument("--enable_dp", action="store_true", help="protect every site's update (mechanism: --dp_mechanism)")
    dp.add_argument(
        "--dp_mechanism",
        choices=MECHANISMS,
        default="svt",
        help="svt: NVFlare's SVTPrivacy filter on each outgoing weight difference, as in the paper "
        "(site-level, pure DP); dpsgd: per-case clipped, noised local training calibrated to "
        "--dp_target_epsilon (patient-level) (default: svt)",
    )
    setting(dp, "dp_fraction", "SVT: fraction of the update's values released, in (0, 1]", type=float)
    setting(
        dp,
        "dp_epsilon",
        "SVT: budget of the threshold and query noise only, > 0; releasing the values costs "
        "another (released values) x --dp_noise_var per round, see the report",
        type=float,
    )
    setting(
        dp,
        "dp_noise_var",
        "SVT: release noise, Laplace scale 2*gamma/noise_var per value and epsilon noise_var per value, > 0",
        type=float,
    )
    setting(dp, "dp_gamma", "SVT: clipping bound of each value (per local step), > 0", type=float)
    setting(
        dp,
        "dp_target_epsilon",
        "DP-SGD: epsilon protecting each training case of each site after all rounds, > 0",
        type=float,
    )
    dp.add_argument(
        "--dp_delta",
        type=float,
        help="DP-SGD: delta of that guarantee, in (0, 1) and below 1/(training cases) at every site "
        "(default: 0.1 / training cases, per site)",
    )
    setting(dp, "dp_max_grad_norm", "DP-SGD: L2 bound each case's gradient is clipped to, > 0", type=float)
    dp.add_argument(
        "--dp_secure_mode",
        action="store_true",
        help="DP-SGD: Opacus's secure mode, noise robust to floating-point attacks (each noise value is "
        "the scaled sum of 4 Gaussian draws; see docs/privacy.md) (default: off)",
    )
    return p


@dataclass
class JobInputs:
    """Everything the job is built from, checked."""

    args: argparse.Namespace
    settings: TrainingSettings
    demo: bool
    dpsgd_plans: dict = field(default_factory=dict)  # site name -> DPSGDPlan, with --dp_mechanism dpsgd


def settings_from_flags(args: argparse.Namespace, demo: bool) -> TrainingSettings:
    """The flags as one TrainingSettings; flags left out take the paper's default, or the demo's."""
    values = {}
    for f in fields(TrainingSettings):
        given = getattr(args, f.name, None)
        values[f.name] = default(f.name, demo) if given is None else given
    values.update(
        centralised=args.n_clients == 1,
        amp=not args.no_amp,
        dp_mechanism=args.dp_mechanism if args.enable_dp else None,
        torch_threads=max(1, cores_per_site(args)),
        num_workers=default_workers(args) if args.num_workers is None else args.num_workers,
        cache_dir=None if args.no_cache else str(Path(args.cache_dir or Path(args.workspace) / CACHE_FOLDER).resolve()),
        validate_at="every_site" if args.validate_every_site else "one_site",
        dataset_base_dir=None,  # filled in once the data is resolved
        datalist_json_path=None,
    )
    return TrainingSettings(**values)


def cores_per_site(args: argparse.Namespace) -> int:
    """CPU cores for each site running at once (the simulator runs --threads sites side by side)."""
    return (os.cpu_count() or 1) // (args.threads or args.n_clients or 1)


def default_workers(args: argparse.Namespace) -> int:
    """Loader workers that fit: a site's cores minus the one its training loop uses, at most MAX_DEFAULT_WORKERS."""
    return max(0, min(MAX_DEFAULT_WORKERS, cores_per_site(args) - 1))


def check_job_flags(args: argparse.Namespace) -> None:
    """The flags that are about this run rather than about training."""
    if args.n_clients < 1:
        raise InputError(f"--n_clients {args.n_clients}: need at least 1 client")
    if args.threads is None:
        args.threads = args.n_clients
    if not 1 <= args.threads <= args.n_clients:
        raise InputError(f"--threads {args.threads}: need 1 <= threads <= --n_clients ({args.n_clients})")
    if args.gpu is not None:
        ids = args.gpu.split(",")
        if not all(i.strip().isdigit() for i in ids):
            raise InputError(f"--gpu {args.gpu!r}: need comma-separated integer GPU ids, e.g. 0 or 0,1,2,3")
        if len(ids) > args.n_clients:
            raise InputError(f"--gpu {args.gpu}: more GPUs ({len(ids)}) than clients ({args.n_clients})")
    if args.job_name is None:
        args.job_name = default_job_name(args.n_clients, args.dp_mechanism if args.enable_dp else None)
    if args.job_name in ("", ".", "..") or "/" in args.job_name:
        raise InputError(f"--job_name {args.job_name!r}: need a plain folder name")


def resolve_data(args: argparse.Namespace, demo: bool) -> tuple[Path, Path]:
    """Dataset and datalist folders; makes the synthetic demo dataset when none is given."""
    from dataset_brats18.datalist import DatalistError, check_job_datalists, site_datalist_names

    if demo:
        from brats_fl.settings import DEMO_SHAPE, DEMO_TRAIN_CASES, DEMO_VALIDATION_CASES
        from dataset_brats18.synthetic import generate_dataset, write_federated_datalists

        data_dir = Path(args.workspace) / "synthetic_brats18"
        cases = generate_dataset(data_dir, DEMO_TRAIN_CASES + DEMO_VALIDATION_CASES, DEMO_SHAPE)
        datalist_dir = write_federated_datalists(
            cases, data_dir / f"datalist_{args.n_clients}_sites", max(args.n_clients, 1), DEMO_VALIDATION_CASES
        )
        print(
            f"No dataset given: running the synthetic demo ({len(cases)} BraTS-like cases of "
            f"{'x'.join(map(str, DEMO_SHAPE))} voxels in {data_dir}, datalists in {datalist_dir}).",
            flush=True,
        )
        return data_dir, datalist_dir
    if args.dataset_base_dir is None:
        raise InputError("--datalist_json_path needs --dataset_base_dir (the folder its paths are relative to)")
    datalist_dir = Path(args.datalist_json_path) if args.datalist_json_path else SHIPPED_DATALIST_DIR
    try:
        check_job_datalists(datalist_dir, args.dataset_base_dir, site_datalist_names(args.n_clients))
    except DatalistError as e:
        raise InputError(str(e)) from None
    return Path(args.dataset_base_dir), datalist_dir


def validation_is_shared(datalist_dir: Path, n_clients: int) -> bool:
    """Whether every site's datalist lists the same validation cases (the paper's setting)."""
    from brats_fl.pipeline import read_datalist
    from dataset_brats18.datalist import site_datalist_names

    lists = [read_datalist(datalist_dir / f"{name}.json")["validation"] for name in site_datalist_names(n_clients)]
    return all(v == lists[0] for v in lists)


def lightest_site(datalist_dir: Path, n_clients: int) -> str:
    """The site with the fewest training cases (the first of them on a tie): validating for all adds the most to
    the round of the site that finishes its training first."""
    from brats_fl.pipeline import read_datalist
    from dataset_brats18.datalist import site_datalist_names

    sizes = [len(read_datalist(datalist_dir / f"{name}.json")["training"]) for name in site_datalist_names(n_clients)]
    return f"site-{sizes.index(min(sizes)) + 1}"


def plan_dpsgd_sites(settings: TrainingSettings, n_clients: int) -> dict:
    """Calibrate each site's DP-SGD noise now, so a target the accountant cannot reach stops the job before it runs.

    Each site repeats the same (deterministic) calibration from its own datalist."""
    from brats_fl.pipeline import read_datalist
    from brats_fl.privacy import PrivacyConfigError
    from brats_fl.privacy.dpsgd import plan_dpsgd
    from dataset_brats18.datalist import site_datalist_names

    plans = {}
    for i, name in enumerate(site_datalist_names(n_clients), start=1):
        n_train = len(read_datalist(Path(settings.datalist_json_path) / f"{name}.json")["training"])
        try:
            plans[f"site-{i}"] = plan_dpsgd(
                n_train,
                settings.num_rounds,
                settings.aggregation_epochs,
                settings.dp_target_epsilon,
                settings.dp_delta,
                settings.dp_max_grad_norm,
                site=f"site-{i} ({name}.json)",
            )
        except PrivacyConfigError as e:
            raise InputError(str(e)) from None
    return plans


def prepare(argv: list[str] | None = None) -> JobInputs:
    """Parse and check everything; raises InputError before any file is written (demo data aside)."""
    from brats_fl.privacy import PrivacyConfigError
    from brats_fl.privacy.dpsgd import check_dpsgd_values

    args = build_parser().parse_args(argv)
    if Path.cwd().resolve() != REPO_DIR:
        raise InputError(f"run job.py from the repository root: cd {REPO_DIR} (the recipe ships client.py from there)")
    demo = args.dataset_base_dir is None and args.datalist_json_path is None
    check_job_flags(args)
    settings = settings_from_flags(args, demo)
    try:
        settings.check()
        if settings.dp_mechanism == "dpsgd":
            check_dpsgd_values(settings.dp_target_epsilon, settings.dp_delta, settings.dp_max_grad_norm)
    except (SettingsError, PrivacyConfigError) as e:
        raise InputError(str(e)) from None
    dataset_dir, datalist_dir = resolve_data(args, demo)
    settings.dataset_base_dir = str(dataset_dir.resolve())
    settings.datalist_json_path = str(datalist_dir.resolve())
    if settings.validate_at == "one_site" and not validation_is_shared(datalist_dir, args.n_clients):
        settings.validate_at = "every_site"
        print("The sites' datalists list different validation cases: every site validates on its own.", flush=True)
    if settings.validate_at == "one_site":
        settings.validating_site = lightest_site(datalist_dir, args.n_clients)
    plans = plan_dpsgd_sites(settings, args.n_clients) if settings.dp_mechanism == "dpsgd" else {}
    return JobInputs(args, settings, demo, plans)


def stage_app_files(settings: TrainingSettings) -> Path:
    """A fresh folder holding what every site runs besides client.py: the brats_fl package, model.py and the
    settings document. NVFlare copies a folder's contents into the app's custom/ folder, so one call ships it."""
    staged = Path(tempfile.mkdtemp(prefix="brats_app_"))
    shutil.copytree(PACKAGE_DIR, staged / PACKAGE_DIR.name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(REPO_DIR / "model.py", staged / "model.py")
    settings.write(staged / SETTINGS_FILE)
    return staged


def build_recipe(inputs: JobInputs):
    """The FedAvg job: weight differences from the sites, best model kept by val_dice, TensorBoard on."""
    from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe
    from nvflare.client.config import TransferType
    from nvflare.recipe.utils import add_experiment_tracking

    from model import BratsSegResNet

    args, settings = inputs.args, inputs.settings
    recipe = FedAvgRecipe(
        name=args.job_name,
        model=BratsSegResNet(init_filters=settings.init_filters, init_seed=settings.seed),  # rebuilt on the server
        min_clients=args.n_clients,
        num_rounds=settings.num_rounds,
        train_script="client.py",  # relative: shipped in the job, so an exported job runs anywhere
        params_transfer_type=TransferType.DIFF,
        key_metric=KEY_METRIC,
    )
    app_files = stage_app_files(settings)
    recipe.add_client_file(str(app_files))
    add_experiment_tracking(recipe, "tensorboard")
    if settings.dp_mechanism:
        recipe.add_server_file(str(app_files))  # the privacy report's filter runs on the server
        add_privacy(recipe, settings, args.n_clients)
    return recipe


def add_privacy(recipe, settings: TrainingSettings, n_clients: int) -> None:
    """The chosen mechanism (SVT: a filter on each site's output; DP-SGD: lives in client.py) and the server filter
    that writes the privacy report."""
    from brats_fl.privacy.report_filter import PrivacyReportCollector
    from brats_fl.privacy.svt import make_svt_filter

    if settings.dp_mechanism == "svt":
        recipe.add_client_output_filter(make_svt_filter(svt_settings(settings)), tasks=["train"])
    recipe.add_server_input_filter(
        PrivacyReportCollector(settings.dp_mechanism, privacy_report_settings(settings, n_clients)), tasks=["train"]
    )


def svt_settings(settings: TrainingSettings):
    from brats_fl.privacy.svt import SVTSettings

    return SVTSettings(settings.dp_fraction, settings.dp_epsilon, settings.dp_noise_var, settings.dp_gamma)


def privacy_report_settings(settings: TrainingSettings, n_clients: int) -> dict:
    """The settings that fix the guarantee, copied into privacy_report.json."""
    from dataclasses import asdict

    from brats_fl.privacy.dpsgd import DPSGD_ACCOUNTANT

    common = {
        "num_rounds": settings.num_rounds,
        "aggregation_epochs": settings.aggregation_epochs,
        "n_clients": n_clients,
    }
    if settings.dp_mechanism == "svt":
        return {**common, **asdict(svt_settings(settings))}
    return {
        **common,
        "target_epsilon": settings.dp_target_epsilon,
        "delta": settings.dp_delta,
        "max_grad_norm": settings.dp_max_grad_norm,
        "accountant": DPSGD_ACCOUNTANT,
    }


def run(args: argparse.Namespace, recipe) -> None:
    """Run in the simulator (the simulator raises if an in-process site fails)."""
    from nvflare.recipe import SimEnv

    env = SimEnv(
        num_clients=args.n_clients,
        num_threads=args.threads,
        gpu_config=args.gpu,
        workspace_root=str(Path(args.workspace).resolve()),
    )
    recipe.execute(env)  # with NVFlare's --export flag this writes the job folder and exits instead


def main(argv: list[str] | None = None) -> int:
    from brats_fl.job_results import JobResultError, first_client_error, summarize_job

    try:
        inputs = prepare(argv)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    args, settings = inputs.args, inputs.settings
    warn_if_gpu_unusable(args)
    report_cache(settings)
    for site, plan in inputs.dpsgd_plans.items():
        print(
            f"DP-SGD {site}: {plan.n_train} training cases, sampling rate {plan.sample_rate:.3g}, "
            f"{plan.total_steps} steps, noise multiplier {plan.noise_multiplier:.4g} for epsilon "
            f"{plan.target_epsilon} at delta {plan.delta:.3g}",
            flush=True,
        )
    recipe = build_recipe(inputs)
    workspace = Path(args.workspace).resolve()
    try:
        run(args, recipe)
    except Exception as e:  # the simulator raises when an in-process site fails
        cause = first_client_error(workspace, args.job_name)
        print(f"error: job {args.job_name} failed: {cause or e}", file=sys.stderr)
        return EXIT_FAILED
    try:
        summary = summarize_job(
            workspace, args.job_name, settings.num_rounds, validating_sites(settings, args.n_clients)
        )
    except JobResultError as e:
        print(f"error: job {args.job_name} did not finish properly: {e}", file=sys.stderr)
        return EXIT_FAILED
    if settings.dp_mechanism:
        try:
            summary.extra_lines += privacy_summary(summary.paths.privacy_report, settings, args.n_clients)
        except (OSError, ValueError) as e:
            print(summary.render())
            print(f"error: job {args.job_name}: privacy accounting incomplete: {e}", file=sys.stderr)
            return EXIT_FAILED
    print(summary.render())
    return 0


def validating_sites(settings: TrainingSettings, n_clients: int) -> list[str]:
    """The sites whose validation Dice every round must carry."""
    if settings.validate_at == "every_site":
        return [f"site-{i}" for i in range(1, n_clients + 1)]
    return [settings.validating_site]


def report_cache(settings: TrainingSettings) -> None:
    """One line on the disk cache the sites will fill and reuse (temporary files of dead runs are removed)."""
    from brats_fl.cache import CaseCache

    if settings.cache_dir is None:
        print("Preprocessed-case cache: off (--no_cache); every case is loaded and preprocessed at every use.")
        return
    cache = CaseCache(settings.cache_dir)
    cache.remove_stale_temporaries()
    print(f"Preprocessed-case cache: {cache.describe()}", flush=True)


def warn_if_gpu_unusable(args: argparse.Namespace) -> None:
    """--gpu on a machine where torch sees no CUDA device still runs, on the CPU: say so rather than surprise."""
    import torch

    if args.gpu is not None and not torch.cuda.is_available():
        print(
            f"warning: --gpu {args.gpu} given but torch sees no CUDA device here; the sites will train on the CPU",
            file=sys.stderr,
            flush=True,
        )


def privacy_summary(report_path: Path, settings: TrainingSettings, n_clients: int) -> list[str]:
    """Summary lines of the privacy report; ValueError if any site/round is missing or went out unprotected."""
    from brats_fl.privacy.report import check_report, load_report, summary_lines

    report = load_report(report_path)
    check_report(report, [f"site-{i}" for i in range(1, n_clients + 1)], settings.num_rounds)
    return summary_lines(report, report_path)


if __name__ == "__main__":
    sys.exit(main())
