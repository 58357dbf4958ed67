"""job.py's flags, each defined once: its name, its help, and whether a job that already exists may take it.

``python job.py --help``, what ``--resume`` and ``--checkpoint`` of a job's model accept, the resume command job.py
prints and the list in docs/long_runs.md (a test compares them) all come from :data:`FLAGS`. A flag that sets a
training setting (``setting=True``) has the name of its :class:`~brats_fl.settings.TrainingSettings` field and takes
its default from there. This module imports neither torch nor NVFlare: ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from brats_fl.privacy import MECHANISMS
from brats_fl.privacy.audit import secret_seed_setting
from brats_fl.settings import (
    CACHE_FOLDER,
    DEFAULT_WORKSPACE,
    DEMO_OVERRIDES,
    REPO_DIR,
    SHIPPED_DATALIST_DIR,
    TrainingSettings,
    default,
    describe_default,
)

ENVIRONMENTS = ("sim", "poc", "prod")
TRACKERS = ("tensorboard", "mlflow", "both")  # --tracking: NVFlare's experiment-tracking receivers at the server
DEMOS = ("uniform", "heterogeneous")
RESUME = "resume"  # the flag may be given with --resume
EVALUATE = "evaluate"  # ... with --checkpoint of a model inside a job folder (the job's settings and sites score it)
EXISTING_JOB = (RESUME, EVALUATE)


@dataclass(frozen=True)
class Flag:
    name: str
    group: str
    help: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    setting: bool = False  # sets the TrainingSettings field of this name, whose default it shows
    existing_job: tuple[str, ...] = ()  # RESUME, EVALUATE: may be given although the job folder fixes the settings

    def default(self) -> Any:
        if self.setting:
            return None if self.name in DEMO_OVERRIDES else default(self.name)  # None: the demo's or the paper's
        return self.kwargs.get("default")

    def help_text(self) -> str:
        return f"{self.help} {describe_default(self.name)}" if self.setting else self.help


GROUPS = {
    "federation": "federation",
    "training": "training",
    "data": "data (leave both out to run the synthetic demo)",
    "deployment": "deployment (see docs/deployment.md)",
    "hardware": "hardware",
    "privacy": "differential privacy (each site's spent epsilon per round goes to <job>/server/simulate_job/"
    "privacy_report.json and TensorBoard tag privacy_epsilon; predict it with `python -m brats_fl.privacy`)",
    "audit": "privacy audit (what the server can infer from the updates it receives, measured in the same job: "
    "canaries and a patient hold-out, scored at the server; <job>/server/simulate_job/privacy_audit.json; see "
    "docs/privacy.md)",
    "long runs": "long runs (Ctrl-C or SIGTERM stops every process of the job and prints the command that resumes "
    "it; see docs/long_runs.md)",
}
ROI = {"type": int, "nargs": 3, "metavar": ("X", "Y", "Z")}
ON = {"action": "store_true"}

FLAGS: tuple[Flag, ...] = (
    # federation
    Flag("n_clients", "federation", "number of sites; 1 = centralised baseline on site-All.json (default: 4)",
         {"type": int, "default": 4}),
    Flag("local_only", "federation", "no federation: every site trains alone on its own cases for the same rounds, "
         "and the server keeps each site's best model by its own validation Dice in <job>/server/simulate_job/"
         "local_models/<site>.pt (job name brats18_<n_clients>_local); compare with python -m result_stat.cross_site "
         "(docs/cross_site.md). Simulator only", ON),
    Flag("num_rounds", "federation", "FL rounds, >= 2: round 0's metric is never a best model", {"type": int},
         setting=True),
    Flag("aggregation_epochs", "federation", "local epochs per round", {"type": int}, setting=True),
    Flag("job_name", "federation", "job folder name (default: brats18_<n_clients>, with _dp appended for SVT and "
         "_dpsgd for DP-SGD, _local for --local_only; with --checkpoint: <job or checkpoint>_evaluation)",
         existing_job=(EVALUATE,)),
    Flag("workspace", "federation", "workspace root; the job runs in <workspace>/<job_name> (default: "
         f"{DEFAULT_WORKSPACE}; with --checkpoint of a job's model: that job's workspace)",
         {"default": DEFAULT_WORKSPACE}, existing_job=(EVALUATE,)),
    Flag("overwrite", "federation", "start afresh in a job folder that holds an earlier run's models, deleting them "
         "(without it job.py refuses such a folder and suggests --resume)", ON),
    Flag("tracking", "federation", "where the sites' curves (val_dice, ...) go, through NVFlare's experiment tracking "
         "at the server: tensorboard (<job>/server/simulate_job/tb_events/), mlflow (an MLflow store: "
         "<job>/server/simulate_job/mlflow.db, or --tracking_uri) or both; under DP only the validation Dice and "
         "privacy_epsilon reach either (docs/using_the_model.md) (default: tensorboard)",
         {"choices": TRACKERS, "default": "tensorboard"}, existing_job=(RESUME,)),
    Flag("tracking_uri", "federation", "with --tracking mlflow or both: the MLflow tracking URI, e.g. "
         "http://mlflow-host:5000 or sqlite:////data/mlflow.db (default: <job>/server/simulate_job/mlflow.db on "
         "the server)", {"metavar": "URI"}, existing_job=(RESUME,)),
    # training
    Flag("learning_rate", "training", "Adam learning rate", {"type": float}, setting=True),
    Flag("fedproxloss_mu", "training", "FedProx proximal weight; 0 = off", {"type": float}, setting=True),
    Flag("cache_dataset", "training", "fraction of each site's cases cached in memory after loading, in [0, 1]",
         {"type": float}, setting=True),
    Flag("roi_size", "training", "random training crop, multiples of 8", ROI, setting=True),
    Flag("infer_roi_size", "training", "sliding-window size for validation, multiples of 8", ROI, setting=True),
    Flag("init_filters", "training", "SegResNet base width", {"type": int}, setting=True),
    Flag("no_amp", "training", "turn mixed precision off on CUDA (on by default there)", ON, existing_job=EXISTING_JOB),
    Flag("seed", "training", "seed of the initial weights and of the sites' sampling and augmentation; the same seed "
         "gives the same curve (docs/determinism.md)", {"type": int}, setting=True),
    Flag("validate_every_site", "training", "every site validates the global model every round, as the paper's "
         "workflow does (default: the site with the fewest training cases validates it once for all when all sites "
         "share the validation cases; every site otherwise)", ON),
    # data
    Flag("dataset_base_dir", "data", "folder holding the BraTS training/ tree that datalist paths are relative to "
         "(with --resume or --checkpoint of a job's model: the job's data folder, if it moved)",
         existing_job=EXISTING_JOB),
    Flag("datalist_json_path", "data", "folder with site-1.json ... site-N.json and site-All.json (default with "
         f"--dataset_base_dir: the paper's split in {SHIPPED_DATALIST_DIR.relative_to(REPO_DIR)})"),
    Flag("demo", "data", "which synthetic demo runs when no data is given: uniform (every site alike) or "
         "heterogeneous (sites that differ as hospitals do: contrast, intensity, noise, tumour size and count, a large "
         "site and a very small one, each with its own validation cases; docs/cross_site.md)",
         {"choices": DEMOS, "default": "uniform"}),
    # deployment
    Flag("env", "deployment", "sim: NVFlare's simulator, every site on this machine; poc: a POC deployment NVFlare "
         "starts on this machine (server and sites as separate processes talking over the network, removed "
         "afterwards); prod: submit to a running provisioned project through --startup_kit. In poc and prod the job "
         "carries no data path: each site reads its own data setting (BRATS_DATA_CONFIG or local/brats_data.json); "
         "for poc job.py writes them from --dataset_base_dir (or the demo data) unless BRATS_DATA_CONFIG is already "
         "set. With the sites' own data (prod, or poc with BRATS_DATA_CONFIG) the training flags default to the "
         "paper's values (default: sim)", {"choices": ENVIRONMENTS, "default": "sim"}, existing_job=EXISTING_JOB),
    Flag("startup_kit", "deployment", "with --env prod: the admin's startup kit of the provisioned project (the "
         "folder holding startup/)", {"metavar": "DIR"}, existing_job=EXISTING_JOB),
    # hardware
    Flag("gpu", "hardware", "GPU ids, e.g. '0' or '0,1,2,3': sites are placed on them round-robin (default: none, "
         "CPU unless CUDA is visible)", existing_job=EXISTING_JOB),
    Flag("threads", "hardware", "sites running at once, 1..n_clients; '--gpu 0 --threads 4' puts 4 sites on one GPU "
         "(default: n_clients)", {"type": int}, existing_job=EXISTING_JOB),
    Flag("num_workers", "hardware", "data-loading worker processes per site, overlapping loading with compute "
         "(default: what fits the machine: cores per running site - 1, at most 8; 0 on a 2-core machine)",
         {"type": int}, existing_job=EXISTING_JOB),
    Flag("cache_dir", "hardware", "disk cache of preprocessed cases, shared by every site, round and job on this "
         f"machine and by the evaluation (default: <workspace>/{CACHE_FOLDER}; in a deployment each site's "
         f"<its workspace>/{CACHE_FOLDER}); a case is preprocessed once, then loads in a fraction of the time",
         existing_job=EXISTING_JOB),
    Flag("no_cache", "hardware", "load and preprocess every case at every use instead", ON,
         existing_job=EXISTING_JOB),
    Flag("skip_memory_check", "hardware", "start even when the memory estimate of the sites that run at once exceeds "
         "what this machine has (job.py prints the estimate first; docs/performance.md#memory)", ON,
         existing_job=EXISTING_JOB),
    # differential privacy
    Flag("enable_dp", "privacy", "protect every site's update (mechanism: --dp_mechanism)", ON),
    Flag("dp_mechanism", "privacy", "svt: NVFlare's SVTPrivacy filter on each outgoing weight difference, as in the "
         "paper (site-level, pure DP); dpsgd: per-case clipped, noised local training calibrated to "
         "--dp_target_epsilon (patient-level) (default: svt)", {"choices": MECHANISMS, "default": "svt"}),
    Flag("dp_fraction", "privacy", "SVT: fraction of the update's values released, in (0, 1]", {"type": float},
         setting=True),
    Flag("dp_epsilon", "privacy", "SVT: budget of the threshold and query noise only, > 0; releasing the values "
         "costs another (released values) x --dp_noise_var per round, see the report", {"type": float},
         setting=True),
    Flag("dp_noise_var", "privacy", "SVT: release noise, Laplace scale 2*gamma/noise_var per value and epsilon "
         "noise_var per value, > 0", {"type": float}, setting=True),
    Flag("dp_gamma", "privacy", "SVT: clipping bound of each value (per local step), > 0", {"type": float},
         setting=True),
    Flag("dp_target_epsilon", "privacy", "DP-SGD: epsilon protecting each training case of each site after all "
         "rounds, > 0", {"type": float}, setting=True),
    Flag("dp_delta", "privacy", "DP-SGD: delta of that guarantee, in (0, 1) and below 1/(training cases) at every "
         "site (default: 0.1 / training cases, per site)", {"type": float}),
    Flag("dp_max_grad_norm", "privacy", "DP-SGD: L2 bound each case's gradient is clipped to, > 0; with --audit also "
         "the canaries' norm (under SVT give 0.01: canaries of norm 1 cost SVT's Dice; docs/privacy.md)",
         {"type": float}, setting=True),
    Flag("dp_secure_mode", "privacy", "DP-SGD: Opacus's secure mode, noise robust to floating-point attacks (each "
         "noise value is the scaled sum of 4 Gaussian draws; see docs/privacy.md) (default: off)", ON),
    # privacy audit
    Flag("audit", "audit", "audit this job: each site inserts canary gradients (random directions of norm "
         "--dp_max_grad_norm, each drawn with the patients' sampling rate) into its local steps and trains on half of "
         "its cases; the server scores every canary against every update it receives and tests the held-out patients; "
         "the job ends with an epsilon estimate, a 95%% lower bound, canary and patient AUCs. Simulator only (default: "
         "off)", ON),
    Flag("audit_canaries", "audit", "canaries drawn per site with --audit, each inserted with probability 1/2, >= 16",
         {"type": int, "metavar": "N"}, setting=True),
    Flag("audit_no_insert", "audit", "with --audit: draw and score the canaries but insert none (the audit's null run: "
         "every figure should be at chance; the Dice of the hold-out alone)", ON),
    # long runs
    Flag("resume", "long runs", "continue the stopped or crashed job in JOB_DIR (<workspace>/<job_name>) at the "
         "round after its last global model, with the settings it started with; besides it only these flags may be "
         "given: {resume_flags}", {"metavar": "JOB_DIR"}),
    Flag("stop_after_round", "long runs", "stop cleanly once round N is done, to --resume later (default: run every "
         "round)", {"type": int, "metavar": "N"}, existing_job=(RESUME,)),
    Flag("stop_dice", "long runs", "stop once the global val_dice reaches this value, in (0, 1]",
         {"type": float, "metavar": "X"}, setting=True, existing_job=EXISTING_JOB),
    Flag("patience", "long runs", "stop after N rounds without a better global val_dice",
         {"type": int, "metavar": "N"}, setting=True, existing_job=EXISTING_JOB),
    Flag("no_final_eval", "long runs", "skip the final evaluation: after training, the sites score the best model "
         "case by case on their validation cases and only the scores travel (default: on)", ON,
         existing_job=EXISTING_JOB),
    Flag("checkpoint", "long runs", "no training: the sites score CHECKPOINT as in the final evaluation. A "
         "checkpoint inside a job folder is scored with that job's settings and sites (besides it only these flags "
         "may be given: {evaluate_flags}); any other with the settings of the flags", {"metavar": "CHECKPOINT"}),
)  # fmt: skip
FLAG_NAMES = tuple(f.name for f in FLAGS)


def flags_allowed_with(mode: str) -> tuple[str, ...]:
    """The flags that may be given with --resume (mode RESUME) or --checkpoint of a job's model (EVALUATE)."""
    return tuple(f.name for f in FLAGS if mode in f.existing_job)


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="job.py",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="'demo: X' is the value in the built-in demo (no --dataset_base_dir) unless the flag is given. "
        "NVFlare's own flags also work: --export [--export-dir DIR] writes the job folder (default ./fl_job) "
        "instead of running it.",
    )
    groups = {key: p.add_argument_group(title) for key, title in GROUPS.items()}
    listed = {
        "resume_flags": ", ".join(f"--{n}" for n in flags_allowed_with(RESUME)),
        "evaluate_flags": ", ".join(f"--{n}" for n in flags_allowed_with(EVALUATE)),
    }
    for flag in FLAGS:
        kwargs = {**flag.kwargs, "default": flag.default()}
        if kwargs.get("action") == "store_true":
            kwargs["default"] = False
        groups[flag.group].add_argument(f"--{flag.name}", help=flag.help_text().format(**listed), **kwargs)
    return p


