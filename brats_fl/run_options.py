"""What job.py runs, worked out once from the flags and checked: :class:`RunOptions`.

:func:`prepare_run` takes the parsed flags (brats_fl/cli.py) to the settings of a new job, or to those of a job that
exists (``--resume``, or ``--checkpoint`` of a model inside a job folder: :func:`existing_job`, the one path both
share), then checks everything a run needs before any file is written. A user error raises InputError with one line
that names the flag or file and what to do.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from brats_fl.cli import EVALUATE, RESUME, build_parser, first_changed_flag, given_flags, settings_from_flags, shown
from brats_fl.environments import Environment, environment
from brats_fl.job_results import JobPaths
from brats_fl.privacy.audit import NOT_RESUMABLE, audit_flag_problem, hold_out_problem, trained_case_count
from brats_fl.resume import StartPoint, count_sites, job_end, part_paths, read_job_settings, start_point
from brats_fl.settings import (
    REPO_DIR,
    SHIPPED_DATALIST_DIR,
    InputError,
    TrainingSettings,
    default_job_name,
    site_names,
)

MAX_DEFAULT_WORKERS = 8


@dataclass(frozen=True)
class RunOptions:
    """Everything one run of job.py needs, fixed before it starts."""

    settings: TrainingSettings
    n_clients: int
    job: JobPaths  # the job's folder (with --checkpoint: the evaluation job's)
    env: Environment
    threads: int  # sites running at once
    gpu: str | None = None
    start: StartPoint = StartPoint()  # round 0, or where a resumed job goes on
    stop_after_round: int | None = None
    final_eval: bool = True
    checkpoint: Path | None = None  # --checkpoint: the sites score it, no training
    given: dict[str, Any] = field(default_factory=dict)  # the flags on the command line (the resume line repeats some)
    dpsgd_plans: dict[str, Any] = field(default_factory=dict)  # site -> DPSGDPlan, when job.py calibrates DP-SGD
    trackers: tuple[str, ...] = ("tensorboard",)  # --tracking: NVFlare's receivers of the sites' curves at the server
    tracking_uri: str | None = None  # --tracking_uri: the MLflow store (None: mlflow.db in the server's job folder)

    @property
    def sites(self) -> list[str]:
        return site_names(self.n_clients)

    @property
    def last_round(self) -> int:
        """The last round this run trains (--stop_after_round may end it early)."""
        last = self.settings.num_rounds - 1
        return last if self.stop_after_round is None else min(self.stop_after_round, last)

    @property
    def rounds_to_run(self) -> int:
        return self.last_round + 1 - self.start.round

    @property
    def run_paths(self) -> JobPaths:
        """Where this run's NVFlare job runs: the job's folder, or for a resumed job its continuation's folder (the
        simulator wipes the folder it runs in)."""
        return self.job if self.start.round == 0 else part_paths(self.job, self.start.round)


def run_from_argv(argv: list[str] | None, description: str | None = None) -> RunOptions:
    """Parse job.py's command line (None: sys.argv) and prepare the run it asks for."""
    return prepare_run(build_parser(description).parse_args(argv), given_flags(argv))


def prepare_run(args: argparse.Namespace, given: dict[str, Any]) -> RunOptions:
    """The run the flags ask for, checked; InputError before any file is written (the demo's data aside)."""
    from brats_fl.nvflare_compat import NVFlareVersionError, require_nvflare_version

    try:
        require_nvflare_version()
    except NVFlareVersionError as e:
        raise InputError(str(e)) from None
    if Path.cwd().resolve() != REPO_DIR:
        raise InputError(f"run job.py from the repository root: cd {REPO_DIR} (the recipe ships client.py from there)")
    if args.resume and args.checkpoint:
        raise InputError("--resume and --checkpoint: give one (score a resumed job's best model once it has finished)")
    if args.stop_after_round is not None and args.stop_after_round < 0:
        raise InputError(f"--stop_after_round {args.stop_after_round}: need a round number >= 0")
    env = environment(args.env, args.startup_kit)
    audit_problem = audit_flag_problem(args.audit, given, args.env, bool(args.checkpoint))
    if audit_problem:
        raise InputError(audit_problem)
    if args.resume:
        run = resumed_job(Path(args.resume), args, given, env)
    elif args.checkpoint and job_of_model(Path(args.checkpoint)):
        run = evaluation_of_job_model(job_of_model(Path(args.checkpoint)), args, given, env)
    else:
        run = new_job(args, given, env)
    check_not_running(run.job.job_dir)
    return replace(run, **tracking_options(args.tracking, args.tracking_uri))


