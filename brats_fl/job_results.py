"""What a finished simulator job left behind, read back and checked.

NVFlare 2.9 writes, under ``<workspace>/<job>/server/simulate_job/``: ``metrics/round_metrics.jsonl`` (per round, the
weighted mean of the metrics the clients sent and each site's own values), ``metrics/metrics_summary.json`` (the
best round chosen by the model selector), ``app_server/best_FL_global_model.pt`` and ``tb_events/site-N/``.
A job counts as successful only if every round has the validation of every validating site and a best model exists:
the simulator can return normally after a site's process died.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from brats_fl.nvflare_compat import SERVER_APP_DIR, SERVER_RUN_DIR
from brats_fl.settings import SETTINGS_FILE, SITE_FAILURE_MARK

BEST_MODEL_FILE = "best_FL_global_model.pt"
GLOBAL_MODEL_FILE = "FL_global_model.pt"  # NVFlare's checkpoint of the last (with early stopping: best) global model
LAST_MODEL_FILE = "last_global_model.pt"  # the project's: the global model of the last round, and that round
FINAL_EVALUATION_FILE = "final_evaluation.json"  # the sites' per-case scores of the best model
RESUMED_FOLDER = "resumed"  # <job>/resumed/from_round_<k>/: where a resumed job's continuation from round k runs
REGION_METRICS = ("val_dice_tc", "val_dice_wt", "val_dice_et")


def write_atomically(path: Path, write) -> None:
    """write(tmp_path), then rename into place: a reader sees the old file or the whole new one, never half."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class JobResultError(RuntimeError):
    """The job's outputs are missing or incomplete; the message says what and where to look."""


@dataclass(frozen=True)
class JobPaths:
    workspace_root: Path
    job_name: str

    @property
    def job_dir(self) -> Path:
        return self.workspace_root / self.job_name

    @property
    def server_job_dir(self) -> Path:
        return self.job_dir / SERVER_RUN_DIR

    @property
    def best_model(self) -> Path:
        return self.server_job_dir / SERVER_APP_DIR / BEST_MODEL_FILE

    @property
    def nvflare_global_model(self) -> Path:
        """NVFlare's own checkpoint of the global model (with early stopping: the best one)."""
        return self.server_job_dir / SERVER_APP_DIR / GLOBAL_MODEL_FILE

    @property
    def tb_events(self) -> Path:
        return self.server_job_dir / "tb_events"

    @property
    def mlflow_db(self) -> Path:
        """With --tracking mlflow and no --tracking_uri: the MLflow store NVFlare's receiver writes (SQLite)."""
        return self.server_job_dir / "mlflow.db"

    @property
    def round_metrics(self) -> Path:
        return self.server_job_dir / "metrics" / "round_metrics.jsonl"

    @property
    def metrics_summary(self) -> Path:
        return self.server_job_dir / "metrics" / "metrics_summary.json"

    @property
    def privacy_report(self) -> Path:
        """Written with --enable_dp: every site's spent epsilon per round (see brats_fl/privacy/report.py)."""
        return self.server_job_dir / "privacy_report.json"

    @property
    def last_global_model(self) -> Path:
        """Written after every aggregation (brats_fl/fl_components.py): what a resumed job continues from."""
        return self.server_job_dir / LAST_MODEL_FILE

    @property
    def final_evaluation_table(self) -> Path:
        return self.server_job_dir / "final_evaluation.md"

    @property
    def final_evaluation_csv(self) -> Path:
        return self.server_job_dir / "final_evaluation.csv"

    @property
    def settings_file(self) -> Path:
        """The settings every site trained with, shipped in the job."""
        return self.server_job_dir / SERVER_APP_DIR / "custom" / SETTINGS_FILE

    @property
    def resumed_dir(self) -> Path:
        return self.job_dir / RESUMED_FOLDER

    @property
    def server_log(self) -> Path:
        """The simulator's server log; for a job run in a deployment, the one in its downloaded server workspace."""
        simulator = self.job_dir / "server" / "log.txt"
        return simulator if simulator.is_file() else self.server_job_dir / "log.txt"


@dataclass
class RoundMetrics:
    round: int
    metrics: dict[str, float]  # weighted over sites, as the server aggregated them
    sites: dict[str, dict[str, float]]


