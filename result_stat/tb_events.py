"""Read a job's curves: TensorBoard scalar events without TensorFlow (tensorboard's own event reader), or the MLflow
store of a job run with --tracking mlflow (MLflow's own client)."""

from __future__ import annotations

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def read_scalars(event_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """All scalar series in one run folder: {tag: [(step, value), ...]} sorted by step.

    If a step was written twice (e.g. a client restarted), the last value written wins.
    """
    accumulator = EventAccumulator(str(event_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    series = {}
    for tag in accumulator.Tags().get("scalars", []):
        by_step = {event.step: float(event.value) for event in accumulator.Scalars(tag)}
        series[tag] = sorted(by_step.items())
    return series


def read_site_scalars(tb_events_dir: str | Path) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """{site: {tag: series}} for every site-N folder under a job's tb_events/."""
    root = Path(tb_events_dir)
    return {d.name: read_scalars(d) for d in sorted(root.iterdir()) if d.is_dir()}


def read_mlflow_scalars(tracking_uri: str, experiment_name: str) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """{site: {metric: series}} of a job tracked with job.py --tracking mlflow, read through MLflow's own client.

    NVFlare's MLflowReceiver makes one run per site, named "<site>-<job id>-<job>-<run name>" and tagged with the
    job id; a metric logged twice at a step keeps the last value, as read_scalars does.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return {}
    sites = {}
    for run in client.search_runs([experiment.experiment_id]):
        job_id = run.data.tags.get("job_id", "")
        name = run.info.run_name or ""
        site = name.split(f"-{job_id[:6]}-", 1)[0] if job_id else name
        series = {}
        for key in run.data.metrics:
            by_step = {
                m.step: float(m.value)
                for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.timestamp)
            }
            series[key] = sorted(by_step.items())
        sites[site] = series
    return dict(sorted(sites.items()))


def has_tensorboard_events(paths) -> bool:
    return paths.tb_events.is_dir() and any(paths.tb_events.glob("site-*/events.out.tfevents.*"))


def read_job_scalars(paths, tracking_uri: str | None = None) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """{site: {tag: series}} of a job (brats_fl.job_results.JobPaths) from whichever store it used: its TensorBoard
    events, else its MLflow store (tracking_uri, else the job's own mlflow.db); {} when it has neither."""
    if has_tensorboard_events(paths) and tracking_uri is None:
        return read_site_scalars(paths.tb_events)
    if tracking_uri is None and not paths.mlflow_db.is_file():
        return {}
    return read_mlflow_scalars(tracking_uri or f"sqlite:///{paths.mlflow_db}", paths.job_name)
