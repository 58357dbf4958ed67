"""Every setting of a run, defined once: the paper's defaults, the demo's overrides, and where things go.

job.py turns its flags into a :class:`TrainingSettings`, writes it into the job as one JSON document
(``brats_settings.json``, shipped to every site beside client.py), and client.py and the evaluation read that
document back. The flags' ``--help`` texts take their defaults from here too, so a default exists in one place.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from brats_fl.privacy import MECHANISMS
from brats_fl.privacy.audit import DEFAULT_CANARIES, MIN_CANARIES

# ---------------------------------------------------------------------------------------------------------------
# Where things are, and how tools exit
# ---------------------------------------------------------------------------------------------------------------
REPO_DIR = Path(__file__).resolve().parents[1]  # meaningful on the submitter's machine, not inside a site's app
SHIPPED_DATALIST_DIR = REPO_DIR / "dataset_brats18" / "datalist"  # the paper's split of BraTS 2018
DEFAULT_WORKSPACE = "/tmp/nvflare/simulation"
SETTINGS_FILE = "brats_settings.json"  # travels in the job's custom/ folder, next to client.py
KEY_METRIC = "val_dice"  # what the clients report and the server selects the best model by
SITE_FAILURE_META = "brats_site_failure"  # a failing site's last result carries its error under this meta key
SITE_FAILURE_MARK = "BRATS SITE FAILURE:"  # ... and the server logs it after this mark, for job.py to read back


def default_job_name(n_clients: int, dp_mechanism: str | None, local_only: bool = False) -> str:
    """job.py's job folder name: brats18_<n_clients>, with _dp for SVT, _dpsgd for DP-SGD, _local for local-only."""
    suffix = {None: "", "svt": "_dp", "dpsgd": "_dpsgd"}[dp_mechanism] + ("_local" if local_only else "")
    return f"brats18_{n_clients}{suffix}"


# The paper's runs (centralised, federated, federated + SVT) and this project's DP-SGD run, as job.py names them.
PAPER_JOB_NAMES = tuple(default_job_name(n, dp) for n, dp in ((1, None), (4, None), (4, "svt"), (4, "dpsgd")))

EXIT_OK = 0
EXIT_FAILED = 1  # the job, or the check, ran and failed
EXIT_BAD_INPUT = 2

VALIDATION_MODES = ("one_site", "every_site")
CACHE_FOLDER = "preprocessed"  # default disk cache: <workspace>/preprocessed, shared by every job and the evaluation
SPATIAL_MULTIPLE = 8  # SegResNet downsamples 3 times: every spatial size must be divisible by 8


class InputError(ValueError):
    """A user error found before anything runs: reported as one line that names the flag or file, exit code 2."""


class SettingsError(InputError):
    """A setting no run can use; the message names the flag and what it needs."""