def tracking_options(tracking: str, tracking_uri: str | None) -> dict[str, Any]:
    """--tracking and --tracking_uri as RunOptions fields, checked: the URI needs MLflow, MLflow needs its package."""
    trackers = ("tensorboard", "mlflow") if tracking == "both" else (tracking,)
    if tracking_uri is not None and "mlflow" not in trackers:
        raise InputError(f"--tracking_uri {tracking_uri}: only MLflow takes it; add --tracking mlflow (or both)")
    if tracking_uri is not None and "://" not in tracking_uri and not tracking_uri.startswith("file:"):
        raise InputError(
            f"--tracking_uri {tracking_uri}: give an MLflow tracking URI, e.g. http://host:5000 or "
            "sqlite:////absolute/path/mlflow.db"
        )
    if "mlflow" in trackers:
        import importlib.util

        if importlib.util.find_spec("mlflow") is None:
            raise InputError("--tracking mlflow: MLflow is not installed; pip install -r requirements.txt")
    return {"trackers": trackers, "tracking_uri": tracking_uri}


# ---------------------------------------------------------------------------------------------------------------
# A new job: its settings are the flags
# ---------------------------------------------------------------------------------------------------------------
def new_job(args: argparse.Namespace, given: dict[str, Any], env: Environment) -> RunOptions:
    """A job (or the evaluation of a checkpoint outside any job) whose settings are the flags."""
    n = args.n_clients
    if n < 1:
        raise InputError(f"--n_clients {n}: need at least 1 client")
    threads = check_hardware_flags(args, n)
    if env.sites_read_own_data and (args.dataset_base_dir or args.datalist_json_path):
        where = "--env prod" if env.name == "prod" else "--env poc with BRATS_DATA_CONFIG set"
        raise InputError(
            f"{where}: leave --dataset_base_dir and --datalist_json_path out: each site reads its own data "
            "setting (BRATS_DATA_CONFIG or local/brats_data.json, docs/deployment.md)"
        )
    job = JobPaths(Path(args.workspace).resolve(), new_job_name(args))
    demo = args.dataset_base_dir is None and args.datalist_json_path is None and not env.sites_read_own_data
    settings = checked(settings_from_flags(args, demo, **hardware_settings(args, n, threads, env, job)))
    if args.checkpoint:
        check_checkpoint(Path(args.checkpoint), settings)
    else:
        check_no_earlier_run(job, args.overwrite)
    run = RunOptions(
        settings,
        n,
        job,
        env,
        threads,
        args.gpu,
        stop_after_round=args.stop_after_round,
        final_eval=not args.no_final_eval,
        checkpoint=Path(args.checkpoint).resolve() if args.checkpoint else None,
        given=given,
    )
    if env.sites_read_own_data:  # real data at every site: each validates on its own cases, unseen by the submitter
        return replace(run, settings=replace(settings, validate_at="every_site"))
    dataset_dir, datalist_dir = resolve_data(args, demo, n)
    settings = replace(settings, dataset_base_dir=str(dataset_dir.resolve()), datalist_json_path=str(datalist_dir))
    settings = with_validating_site(settings, n)
    if settings.audit:
        check_audit_hold_out(settings, n)
    plans = plan_dpsgd_sites(settings, n) if settings.dp_mechanism == "dpsgd" and not args.checkpoint else {}
    env, settings = env.with_site_data(settings, n, job)
    return replace(run, settings=settings, env=env, dpsgd_plans=plans)


def new_job_name(args: argparse.Namespace) -> str:
    if args.job_name is not None:
        name = args.job_name
    elif args.checkpoint:
        name = f"{Path(args.checkpoint).stem}_evaluation"
    else:
        name = default_job_name(args.n_clients, args.dp_mechanism if args.enable_dp else None)
    if name in ("", ".", "..") or "/" in name:
        raise InputError(f"--job_name {name!r}: need a plain folder name")
    return name


