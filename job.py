"""Federated BraTS 2018 brain-tumour segmentation (Li et al., MLMI 2019) on NVIDIA FLARE's Job Recipe API.

    python job.py                                                       # demo: synthetic data, a few CPU minutes
    python job.py --dataset_base_dir /data/brats18 --n_clients 1        # centralised
    python job.py --dataset_base_dir /data/brats18 --n_clients 4        # federated
    python job.py --dataset_base_dir /data/brats18 --n_clients 4 --enable_dp                         # + SVT
    python job.py --dataset_base_dir /data/brats18 --n_clients 4 --enable_dp --dp_mechanism dpsgd    # + DP-SGD
    python job.py --resume /tmp/nvflare/simulation/brats18_4            # continue a stopped or crashed job
    python job.py --checkpoint <job>/server/simulate_job/app_server/best_FL_global_model.pt # score a checkpoint

Reads the flags into one set of training settings (brats_fl/settings.py), builds a FedAvg recipe around
BratsSegResNet (brats_fl/recipes.py: sites send weight differences, the server keeps the global model with the best
validation Dice and the last one), runs it in the NVFlare simulator, then has the sites score the best model on their
validation cases (the final evaluation) and prints a summary. Ctrl-C stops every process the job started and prints
the command that resumes it (brats_fl/runner.py, brats_fl/resume.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

# Importing nvflare.recipe strips NVFlare's own --export / --export-dir flags from sys.argv (recipe.execute honours
# them), so it must happen before our parser runs.
import nvflare.recipe  # noqa: F401

from brats_fl.job_results import JobPaths
from brats_fl.recipes import StartPoint
from brats_fl.runner import ENVIRONMENTS
from brats_fl.settings import (
    CACHE_FOLDER,
    DEFAULT_WORKSPACE,
    DEMO_OVERRIDES,
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_OK,
    MECHANISMS,
    REPO_DIR,
    SHIPPED_DATALIST_DIR,
    SettingsError,
    TrainingSettings,
    default,
    default_job_name,
    describe_default,
    site_names,
)
from brats_fl.site_data import DATA_CONFIG_ENV

MAX_DEFAULT_WORKERS = 8
FINAL_EVALUATION_JOB = "final_evaluation"  # <job>/final_evaluation/: the evaluation job run after training
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

    dep = p.add_argument_group("deployment (see docs/deployment.md)")
    dep.add_argument(
        "--env",
        choices=ENVIRONMENTS,
        default="sim",
        help="sim: NVFlare's simulator, every site on this machine; poc: a POC deployment NVFlare starts on this "
        "machine (server and sites as separate processes talking over the network, removed afterwards); prod: submit "
        "to a running provisioned project through --startup_kit. In poc and prod the job carries no data path: each "
        "site reads its own data setting (BRATS_DATA_CONFIG or local/brats_data.json); for poc job.py writes them "
        "from --dataset_base_dir (or the demo data) unless BRATS_DATA_CONFIG is already set. With the sites' own "
        "data (prod, or poc with BRATS_DATA_CONFIG) the training flags default to the paper's values (default: sim)",
    )
    dep.add_argument(
        "--startup_kit",
        metavar="DIR",
        help="with --env prod: the admin's startup kit of the provisioned project (the folder holding startup/)",
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

    lr = p.add_argument_group(
        "long runs (Ctrl-C or SIGTERM stops every process of the job and prints the command that resumes it; "
        "see docs/long_runs.md)"
    )
    lr.add_argument(
        "--resume",
        metavar="JOB_DIR",
        help="continue the stopped or crashed job in JOB_DIR (<workspace>/<job_name>) at the round after its last "
        "global model, with the settings it started with; only the flags of 'hardware' and of this group may be "
        "given besides, and --dataset_base_dir if the data moved",
    )
    lr.add_argument(
        "--stop_after_round",
        type=int,
        metavar="N",
        help="stop cleanly once round N is done, to --resume later (default: run every round)",
    )
    setting(lr, "stop_dice", "stop once the global val_dice reaches this value, in (0, 1]", type=float, metavar="X")
    setting(lr, "patience", "stop after N rounds without a better global val_dice", type=int, metavar="N")
    lr.add_argument(
        "--no_final_eval",
        action="store_true",
        help="skip the final evaluation: after training, the sites score the best model case by case on their "
        "validation cases and only the scores travel (default: on)",
    )
    lr.add_argument(
        "--checkpoint",
        metavar="CHECKPOINT",
        help="no training: the sites score this checkpoint as in the final evaluation. A checkpoint inside a job "
        "folder is scored with that job's settings and sites; any other with the settings of the flags",
    )
    return p


@dataclass
class JobInputs:
    """Everything the job is built from, checked."""

    args: argparse.Namespace
    settings: TrainingSettings
    job: JobPaths  # where the job's outputs are (with --checkpoint: the evaluation job's)
    start: StartPoint = field(default_factory=StartPoint)  # a resumed job's starting round and state
    explicit: dict = field(default_factory=dict)  # the flags given on the command line, by name
    dpsgd_plans: dict = field(default_factory=dict)  # site name -> DPSGDPlan, with --dp_mechanism dpsgd
    site_data_env: str | None = None  # --env poc: the BRATS_DATA_CONFIG value job.py set up for the sites


def explicit_flags(argv: list[str] | None) -> dict:
    """The flags actually given (argparse fills in defaults, which --resume must tell apart from choices)."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return vars(parser.parse_args(argv))


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
        cache_dir=cache_dir_setting(args),
        validate_at="every_site" if args.validate_every_site else "one_site",
        dataset_base_dir=None,  # filled in once the data is resolved
        datalist_json_path=None,
    )
    return TrainingSettings(**values)


