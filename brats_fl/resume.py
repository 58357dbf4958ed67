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
from pathlib import Path

from brats_fl.job_results import GLOBAL_MODEL_FILE, JobPaths, RoundMetrics, best_round_of, read_round_metrics

RESUMED_FOLDER = "resumed"


def part_name(start_round: int) -> str:
    return f"from_round_{start_round}"


def part_paths(job: JobPaths, start_round: int) -> JobPaths:
    """Where the continuation from start_round runs."""
    return JobPaths(job.job_dir / RESUMED_FOLDER, part_name(start_round))


def completed_rounds(paths: JobPaths) -> list[RoundMetrics]:
    return read_round_metrics(paths.round_metrics) if paths.round_metrics.is_file() else []


def last_completed_round(paths: JobPaths) -> int:
    """The last round whose aggregation the server recorded (-1 if none)."""
    return max((r.round for r in completed_rounds(paths)), default=-1)


def last_model_round(paths: JobPaths) -> int:
    """The round of the saved last global model (-1 if there is none)."""
    import torch

    path = paths.last_global_model
    if not path.is_file():
        return -1
    return int(torch.load(path, map_location="cpu", weights_only=True)["round"])


def fold_part_into_job(job: JobPaths, part: JobPaths, start_round: int) -> None:
    """Fold a continuation's outputs into the job's folder (see the module docstring)."""
    job.server_job_dir.mkdir(parents=True, exist_ok=True)
    earlier = [r for r in completed_rounds(job) if r.round < start_round]
    later = [r for r in completed_rounds(part) if r.round >= start_round]
    best_before = best_round_of(earlier)
    write_round_records(job.round_metrics, part.round_metrics, start_round)
    keep_only_steps_before(job.tb_events, start_round)
    copy_events(part.tb_events, job.tb_events)
    for name in (job.last_global_model.name, GLOBAL_MODEL_FILE, job.privacy_report.name):
        replace_with(part.server_job_dir / name, job.server_job_dir / name)
    merged = best_round_of(earlier + later)
    if merged >= start_round or best_before < 0:
        replace_with(part.best_model, job.best_model)


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
    folder = job.job_dir / RESUMED_FOLDER
    parts = []
    for d in folder.glob("from_round_*") if folder.is_dir() else []:
        suffix = d.name.removeprefix("from_round_")
        if suffix.isdigit():
            parts.append((int(suffix), JobPaths(folder, d.name)))
    return sorted(parts, key=lambda p: p[0])