def check_no_earlier_run(job: JobPaths, overwrite: bool) -> None:
    """NVFlare's simulator wipes the folder a job runs in: a folder holding an earlier run's global models (days of
    training, perhaps) is only started afresh when --overwrite says so."""
    models = [p for p in (job.best_model, job.last_global_model, job.nvflare_global_model) if p.is_file()]
    if models and not overwrite:
        raise InputError(
            f"{job.job_dir} holds an earlier run of this job ({models[0].name}): if it stopped early, continue it with "
            f"--resume {job.job_dir}; start it afresh with --overwrite (deletes that folder); or choose another "
            "--job_name"
        )


def resolve_data(args: argparse.Namespace, demo: bool, n_clients: int) -> tuple[Path, Path]:
    """Dataset and datalist folders; makes the synthetic demo dataset when none is given."""
    from dataset_brats18.datalist import DatalistError, check_job_datalists, site_datalist_names

    if demo:
        from brats_fl.settings import DEMO_SHAPE, DEMO_TRAIN_CASES, DEMO_VALIDATION_CASES
        from dataset_brats18.synthetic import generate_dataset, write_federated_datalists

        data_dir = Path(args.workspace) / "synthetic_brats18"
        cases = generate_dataset(data_dir, DEMO_TRAIN_CASES + DEMO_VALIDATION_CASES, DEMO_SHAPE)
        datalist_dir = write_federated_datalists(
            cases, data_dir / f"datalist_{n_clients}_sites", n_clients, DEMO_VALIDATION_CASES
        )
        print(
            f"No dataset given: running the synthetic demo ({len(cases)} BraTS-like cases of "
            f"{'x'.join(map(str, DEMO_SHAPE))} voxels in {data_dir}, datalists in {datalist_dir}).",
            flush=True,
        )
        return data_dir, datalist_dir.resolve()
    if args.dataset_base_dir is None:
        raise InputError("--datalist_json_path needs --dataset_base_dir (the folder its paths are relative to)")
    datalist_dir = Path(args.datalist_json_path) if args.datalist_json_path else SHIPPED_DATALIST_DIR
    try:
        check_job_datalists(datalist_dir, args.dataset_base_dir, site_datalist_names(n_clients))
    except DatalistError as e:
        raise InputError(str(e)) from None
    return Path(args.dataset_base_dir), datalist_dir.resolve()


def site_datalists(settings: TrainingSettings, n_clients: int) -> dict[str, dict]:
    """Each site's datalist, by site name (the centralised site reads site-All.json)."""
    from brats_fl.pipeline import read_datalist
    from dataset_brats18.datalist import site_datalist_names

    folder = Path(settings.datalist_json_path)
    names = site_datalist_names(n_clients)
    return {site: read_datalist(folder / f"{name}.json") for site, name in zip(site_names(n_clients), names)}


def with_validating_site(settings: TrainingSettings, n_clients: int) -> TrainingSettings:
    """Who validates the global model: when every site lists the same validation cases (the paper's setting), the
    site with the fewest training cases does it once for all (it finishes its training first, so validating adds
    least to the round); every site otherwise."""
    if settings.validate_at == "every_site":
        return settings
    datalists = site_datalists(settings, n_clients)
    validation = [d["validation"] for d in datalists.values()]
    if any(v != validation[0] for v in validation):
        print("The sites' datalists list different validation cases: every site validates on its own.", flush=True)
        return replace(settings, validate_at="every_site")
    sizes = {site: len(d["training"]) for site, d in datalists.items()}
    return replace(settings, validating_site=min(sizes, key=sizes.get))  # the first of them on a tie


def check_audit_hold_out(settings: TrainingSettings, n_clients: int) -> None:
    """--audit holds out half of each site's training cases: every site needs at least 2."""
    for site, datalist in site_datalists(settings, n_clients).items():
        problem = hold_out_problem(site, len(datalist["training"]))
        if problem:
            raise InputError(problem)