def cache_dir_setting(args: argparse.Namespace) -> str | None:
    """The disk cache's folder: given, or <workspace>/preprocessed in the simulator; in a deployment by default a
    relative path, which each site takes inside its own workspace (a path of the submitter's machine means nothing
    there)."""
    if args.no_cache:
        return None
    if args.cache_dir:
        return str(Path(args.cache_dir).resolve())
    return CACHE_FOLDER if args.env != "sim" else str((Path(args.workspace) / CACHE_FOLDER).resolve())


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
    if args.env == "prod":
        check_startup_kit(args.startup_kit)
    if sites_read_own_data(args) and (args.dataset_base_dir or args.datalist_json_path):
        where = "--env prod" if args.env == "prod" else f"--env poc with {DATA_CONFIG_ENV} set"
        raise InputError(
            f"{where}: leave --dataset_base_dir and --datalist_json_path out: each site reads its own data "
            "setting (BRATS_DATA_CONFIG or local/brats_data.json, docs/deployment.md)"
        )
    if args.env != "prod" and args.startup_kit:
        raise InputError(f"--startup_kit is for --env prod (got --env {args.env})")
    if args.job_name is None:
        args.job_name = default_job_name(args.n_clients, args.dp_mechanism if args.enable_dp else None)
    if args.job_name in ("", ".", "..") or "/" in args.job_name:
        raise InputError(f"--job_name {args.job_name!r}: need a plain folder name")


def sites_read_own_data(args: argparse.Namespace) -> bool:
    """In prod, and in poc with BRATS_DATA_CONFIG set, each site reads its own data setting: the job names no data."""
    return args.env == "prod" or (args.env == "poc" and bool(os.environ.get(DATA_CONFIG_ENV)))