def given_flags(argv: list[str] | None) -> dict[str, Any]:
    """The flags actually given on the command line, by name (argparse fills in defaults, which an existing job's
    checks must tell apart from choices)."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return vars(parser.parse_args(argv))


# ---------------------------------------------------------------------------------------------------------------
# Flags <-> training settings: the one place that maps each flag to what it sets
# ---------------------------------------------------------------------------------------------------------------
def settings_from_flags(args: argparse.Namespace, demo: bool, **derived: Any) -> TrainingSettings:
    """The flags as one TrainingSettings; a flag left out takes the paper's default, or the demo's. derived: the
    settings job.py works out from several flags and the machine (threads, workers, cache, validation)."""
    values = {}
    for f in fields(TrainingSettings):
        given = getattr(args, f.name, None)
        values[f.name] = default(f.name, demo) if given is None else given
    values.update(
        centralised=args.n_clients == 1,
        local_only=args.local_only,
        **secret_seed_setting(args.audit),
        amp=not args.no_amp,
        dp_mechanism=args.dp_mechanism if args.enable_dp else None,
        validate_at="every_site" if args.validate_every_site or args.local_only else "one_site",
        dataset_base_dir=None,  # filled in once the data is resolved
        datalist_json_path=None,
        **derived,
    )
    return TrainingSettings(**values)


def flag_value_in_settings(flag: str, settings: TrainingSettings, n_clients: int) -> Any:
    """What a job's settings say for a flag; KeyError for a flag that is not about what the job computes."""
    derived = {
        "n_clients": n_clients,
        "enable_dp": settings.dp_mechanism is not None,
        "dp_mechanism": settings.dp_mechanism,
        "validate_every_site": settings.validate_at == "every_site",
        "datalist_json_path": settings.datalist_json_path,
    }
    if flag in derived:
        return derived[flag]
    if flag in {f.name for f in fields(TrainingSettings)}:
        return getattr(settings, flag)
    raise KeyError(flag)