def plan_dpsgd_sites(settings: TrainingSettings, n_clients: int) -> dict:
    """Calibrate each site's DP-SGD noise now, so a target the accountant cannot reach stops the job before it runs.
    Each site repeats the same (deterministic) calibration from its own datalist."""
    from brats_fl.privacy import PrivacyConfigError
    from brats_fl.privacy.dpsgd import plan_dpsgd

    plans = {}
    for site, datalist in site_datalists(settings, n_clients).items():
        try:
            plans[site] = plan_dpsgd(
                trained_case_count(settings, len(datalist["training"])),  # with --audit: half of them
                settings.num_rounds,
                settings.aggregation_epochs,
                settings.dp_target_epsilon,
                settings.dp_delta,
                settings.dp_max_grad_norm,
                site=site,
            )
        except PrivacyConfigError as e:
            raise InputError(str(e)) from None
    return plans


# ---------------------------------------------------------------------------------------------------------------
# A job that exists: its settings come from its folder
# ---------------------------------------------------------------------------------------------------------------
def job_of_model(model: Path) -> JobPaths | None:
    """The job a model file belongs to (its best or last global model), if it is inside a job made by job.py."""
    from brats_fl.nvflare_compat import job_dir_of_model

    job_dir = job_dir_of_model(model)
    job = JobPaths(job_dir.parent, job_dir.name) if job_dir else None
    return job if job and job.settings_file.is_file() else None


def existing_job(job: JobPaths, args: argparse.Namespace, given: dict, mode: str, what: str, env: Environment):
    """(settings, number of sites, threads, environment) of a job that exists, for mode RESUME or EVALUATE: the
    settings it started with, on this machine's hardware; a flag that would change them is refused."""
    settings = read_job_settings(job, what)
    n = count_sites(job.job_dir, what)
    changed = first_changed_flag(given, settings, n, mode)
    if changed:
        flag, value, theirs = changed
        if isinstance(theirs, KeyError):
            raise InputError(f"{what}: --{flag} cannot be given here: the job folder fixes it")
        why = {
            RESUME: "a resumed job goes on with the settings it started with (leave the flag out, or start a new "
            "job with another --job_name)",
            EVALUATE: "a job's model is scored with the settings it was trained with (leave the flag out)",
        }[mode]
        raise InputError(f"{what}: --{flag} {shown(value)} differs from the job's {shown(theirs)}: {why}")
    threads = check_hardware_flags(args, n)
    changes = {name: given[name] for name in ("stop_dice", "patience") if name in given} | hardware_settings(
        args, n, threads, env, job, keep=settings
    )
    if "dataset_base_dir" in given:
        changes["dataset_base_dir"] = str(Path(given["dataset_base_dir"]).resolve())
    if given.get("no_amp"):
        changes["amp"] = False
    settings = checked(replace(settings, **changes))
    env = env.check_existing_job_data(settings, job, what)
    check_job_data(settings, n, what)
    return settings, n, threads, env


def resumed_job(job_dir: Path, args: argparse.Namespace, given: dict, env: Environment) -> RunOptions:
    """A stopped or crashed job, continued with the settings it started with."""
    from brats_fl.privacy.report import load_report

    job, what = JobPaths(job_dir.resolve().parent, job_dir.resolve().name), f"--resume {args.resume}"
    settings, n, threads, env = existing_job(job, args, given, RESUME, what, env)
    if settings.audit:
        raise InputError(f"{what}: {NOT_RESUMABLE}")
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
    return RunOptions(
        settings,
        n,
        job,
        env,
        threads,
        args.gpu,
        start=start,
        stop_after_round=args.stop_after_round,
        final_eval=not args.no_final_eval,
        given=given,
        dpsgd_plans=plan_dpsgd_sites(settings, n) if planned_here else {},
    )