def check_startup_kit(kit: str | None) -> None:
    """--env prod logs in with an admin's startup kit: its startup/fed_admin.json names the server and the admin."""
    from brats_fl.runner import ADMIN_CONFIG, admin_username

    if not kit:
        raise InputError(f"--env prod needs --startup_kit, the admin's startup kit (the folder holding {ADMIN_CONFIG})")
    try:
        admin_username(Path(kit))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(
            f"--startup_kit {kit}: not an admin startup kit ({ADMIN_CONFIG}: {type(e).__name__}: {e}); give the "
            "folder nvflare provision wrote for the admin"
        ) from None


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
    args = build_parser().parse_args(argv)
    if Path.cwd().resolve() != REPO_DIR:
        raise InputError(f"run job.py from the repository root: cd {REPO_DIR} (the recipe ships client.py from there)")
    explicit = explicit_flags(argv)
    if args.resume and args.checkpoint:
        raise InputError("--resume and --checkpoint: give one (score a resumed job's best model once it has finished)")
    if args.stop_after_round is not None and args.stop_after_round < 0:
        raise InputError(f"--stop_after_round {args.stop_after_round}: need a round number >= 0")
    from brats_fl.resume import ResumeError, settings_beside

    try:
        if args.resume:
            inputs = prepare_resume(args, explicit)
        elif args.checkpoint and settings_beside(Path(args.checkpoint)):
            inputs = prepare_evaluation_of_job_model(args, explicit, settings_beside(Path(args.checkpoint)))
        else:
            inputs = prepare_new_job(args, explicit)
    except ResumeError as e:
        raise InputError(str(e)) from None
    check_not_running(inputs.job.job_dir)
    return inputs


def check_not_running(job_dir: Path) -> None:
    """A job whose simulator still runs (its job.py was killed outright) must not be started or resumed again: the
    new run would wipe or fold the folder the old one writes to."""
    from brats_fl.runner import job_processes_elsewhere

    running = job_processes_elsewhere(job_dir)
    if running:
        pids = " ".join(str(p.pid) for p in running)
        raise InputError(
            f"{job_dir}: {len(running)} NVFlare process(es) of an earlier run of this job are still running; "
            f"stop them first (kill {pids}) or choose another --job_name"
        )


def checked(settings: TrainingSettings) -> TrainingSettings:
    """settings, or InputError naming the first flag no run can use."""
    from brats_fl.privacy import PrivacyConfigError
    from brats_fl.privacy.dpsgd import check_dpsgd_values

    try:
        settings.check()
        if settings.dp_mechanism == "dpsgd":
            check_dpsgd_values(settings.dp_target_epsilon, settings.dp_delta, settings.dp_max_grad_norm)
    except (SettingsError, PrivacyConfigError) as e:
        raise InputError(str(e)) from None
    return settings


def prepare_new_job(args: argparse.Namespace, explicit: dict) -> JobInputs:
    """A job (or a --checkpoint run) whose settings are the flags."""
    check_job_flags(args)
    demo = args.dataset_base_dir is None and args.datalist_json_path is None and not sites_read_own_data(args)
    if args.checkpoint and "job_name" not in explicit:
        args.job_name = f"{Path(args.checkpoint).stem}_evaluation"
    settings = checked(settings_from_flags(args, demo))
    if args.checkpoint:
        check_checkpoint(Path(args.checkpoint), settings)
    job = JobPaths(Path(args.workspace).resolve(), args.job_name)
    inputs = JobInputs(args, settings, job, explicit=explicit)
    if sites_read_own_data(args):  # real data at every site: the paper's defaults, as for --dataset_base_dir
        settings.validate_at = "every_site"  # each site validates on its own cases, unseen by the submitter
        return inputs
    dataset_dir, datalist_dir = resolve_data(args, demo)
    settings.dataset_base_dir = str(dataset_dir.resolve())
    settings.datalist_json_path = str(datalist_dir.resolve())
    if settings.validate_at == "one_site" and not validation_is_shared(datalist_dir, args.n_clients):
        settings.validate_at = "every_site"
        print("The sites' datalists list different validation cases: every site validates on its own.", flush=True)
    if settings.validate_at == "one_site":
        settings.validating_site = lightest_site(datalist_dir, args.n_clients)
    if settings.dp_mechanism == "dpsgd" and not args.checkpoint:
        inputs.dpsgd_plans = plan_dpsgd_sites(settings, args.n_clients)
    if args.env == "poc":
        inputs.site_data_env = write_poc_site_settings(settings, args.n_clients, job)
    return inputs