def first_changed_flag(given: dict[str, Any], settings: TrainingSettings, n_clients: int, mode: str):
    """(flag, given value, job's value) of the first given flag that mode does not allow and that disagrees with the
    job's settings; (flag, value, KeyError) for one the job folder fixes without a setting; None if none."""

    def same(flag: str, value: Any, theirs: Any) -> bool:
        if flag == "datalist_json_path":
            return Path(value).resolve() == Path(theirs or "").resolve()
        return tuple(value) == tuple(theirs) if isinstance(value, (list, tuple)) else value == theirs

    allowed = {mode, *flags_allowed_with(mode)} if mode == RESUME else {"checkpoint", *flags_allowed_with(mode)}
    for flag, value in given.items():
        if flag in allowed:
            continue
        try:
            theirs = flag_value_in_settings(flag, settings, n_clients)
        except KeyError as e:
            return flag, value, e
        if not same(flag, value, theirs):
            return flag, value, theirs
    return None


def shown(value: Any) -> str:
    """A flag's value as typed on the command line."""
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def resume_command(job_dir: Path, given: dict[str, Any]) -> str:
    """python job.py --resume <job folder>, with the given flags that the job folder does not keep."""
    words = ["python", "job.py", "--resume", str(job_dir)]
    for flag, value in given.items():
        if flag not in flags_allowed_with(RESUME) or flag == "stop_after_round":
            continue
        if value is True:
            words.append(f"--{flag}")
        elif value not in (False, None):
            words += [f"--{flag}", shown(value)]
    return shlex.join(words)
