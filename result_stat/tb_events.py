"""Read TensorBoard scalar events without TensorFlow (tensorboard's own event reader)."""

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