def write_poc_site_settings(settings: TrainingSettings, n_clients: int, job: JobPaths) -> str:
    """For a POC run, play each hospital's part: write every site's own data setting (brats_fl/site_data.py) next to
    the job folder, and take the data paths out of the job, which then carries none, as in a real deployment."""
    from brats_fl.site_data import SiteData, write_site_configs
    from dataset_brats18.datalist import site_datalist_names

    datalists = Path(settings.datalist_json_path)
    configs = {
        f"site-{i}": SiteData(Path(settings.dataset_base_dir), datalists / f"{name}.json")
        for i, name in enumerate(site_datalist_names(n_clients), start=1)
    }
    value = write_site_configs(site_settings_dir(job), configs)
    settings.dataset_base_dir = settings.datalist_json_path = None
    print(f"POC: each site reads its data setting from {DATA_CONFIG_ENV}={value}", flush=True)
    return value


def prepare_resume(args: argparse.Namespace, explicit: dict) -> JobInputs:
    """A stopped or crashed job, continued with the settings it started with."""
    from brats_fl.privacy.report import load_report
    from brats_fl.resume import (
        RESUME_MAY_SET,
        apply_resume_flags,
        count_sites,
        job_end,
        read_job_settings,
        refuse_changed_settings,
        start_point,
    )

    job_dir = Path(args.resume).resolve()
    job = JobPaths(job_dir.parent, job_dir.name)
    what = f"--resume {args.resume}"
    settings = read_job_settings(job, what)
    args.n_clients = count_sites(job_dir, what)
    refuse_changed_settings(
        explicit,
        settings,
        args.n_clients,
        RESUME_MAY_SET,
        what,
        "a resumed job goes on with the settings it started with (leave the flag out, or start a new job with "
        "another --job_name)",
    )
    args.job_name, args.workspace = job.job_name, str(job.workspace_root)
    check_job_flags(args)
    settings = checked(apply_resume_flags(settings, explicit, max(1, cores_per_site(args))))
    check_job_data(settings, args.n_clients, what, args.env)
    site_data_env = poc_site_settings_of(job, settings, args.env)
    start = start_point(job, what)
    finished = job_end(job)
    if finished or start.round >= settings.num_rounds:
        raise InputError(
            f"{what}: the job already {finished or f'ran all {settings.num_rounds} rounds'}; nothing to resume "
            f"(score its best model with: python job.py --checkpoint {job.best_model})"
        )
    if args.stop_after_round is not None and args.stop_after_round < start.round:
        raise InputError(f"--stop_after_round {args.stop_after_round}: the job resumes at round {start.round}")
    if start.privacy_report is not None and load_report(start.privacy_report).get("mechanism") != settings.dp_mechanism:
        raise InputError(f"{what}: {start.privacy_report} is not a {settings.dp_mechanism} report")
    planned_here = settings.dp_mechanism == "dpsgd" and settings.dataset_base_dir is not None  # else by each site
    plans = plan_dpsgd_sites(settings, args.n_clients) if planned_here else {}
    inputs = JobInputs(args, settings, job, start, explicit, plans)
    inputs.site_data_env = site_data_env
    return inputs


def poc_site_settings_of(job: JobPaths, settings: TrainingSettings, env: str) -> str | None:
    """A POC job's sites, resumed or evaluated, read the data settings job.py wrote for them when it started,
    unless BRATS_DATA_CONFIG is set."""
    if env != "poc" or settings.dataset_base_dir is not None or os.environ.get(DATA_CONFIG_ENV):
        return None
    folder = site_settings_dir(job)
    if not folder.is_dir():
        raise InputError(f"--env poc: no site data settings in {folder}: set {DATA_CONFIG_ENV} (docs/deployment.md)")
    return str(folder / "{site}.json")


def site_settings_dir(job: JobPaths) -> Path:
    """Where job.py writes each POC site's data setting, next to the job folder."""
    return job.workspace_root / f"{job.job_name}_site_data"