def evaluation_of_job_model(job: JobPaths, args: argparse.Namespace, given: dict, env: Environment) -> RunOptions:
    """--checkpoint of a model inside a job folder: that job's settings and sites; the evaluation job goes next to
    that job unless --workspace says otherwise."""
    what = f"--checkpoint {args.checkpoint}"
    settings, n, threads, env = existing_job(job, args, given, EVALUATE, what, env)
    check_checkpoint(Path(args.checkpoint), settings)
    workspace = Path(given["workspace"]).resolve() if "workspace" in given else job.workspace_root
    name = given.get("job_name", f"{job.job_name}_evaluation")
    evaluation = JobPaths(workspace, name)
    return RunOptions(settings, n, evaluation, env, threads, args.gpu, checkpoint=Path(args.checkpoint).resolve())


def check_job_data(settings: TrainingSettings, n_clients: int, what: str) -> None:
    """The job's data is still where its settings say (a data folder that moved needs --dataset_base_dir)."""
    from dataset_brats18.datalist import DatalistError, check_job_datalists, site_datalist_names

    if settings.dataset_base_dir is None:  # each site reads its own data setting
        return
    try:
        check_job_datalists(
            Path(settings.datalist_json_path), settings.dataset_base_dir, site_datalist_names(n_clients)
        )
    except DatalistError as e:
        raise InputError(f"{what}: {e} (if the data moved, give its new folder with --dataset_base_dir)") from None


# ---------------------------------------------------------------------------------------------------------------
# Checks and settings every run shares
# ---------------------------------------------------------------------------------------------------------------
def check_hardware_flags(args: argparse.Namespace, n_clients: int) -> int:
    """--threads and --gpu against the number of sites; returns the sites running at once."""
    threads = n_clients if args.threads is None else args.threads
    if not 1 <= threads <= n_clients:
        raise InputError(f"--threads {threads}: need 1 <= threads <= --n_clients ({n_clients})")
    if args.gpu is not None:
        ids = args.gpu.split(",")
        if not all(i.strip().isdigit() for i in ids):
            raise InputError(f"--gpu {args.gpu!r}: need comma-separated integer GPU ids, e.g. 0 or 0,1,2,3")
        if len(ids) > n_clients:
            raise InputError(f"--gpu {args.gpu}: more GPUs ({len(ids)}) than clients ({n_clients})")
    return threads


def hardware_settings(
    args: argparse.Namespace,
    n_clients: int,
    threads: int,
    env: Environment,
    job: JobPaths,
    keep: TrainingSettings | None = None,
) -> dict[str, Any]:
    """The settings that depend on this machine: CPU threads and loader workers per site, the disk cache. keep: an
    existing job's settings, whose workers and cache stay unless a flag changes them."""
    cores_per_site = max(1, (os.cpu_count() or 1) // threads)
    workers = max(0, min(MAX_DEFAULT_WORKERS, cores_per_site - 1))  # a site's cores minus its training loop's
    if args.num_workers is not None:
        workers = args.num_workers
    elif keep is not None:
        workers = keep.num_workers
    if args.no_cache:
        cache = None
    elif args.cache_dir:
        cache = str(Path(args.cache_dir).resolve())
    elif keep is not None:
        cache = keep.cache_dir
    else:
        cache = env.default_cache_dir(job.workspace_root)
    return {"torch_threads": cores_per_site, "num_workers": workers, "cache_dir": cache}


def checked(settings: TrainingSettings) -> TrainingSettings:
    """settings, or InputError naming the first flag no run can use."""
    from brats_fl.privacy import PrivacyConfigError
    from brats_fl.privacy.dpsgd import check_dpsgd_values

    settings.check()
    if settings.dp_mechanism == "dpsgd":
        try:
            check_dpsgd_values(settings.dp_target_epsilon, settings.dp_delta, settings.dp_max_grad_norm)
        except PrivacyConfigError as e:
            raise InputError(str(e)) from None
    return settings


def check_checkpoint(path: Path, settings: TrainingSettings) -> None:
    """The checkpoint exists and fits the model the settings describe."""
    from brats_fl.evaluation import checkpoint_problem
    from model import BratsSegResNet

    if not path.is_file():
        raise InputError(f"--checkpoint {path}: no such file")
    problem = checkpoint_problem(path, BratsSegResNet(init_filters=settings.init_filters))
    if problem:
        raise InputError(
            f"--checkpoint {path}: does not fit the model of --init_filters {settings.init_filters}: {problem}"
        )


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