# ---------------------------------------------------------------------------------------------------------------
# The settings every site trains and validates with
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainingSettings:
    """The paper's configuration (Li et al. 2019: SegResNet-16, Adam 1e-4, 224x224x144 crops, 600 rounds of one
    local epoch). Field names are the flag names of job.py. Frozen: a run's settings are fixed once the flags are
    read (dataclasses.replace makes a changed copy)."""

    # federation
    num_rounds: int = 600
    aggregation_epochs: int = 1
    centralised: bool = False  # one site training on site-All.json (job.py: --n_clients 1)
    local_only: bool = False  # every site trains alone, nothing aggregated (job.py: --local_only)
    stop_dice: float | None = None  # stop once the global val_dice reaches this (None: never)
    patience: int | None = None  # stop after this many rounds without a better val_dice (None: never)
    # training
    learning_rate: float = 1e-4
    fedproxloss_mu: float = 0.0
    roi_size: tuple[int, int, int] = (224, 224, 144)
    infer_roi_size: tuple[int, int, int] = (240, 240, 160)
    init_filters: int = 16
    amp: bool = True  # mixed precision on CUDA (job.py: --no_amp turns it off)
    seed: int = 0
    cache_dataset: float = 0.0  # fraction of each site's preprocessed cases also kept in memory
    cache_dir: str | None = None  # the disk cache of preprocessed cases (brats_fl/cache.py); None: no cache
    # validation of the received global model: at one site (it is the same model on the same shared cases at every
    # site in the paper's setting), or at every site, as the paper's workflow repeats it
    validate_at: str = "one_site"
    validating_site: str = "site-1"
    # data: paths on the machine that runs the sites
    dataset_base_dir: str | None = None
    datalist_json_path: str | None = None
    # hardware
    num_workers: int = 0
    torch_threads: int = 0  # 0: torch's default
    # differential privacy (dp_mechanism None: off)
    dp_mechanism: str | None = None
    dp_fraction: float = 0.9
    dp_epsilon: float = 0.001
    dp_noise_var: float = 1.0
    dp_gamma: float = 1e-4
    dp_target_epsilon: float = 8.0
    dp_delta: float | None = None
    dp_max_grad_norm: float = 1.0
    dp_secure_mode: bool = False
    # the privacy audit (brats_fl/privacy/audit.py; job.py --audit): canaries and a patient hold-out, drawn from a
    # secret seed that job.py makes for each audited job (never --seed)
    audit: bool = False
    audit_canaries: int = DEFAULT_CANARIES  # canaries drawn per site, each inserted with probability 1/2
    audit_no_insert: bool = False  # draw and score the canaries but insert none: the audit's null run
    audit_seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("roi_size", "infer_roi_size"):  # JSON and argparse give lists
            object.__setattr__(self, name, tuple(int(s) for s in getattr(self, name)))

    def check(self) -> None:
        """SettingsError naming the first flag whose value no run can use."""
        for problem in self._problems():
            raise SettingsError(problem)

    def _problems(self):
        if self.num_rounds < 2:
            yield (
                f"--num_rounds {self.num_rounds}: need >= 2 (round 0 validates the initial model, so a 1-round "
                "job never writes a best model)"
            )
        if self.stop_dice is not None and not 0.0 < self.stop_dice <= 1.0:
            yield f"--stop_dice {self.stop_dice}: need a Dice in (0, 1]"
        if self.patience is not None and self.patience < 1:
            yield f"--patience {self.patience}: need >= 1 round"
        if self.local_only:
            yield from self._local_only_problems()
        if self.aggregation_epochs < 1:
            yield f"--aggregation_epochs {self.aggregation_epochs}: need >= 1"
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            yield f"--learning_rate {self.learning_rate}: need a finite value > 0"
        if not self.fedproxloss_mu >= 0:
            yield f"--fedproxloss_mu {self.fedproxloss_mu}: need >= 0 (0 turns FedProx off)"
        if not 0.0 <= self.cache_dataset <= 1.0:
            yield f"--cache_dataset {self.cache_dataset}: need a fraction in [0, 1]"
        if self.init_filters < 8 or self.init_filters % 8:
            yield f"--init_filters {self.init_filters}: need a positive multiple of 8 (GroupNorm uses 8 groups)"
        for flag in ("roi_size", "infer_roi_size"):
            problem = roi_size_problem(getattr(self, flag), f"--{flag}")
            if problem:
                yield problem
        if self.num_workers < 0:
            yield f"--num_workers {self.num_workers}: need >= 0"
        if self.validate_at not in VALIDATION_MODES:
            yield f"validate_at {self.validate_at}: need one of {', '.join(VALIDATION_MODES)}"
        if self.dp_mechanism not in (None, *MECHANISMS):
            yield f"--dp_mechanism {self.dp_mechanism}: need one of {', '.join(MECHANISMS)}"
        if self.dp_mechanism == "svt":
            if not 0.0 < self.dp_fraction <= 1.0:
                yield f"--dp_fraction {self.dp_fraction}: need a fraction in (0, 1]"
            for flag in ("dp_epsilon", "dp_noise_var", "dp_gamma"):
                if not (getattr(self, flag) > 0 and math.isfinite(getattr(self, flag))):
                    yield f"--{flag} {getattr(self, flag)}: need a finite value > 0"
        if self.audit and not (self.dp_max_grad_norm > 0 and math.isfinite(self.dp_max_grad_norm)):
            yield f"--dp_max_grad_norm {self.dp_max_grad_norm}: the audit's canary norm; need a finite value > 0"
        if self.audit and self.audit_canaries < MIN_CANARIES:
            yield (
                f"--audit_canaries {self.audit_canaries}: need >= {MIN_CANARIES} canaries per site (a few hundred "
                "for a useful audit)"
            )

    def _local_only_problems(self):
        """Local-only training compares sites that train alone with FedAvg: plain training, every round."""
        if self.centralised:
            yield "--local_only needs --n_clients >= 2 (one site training alone is the centralised baseline)"
        if self.dp_mechanism or self.audit:
            yield "--local_only: leave --enable_dp and --audit out (nothing leaves a site that trains alone)"
        if self.stop_dice is not None or self.patience is not None:
            yield "--local_only: leave --stop_dice and --patience out (every site trains every round)"

    # The rules every part of the project applies to these settings, written once
    def uses_amp(self, device_type: str) -> bool:
        """Mixed precision: on CUDA when --no_amp is not given, never under DP-SGD (clipping needs full precision)."""
        return device_type == "cuda" and self.amp and self.dp_mechanism != "dpsgd"

    def validates(self, site: str) -> bool:
        """Whether the site validates the global model: every site, or the one that validates for all (the sites
        share the validation cases, so the others would compute the same figure again)."""
        return self.validate_at == "every_site" or site == self.validating_site

    def validating_sites(self, n_clients: int) -> list[str]:
        """The sites whose validation Dice every round carries."""
        return [site for site in site_names(n_clients) if self.validates(site)]

    # JSON: the document the sites read
    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_json())
        return path

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainingSettings:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SettingsError(f"unknown settings {unknown}: written by a newer version of this project?")
        return cls(**values)

    @classmethod
    def read(cls, path: str | Path) -> TrainingSettings:
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError, TypeError, SettingsError) as e:
            raise SettingsError(f"settings file {path}: {e}") from None