def prepare_evaluation_of_job_model(args: argparse.Namespace, explicit: dict, settings_file: Path) -> JobInputs:
    """--checkpoint naming a file inside a job folder: that job's settings and sites; the evaluation job goes next
    to that job unless --workspace says otherwise."""
    from brats_fl.resume import (
        RESUME_MAY_SET,
        apply_resume_flags,
        count_sites,
        read_job_settings,
        refuse_changed_settings,
    )

    job_dir = settings_file.parents[4]  # <job>/server/simulate_job/app_server/custom/brats_settings.json
    what = f"--checkpoint {args.checkpoint}"
    settings = read_job_settings(JobPaths(job_dir.parent, job_dir.name), what, settings_file)
    args.n_clients = count_sites(job_dir, what)
    refuse_changed_settings(
        explicit,
        settings,
        args.n_clients,
        RESUME_MAY_SET | {"checkpoint", "job_name", "workspace"},
        what,
        "a job's model is scored with the settings it was trained with (leave the flag out)",
    )
    if "job_name" not in explicit:
        args.job_name = f"{job_dir.name}_evaluation"
    if "workspace" not in explicit:
        args.workspace = str(job_dir.parent)
    check_job_flags(args)
    settings = checked(apply_resume_flags(settings, explicit, max(1, cores_per_site(args))))
    check_checkpoint(Path(args.checkpoint), settings)
    check_job_data(settings, args.n_clients, what, args.env)
    inputs = JobInputs(args, settings, JobPaths(Path(args.workspace).resolve(), args.job_name), explicit=explicit)
    inputs.site_data_env = poc_site_settings_of(JobPaths(job_dir.parent, job_dir.name), settings, args.env)
    return inputs


def check_job_data(settings: TrainingSettings, n_clients: int, what: str, env: str) -> None:
    """The job's data is still where its settings say (a data folder that moved needs --dataset_base_dir); a job
    whose sites read their own data settings runs in a deployment only."""
    from dataset_brats18.datalist import DatalistError, check_job_datalists, site_datalist_names

    if settings.dataset_base_dir is None:
        if env == "sim":
            raise InputError(
                f"{what}: the job's sites read their own data settings (it ran with --env poc or prod): give "
                "--env poc, or --env prod --startup_kit <admin kit>"
            )
        return
    try:
        check_job_datalists(
            Path(settings.datalist_json_path), settings.dataset_base_dir, site_datalist_names(n_clients)
        )
    except DatalistError as e:
        raise InputError(f"{what}: {e} (if the data moved, give its new folder with --dataset_base_dir)") from None


def check_checkpoint(path: Path, settings: TrainingSettings) -> None:
    """The checkpoint exists and fits the model the settings describe."""
    from brats_fl.evaluation import checkpoint_problem

    if not path.is_file():
        raise InputError(f"--checkpoint {path}: no such file")
    problem = checkpoint_problem(path, make_model(settings))
    if problem:
        raise InputError(
            f"--checkpoint {path}: does not fit the model of --init_filters {settings.init_filters}: {problem}"
        )


def make_model(settings: TrainingSettings):
    from model import BratsSegResNet

    return BratsSegResNet(init_filters=settings.init_filters, init_seed=settings.seed)


# ---------------------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    try:
        inputs = prepare(argv)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    warn_if_gpu_unusable(inputs.args)
    report_cache(inputs.settings)
    if inputs.args.checkpoint:
        return evaluate_checkpoint(inputs)
    for site, plan in inputs.dpsgd_plans.items():
        print(
            f"DP-SGD {site}: {plan.n_train} training cases, sampling rate {plan.sample_rate:.3g}, "
            f"{plan.total_steps} steps, noise multiplier {plan.noise_multiplier:.4g} for epsilon "
            f"{plan.target_epsilon} at delta {plan.delta:.3g}",
            flush=True,
        )
    return train(inputs)


