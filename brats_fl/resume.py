"""Continuing a stopped or crashed job: where it stopped, and folding what the continuation wrote back into the job.

A job's outputs live in ``<workspace>/<job>/server/simulate_job/``. NVFlare's simulator wipes a job's folder when it
starts, so a continuation from round k runs in ``<workspace>/<job>/resumed/from_round_<k>/`` and, when it ends
(finished, stopped or crashed), its outputs are folded into the job's: round records appended, TensorBoard events
added (steps continue at round k), the last model and the privacy report replaced, and the best model replaced only
if a round of the continuation beat every earlier round. Records of a round that did not complete before the stop
(a site's curve point of round k, say) are dropped first, so that every round appears once.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from brats_fl.job_results import JobPaths, RoundMetrics, best_round_of, read_round_metrics
from brats_fl.nvflare_compat import early_stop_of
from brats_fl.runner import SUBMITTED_FILE
from brats_fl.settings import KEY_METRIC, InputError, SettingsError, TrainingSettings

FOLDED_MARKER = "folded_into_job"  # written in a continuation's folder once its outputs are in the job's


class ResumeError(InputError):
    """The folder cannot be resumed; the message says why and what to do."""


@dataclass(frozen=True)
class StartPoint:
    """Where a training run starts: round 0 from fresh weights, or a later round of a resumed job."""

    round: int = 0
    initial_ckpt: Path | None = None  # the global model to start from
    privacy_report: Path | None = None  # the releases already spent, which the new report keeps counting
    best_value: float | None = None  # best val_dice of the earlier rounds (early stopping goes on from it)
    rounds_without_improvement: int = 0


def part_name(start_round: int) -> str:
    return f"from_round_{start_round}"


def part_paths(job: JobPaths, start_round: int) -> JobPaths:
    """Where the continuation from start_round runs."""
    return JobPaths(job.resumed_dir, part_name(start_round))


def completed_rounds(paths: JobPaths) -> list[RoundMetrics]:
    return read_round_metrics(paths.round_metrics) if paths.round_metrics.is_file() else []


def last_model_round(paths: JobPaths) -> int:
    """The round of the saved last global model (-1 if there is none)."""
    import torch

    path = paths.last_global_model
    if not path.is_file():
        return -1
    return int(torch.load(path, map_location="cpu", weights_only=True)["round"])


def start_point(job: JobPaths, what: str = "--resume") -> StartPoint:
    """Where a resumed job starts: the round after its last saved global model, with the early-stopping state and
    the privacy report of the rounds before."""
    fold_pending_parts(job)
    last = last_model_round(job)
    if last < 0:
        raise ResumeError(
            f"{what}: {job.last_global_model} is missing: the job saved no global model (it stopped before its "
            "first round ended, or an older version made it); start it again without --resume"
        )
    rounds = [r for r in completed_rounds(job) if r.round <= last]
    best = best_round_of(rounds)
    best_value = next((r.metrics[KEY_METRIC] for r in rounds if r.round == best), None)
    return StartPoint(
        round=last + 1,
        initial_ckpt=job.last_global_model,
        privacy_report=job.privacy_report if job.privacy_report.is_file() else None,
        best_value=best_value,
        rounds_without_improvement=last - best if best >= 0 else 0,
    )


def fold_pending_parts(job: JobPaths) -> None:
    """Fold every continuation not folded yet (job.py was killed before it could), in round order."""
    for start_round, part in resumed_parts(job):
        if not (part.job_dir / FOLDED_MARKER).is_file():
            fold_part_into_job(job, part, start_round)


def fold_part_into_job(job: JobPaths, part: JobPaths, start_round: int) -> None:
    """Fold a continuation's outputs into the job's folder (see the module docstring); marks the part as folded."""
    job.server_job_dir.mkdir(parents=True, exist_ok=True)
    earlier = [r for r in completed_rounds(job) if r.round < start_round]
    later = [r for r in completed_rounds(part) if r.round >= start_round]
    best_before = best_round_of(earlier)
    write_round_records(job.round_metrics, part.round_metrics, start_round)
    keep_only_steps_before(job.tb_events, start_round)
    copy_events(part.tb_events, job.tb_events)
    for of in (lambda p: p.last_global_model, lambda p: p.nvflare_global_model, lambda p: p.privacy_report):
        replace_with(of(part), of(job))
    merged = best_round_of(earlier + later)
    if merged >= start_round or best_before < 0:
        replace_with(part.best_model, job.best_model)
    if part.job_dir.is_dir():
        (part.job_dir / FOLDED_MARKER).touch()


def write_round_records(job_file: Path, part_file: Path, start_round: int) -> None:
    """The job's round records before start_round, then the continuation's from start_round on (raw JSON lines,
    kept as NVFlare wrote them)."""

    def lines(path: Path, keep) -> list[str]:
        if not path.is_file():
            return []
        return [ln for ln in path.read_text().splitlines() if ln.strip() and keep(json.loads(ln)["round"])]

    merged = lines(job_file, lambda r: r < start_round) + lines(part_file, lambda r: r >= start_round)
    job_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = job_file.with_name(job_file.name + ".tmp")
    tmp.write_text("\n".join(merged) + ("\n" if merged else ""))
    tmp.replace(job_file)


def replace_with(source: Path, target: Path) -> None:
    """Copy source over target atomically (nothing happens if there is no source)."""
    if not source.is_file():
        return
    tmp = target.with_name(target.name + ".tmp")
    shutil.copy2(source, tmp)
    tmp.replace(target)


def copy_events(source_dir: Path, target_dir: Path) -> None:
    """Add the continuation's TensorBoard event files to the job's, site by site."""
    if not source_dir.is_dir():
        return
    for site_dir in source_dir.iterdir():
        if site_dir.is_dir():
            (target_dir / site_dir.name).mkdir(parents=True, exist_ok=True)
            for event_file in site_dir.iterdir():
                shutil.copy2(event_file, target_dir / site_dir.name / event_file.name)


def keep_only_steps_before(tb_dir: Path, step: int) -> None:
    """Rewrite any event file holding scalars at a step >= step (an interrupted round) without them."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from torch.utils.tensorboard import SummaryWriter

    if not tb_dir.is_dir():
        return
    for event_file in sorted(tb_dir.glob("*/events.out.tfevents.*")):
        scalars = [
            (v.tag, v.simple_value, e.step, e.wall_time)
            for e in EventFileLoader(str(event_file)).Load()
            if e.HasField("summary")
            for v in e.summary.value
            if v.HasField("simple_value")
        ]
        if all(s < step for _, _, s, _ in scalars):
            continue
        with tempfile.TemporaryDirectory(dir=event_file.parent) as tmp:
            writer = SummaryWriter(log_dir=tmp)
            for tag, value, s, wall_time in scalars:
                if s < step:
                    writer.add_scalar(tag, value, global_step=s, walltime=wall_time)
            writer.close()
            rewritten = next(Path(tmp).glob("events.out.tfevents.*"))
            rewritten.replace(event_file.parent / f"{event_file.name}.before_round_{step}")
        event_file.unlink()