# The built-in demo (synthetic data, no --dataset_base_dir): small volumes, a SegResNet of width 8 on 32x32x32 crops
# (the fastest step on a CPU), few rounds at a faster learning rate; about 2 minutes on 2 cores.
DEMO_OVERRIDES: dict[str, Any] = {
    "num_rounds": 12,
    "learning_rate": 3e-3,
    "roi_size": (32, 32, 32),
    "infer_roi_size": (64, 64, 48),
    "init_filters": 8,
}
DEMO_SHAPE = (64, 64, 48)  # voxels of each synthetic case
DEMO_TRAIN_CASES = 32  # dealt round-robin to the sites
DEMO_VALIDATION_CASES = 4


def default(name: str, demo: bool = False) -> Any:
    """The default of one setting (the demo's when demo is set and it has one)."""
    if demo and name in DEMO_OVERRIDES:
        return DEMO_OVERRIDES[name]
    return next(f.default for f in fields(TrainingSettings) if f.name == name)


def describe_default(name: str) -> str:
    """'(default: X)' or '(default: X; demo: Y)' for a flag's --help."""

    def shown(value: Any) -> str:
        if value is None:
            return "off"
        return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)

    text = f"default: {shown(default(name))}"
    if name in DEMO_OVERRIDES:
        text += f"; demo: {shown(DEMO_OVERRIDES[name])}"
    return f"({text})"


def demo_settings(**overrides: Any) -> TrainingSettings:
    """The demo's settings, with any further overrides."""
    return replace(TrainingSettings(**DEMO_OVERRIDES), **overrides)


def roi_size_problem(roi_size, flag: str = "--roi_size") -> str | None:
    """Why roi_size is unusable (not 3 positive multiples of 8, what SegResNet accepts), or None."""
    sizes = list(roi_size)
    if len(sizes) != 3 or any(int(s) <= 0 or int(s) % SPATIAL_MULTIPLE for s in sizes):
        return (
            f"{flag} {' '.join(str(s) for s in sizes)}: need 3 positive sizes, each divisible by "
            f"{SPATIAL_MULTIPLE} (SegResNet downsamples 3 times), e.g. 224 224 144"
        )
    return None


def site_names(n_clients: int) -> list[str]:
    """NVFlare's names of a job's sites: site-1 ... site-N (the simulator's, and the ones a provisioned project must
    use)."""
    return [f"site-{i}" for i in range(1, n_clients + 1)]