@dataclass
class JobSummary:
    paths: JobPaths
    rounds: list[RoundMetrics]
    best_round: int
    best_metrics: dict[str, float]
    extra_lines: list[str] = field(default_factory=list)
    trackers: tuple[str, ...] = ("tensorboard",)  # job.py --tracking: where the curves are
    tracking_uri: str | None = None

    def curves_lines(self) -> list[str]:
        lines = []
        if "tensorboard" in self.trackers:
            lines.append(f"  curves: tensorboard --logdir {self.paths.tb_events}")
        if "mlflow" in self.trackers:
            uri = self.tracking_uri or f"sqlite:///{self.paths.mlflow_db}"
            lines.append(f"  curves: mlflow ui --backend-store-uri {uri} (experiment {self.paths.job_name})")
        return lines

    def render(self) -> str:
        m = self.best_metrics
        parts = ", ".join(f"{k.removeprefix('val_dice_').upper()} {m[k]:.4f}" for k in REGION_METRICS if k in m)
        lines = [
            f"Job {self.paths.job_name} finished: {len(self.rounds)} rounds, workspace {self.paths.job_dir}",
            f"  best global val_dice {m['val_dice']:.4f} at round {self.best_round} ({parts})",
            f"  best model: {self.paths.best_model}",
            *self.extra_lines,
            *self.curves_lines(),
        ]
        return "\n".join(lines)


def read_round_metrics(path: Path) -> list[RoundMetrics]:
    """Parse round_metrics.jsonl into one RoundMetrics per round, in round order."""
    rounds = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        rounds.append(
            RoundMetrics(
                round=int(record["round"]),
                metrics={m["name"]: float(m["value"]) for m in record.get("aggregated_metrics", [])},
                sites={
                    s["name"]: {m["name"]: float(m["value"]) for m in s.get("metrics", [])}
                    for s in record.get("sites", [])
                },
            )
        )
    return sorted(rounds, key=lambda r: r.round)


def best_round_of(rounds: list[RoundMetrics], key: str = "val_dice") -> int:
    """Round whose aggregated key metric is highest, skipping round 0 (the untrained model) as NVFlare does.

    Ties go to the earliest round, matching the selector's strict '>' comparison.
    """
    best, best_value = -1, -math.inf
    for r in rounds:
        value = r.metrics.get(key, math.nan)
        if r.round > 0 and not math.isnan(value) and value > best_value:
            best, best_value = r.round, value
    return best


def summarize_job(workspace_root: Path, job_name: str, expected_rounds: int, validating_sites: list[str]) -> JobSummary:
    """Check a finished job and gather its headline figures; JobResultError if anything is missing.

    validating_sites are the sites that must have reported a validation Dice in every round (FedAvg itself waits
    for every site's update each round, so a missing update already stops the job)."""
    paths = JobPaths(Path(workspace_root), job_name)
    if not paths.round_metrics.is_file():
        raise JobResultError(f"no round metrics at {paths.round_metrics}; see {paths.server_log} and site-*/log.txt")
    rounds = read_round_metrics(paths.round_metrics)
    for r in rounds:
        lacking = sorted(set(validating_sites) - set(r.sites))
        if lacking:
            raise JobResultError(
                f"round {r.round} lacks the validation of {', '.join(lacking)}; see {paths.job_dir}/<site>/log.txt"
            )
    if len(rounds) != expected_rounds:
        raise JobResultError(f"{len(rounds)} of {expected_rounds} rounds reported metrics; see {paths.server_log}")
    if not paths.best_model.is_file():
        raise JobResultError(f"no best model at {paths.best_model}: no round after round 0 reported a finite val_dice")
    best = best_round_of(rounds)
    if paths.metrics_summary.is_file() and not paths.resumed_dir.is_dir():  # a resumed job's covers its last part
        reported = json.loads(paths.metrics_summary.read_text()).get("best_round")
        if reported is not None and int(reported) != best:
            raise JobResultError(f"NVFlare reports best round {reported} but the round metrics peak at round {best}")
    best_metrics = next(r.metrics for r in rounds if r.round == best)
    return JobSummary(paths=paths, rounds=rounds, best_round=best, best_metrics=best_metrics)


def site_failure_of(server_log: Path) -> str | None:
    """The error a failing site reported to the server (client.py's report_failure), e.g. 'site-2: ValueError: ...'."""
    if not server_log.is_file():
        return None
    for line in server_log.read_text(errors="replace").splitlines():
        if SITE_FAILURE_MARK in line:
            return line.split(SITE_FAILURE_MARK, 1)[1].strip()
    return None