def train(inputs: JobInputs) -> int:
    """Run the rounds (all, or up to --stop_after_round), fold a resumed part into the job, then summarise and
    evaluate; a stop or a failure prints how to resume."""
    from brats_fl.job_results import JobResultError, early_stop_of, summarize_job
    from brats_fl.resume import fold_part_into_job, part_paths

    args, settings, job, start = inputs.args, inputs.settings, inputs.job, inputs.start
    last_round = settings.num_rounds - 1
    if args.stop_after_round is not None:
        last_round = min(args.stop_after_round, last_round)
    run_paths = job if start.round == 0 else part_paths(job, start.round)
    if start.round:
        print(
            f"Resuming job {job.job_name} at round {start.round} of {settings.num_rounds} from {start.initial_ckpt}; "
            f"this part runs in {run_paths.job_dir} and is folded into the job when it ends.",
            flush=True,
        )
    recipe = build_recipe(inputs, run_paths.job_name, last_round + 1 - start.round)
    outcome = run(inputs, recipe, run_paths)
    if start.round:
        fold_part_into_job(job, run_paths, start.round)
    if outcome.interrupted:
        print(stop_line(inputs, f"Stopped by {outcome.interrupted}"), file=sys.stderr, flush=True)
        return outcome.interrupted.exit_code
    if outcome.error:
        print(f"error: job {job.job_name} failed: {outcome.error}", file=sys.stderr)
        print(stop_line(inputs, "Once the cause is fixed, the job can go on:"), file=sys.stderr)
        return EXIT_FAILED
    early_stop = early_stop_of(run_paths.server_log)
    if early_stop is None and last_round < settings.num_rounds - 1:
        print(stop_line(inputs, "Stopped as --stop_after_round asked"), flush=True)
        return EXIT_OK
    try:
        summary = summarize_job(
            job.workspace_root,
            job.job_name,
            early_stop[1] + 1 if early_stop else settings.num_rounds,
            validating_sites(settings, args.n_clients),
        )
        if settings.dp_mechanism:
            summary.extra_lines += privacy_summary(summary.paths.privacy_report, args.n_clients, len(summary.rounds))
    except (JobResultError, OSError, ValueError) as e:
        print(f"error: job {job.job_name} did not finish properly: {e}", file=sys.stderr)
        return EXIT_FAILED
    if early_stop:
        summary.extra_lines.append(f"  stopped early by {early_stop[0]} at round {early_stop[1]}")
    if args.no_final_eval:
        print(summary.render())
        return EXIT_OK
    outcome, table = evaluate_at_sites(inputs, job.best_model, JobPaths(job.job_dir, FINAL_EVALUATION_JOB), job)
    if table:
        summary.extra_lines += final_evaluation_lines(job, table)
    print(summary.render())
    if outcome.interrupted or outcome.error:
        why = f"stopped by {outcome.interrupted}" if outcome.interrupted else f"failed: {outcome.error}"
        print(
            f"error: the final evaluation {why}; training is complete: score the best model with "
            f"python job.py --checkpoint {job.best_model}",
            file=sys.stderr,
        )
        return outcome.interrupted.exit_code if outcome.interrupted else EXIT_FAILED
    return EXIT_OK


def build_recipe(inputs: JobInputs, name: str | None = None, rounds_to_run: int | None = None):
    """The training job of these inputs (brats_fl/recipes.py), by default all rounds from the start point."""
    from dataclasses import replace

    from brats_fl.recipes import build_training_recipe

    settings, start = inputs.settings, inputs.start
    if start.initial_ckpt is not None:
        start = replace(start, initial_ckpt=checkpoint_for(inputs, start.initial_ckpt))
    return build_training_recipe(
        settings,
        make_model(settings),
        name or inputs.job.job_name,
        inputs.args.n_clients,
        settings.num_rounds - start.round if rounds_to_run is None else rounds_to_run,
        start,
        named_sites=inputs.args.env != "sim",
    )


def checkpoint_for(inputs: JobInputs, path: Path) -> Path:
    """A checkpoint as the recipe should name it: absolute in the simulator (the server reads it where it is),
    relative in a deployment, which makes NVFlare carry the file inside the job to the server."""
    return Path(path).resolve() if inputs.args.env == "sim" else Path(os.path.relpath(Path(path).resolve()))


def run(inputs: JobInputs, recipe, paths: JobPaths):
    """Run a recipe where --env says (brats_fl/runner.py); the server's outputs land in paths.server_job_dir."""
    from brats_fl.runner import run_job

    args = inputs.args
    if inputs.site_data_env:
        os.environ[DATA_CONFIG_ENV] = inputs.site_data_env  # the POC's sites are started from this process
    return run_job(recipe, paths, args.n_clients, args.threads, args.gpu, args.env, args.startup_kit)