def resumed_parts(job: JobPaths) -> list[tuple[int, JobPaths]]:
    """(start round, paths) of every continuation of the job, in order."""
    folder = job.resumed_dir
    parts = []
    for d in folder.glob("from_round_*") if folder.is_dir() else []:
        suffix = d.name.removeprefix("from_round_")
        if suffix.isdigit():
            parts.append((int(suffix), JobPaths(folder, d.name)))
    return sorted(parts, key=lambda p: p[0])


# ---------------------------------------------------------------------------------------------------------------
# A job that exists: its settings and sites (for --resume, and --checkpoint of a job's model)
# ---------------------------------------------------------------------------------------------------------------
def read_job_settings(job: JobPaths, what: str) -> TrainingSettings:
    """The settings every site of the job trained with, as job.py shipped them in the job."""
    path = job.settings_file
    if not path.is_file():
        raise ResumeError(f"{what}: no {path}: not the folder of a job made by job.py (<workspace>/<job_name>)")
    try:
        return TrainingSettings.read(path)
    except SettingsError as e:
        raise ResumeError(f"{what}: {e}") from None


def count_sites(job_dir: Path, what: str) -> int:
    """The job's number of sites: its site-N folders (simulator), or what job.py recorded when it submitted it."""
    n = sum(1 for d in job_dir.glob("site-*") if d.is_dir())
    submitted = job_dir / SUBMITTED_FILE
    if n == 0 and submitted.is_file():
        n = int(json.loads(submitted.read_text()).get("n_clients", 0))
    if n == 0:
        raise ResumeError(f"{what}: no site-* folders in {job_dir}: not the folder of a job made by job.py")
    return n


def job_end(job: JobPaths) -> str | None:
    """How the job ended if an early-stopping rule ended it (in its first part or a resumed one), else None."""
    for paths in [job, *(part for _, part in resumed_parts(job))]:
        stop = early_stop_of(paths.server_log)
        if stop:
            return f"stopped early at round {stop[1]} by {stop[0]}"
    return None