def stop_line(inputs: JobInputs, head: str) -> str:
    """One line: how far the job got, where its last global model is, and the command that continues it."""
    from brats_fl.resume import last_model_round, resume_command

    job, total = inputs.job, inputs.settings.num_rounds
    last = last_model_round(job)
    if last < 0:
        return f"{head} before round 0 ended: nothing to resume from; start the job again."
    return (
        f"{head} after round {last} of rounds 0-{total - 1}; last global model: {job.last_global_model}; "
        f"resume with: {resume_command(job.job_dir, inputs.explicit)}"
    )


def evaluate_at_sites(inputs: JobInputs, checkpoint: Path, eval_paths: JobPaths, output: JobPaths):
    """Run the evaluation job; on success write the results table and per-case CSV into output's server folder.
    Returns (RunOutcome, table path or None)."""
    from brats_fl.evaluation import write_results
    from brats_fl.job_results import FINAL_EVALUATION_FILE
    from brats_fl.recipes import build_evaluation_recipe
    from brats_fl.runner import RunOutcome

    args, settings = inputs.args, inputs.settings
    print(f"Final evaluation: the sites score {checkpoint} on their validation cases.", flush=True)
    model_file = checkpoint_for(inputs, checkpoint)
    recipe = build_evaluation_recipe(
        settings, make_model(settings), eval_paths.job_name, args.n_clients, model_file, named_sites=args.env != "sim"
    )
    outcome = run(inputs, recipe, eval_paths)
    if outcome.interrupted or outcome.error:
        return outcome, None
    scores = eval_paths.server_job_dir / FINAL_EVALUATION_FILE
    if not scores.is_file():
        return RunOutcome(
            error=f"no site sent scores ({scores} is missing); see {eval_paths.job_dir}/site-*/log.txt"
        ), None
    output.server_job_dir.mkdir(parents=True, exist_ok=True)
    write_results(json.loads(scores.read_text()), output.final_evaluation_table, output.final_evaluation_csv)
    return outcome, output.final_evaluation_table


def final_evaluation_lines(output: JobPaths, table: Path) -> list[str]:
    return [
        "  final evaluation of the best model at the sites (means over cases, BraTS conventions: a region empty in "
        "truth and prediction scores Dice 1, in one only 0;",
        f"  every score of every case in {output.final_evaluation_csv}):",
        *(f"    {line}" for line in table.read_text().splitlines()),
    ]


def evaluate_checkpoint(inputs: JobInputs) -> int:
    """--checkpoint: the sites score one checkpoint; the table goes into the evaluation job's server folder."""
    checkpoint = Path(inputs.args.checkpoint).resolve()
    outcome, table = evaluate_at_sites(inputs, checkpoint, inputs.job, inputs.job)
    if outcome.interrupted:
        print(f"Stopped by {outcome.interrupted}: the evaluation did not finish.", file=sys.stderr)
        return outcome.interrupted.exit_code
    if outcome.error:
        print(f"error: the evaluation of {checkpoint} failed: {outcome.error}", file=sys.stderr)
        return EXIT_FAILED
    print("\n".join([f"Evaluation of {checkpoint} finished:", *final_evaluation_lines(inputs.job, table)]))
    return EXIT_OK


def validating_sites(settings: TrainingSettings, n_clients: int) -> list[str]:
    """The sites whose validation Dice every round must carry."""
    if settings.validate_at == "every_site":
        return site_names(n_clients)
    return [settings.validating_site]


def report_cache(settings: TrainingSettings) -> None:
    """One line on the disk cache the sites will fill and reuse (temporary files of dead runs are removed)."""
    from brats_fl.cache import CaseCache

    if settings.cache_dir is None:
        print("Preprocessed-case cache: off (--no_cache); every case is loaded and preprocessed at every use.")
        return
    if not Path(settings.cache_dir).is_absolute():
        print(f"Preprocessed-case cache: at each site, in <its workspace>/{settings.cache_dir}", flush=True)
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


def privacy_summary(report_path: Path, n_clients: int, num_rounds: int) -> list[str]:
    """Summary lines of the privacy report; ValueError if any site/round is missing or went out unprotected."""
    from brats_fl.privacy.report import check_report, load_report, summary_lines

    report = load_report(report_path)
    check_report(report, site_names(n_clients), num_rounds)
    return summary_lines(report, report_path)


if __name__ == "__main__":
    sys.exit(main())
