"""Validation curves of the global model, per FL round, for several jobs on one chart: PNG and SVG files.

    python -m result_stat.plot_tensorboard_events --workspace /tmp/nvflare/simulation --output_dir figs

Reads each job's TensorBoard event files (server/simulate_job/tb_events/site-N/, written by the clients; no
TensorFlow needed), or for a job run with --tracking mlflow its MLflow store (server/simulate_job/mlflow.db, or
--tracking_uri; MLflow's own client), and draws, for the tags val_dice, val_dice_tc, val_dice_wt and val_dice_et,
one chart per tag with one line per job: the raw values faint, TensorBoard's smoothed curve solid. The global model's
value at round r is the mean over the sites that logged one at step r: by default one site validates for all; with
--validate_every_site every site validates the same model on the same cases (their values agree up to
floating-point noise).

Smoothing is TensorBoard's: an exponential moving average started at 0 and debiased, i.e. after the n-th finite
value v_n, ``ema_n = w * ema_(n-1) + (1 - w) * v_n`` and the plotted value is ``ema_n / (1 - w**n)``; non-finite
values are kept as they are and a constant series is not changed (TensorBoard's scalar dashboard, vz_line_chart2
line-chart.ts). Figures are written with matplotlib's Agg backend: nothing is shown on screen.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: files only
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from brats_fl.job_results import JobPaths  # noqa: E402
from brats_fl.settings import DEFAULT_WORKSPACE, EXIT_BAD_INPUT, PAPER_JOB_NAMES  # noqa: E402
from result_stat.tb_events import has_tensorboard_events, read_job_scalars  # noqa: E402

DEFAULT_JOBS = PAPER_JOB_NAMES[:3]  # the paper's three configurations
CONFIGURATION_NAMES = {"brats18_1": "Central", "brats18_4": "FedAvg", "brats18_4_dp": "FedAvg+DP"}
TAG_TITLES = {
    "val_dice": "Validation Dice (mean of TC, WT, ET)",
    "val_dice_tc": "Validation Dice, tumour core (TC)",
    "val_dice_wt": "Validation Dice, whole tumour (WT)",
    "val_dice_et": "Validation Dice, enhancing tumour (ET)",
}


class PlotInputError(ValueError):
    """A bad flag or missing input, reported as one line with exit code 2."""


def tensorboard_smooth(values: Sequence[float], weight: float) -> list[float]:
    """TensorBoard's debiased exponential moving average (see the module docstring); weight in [0, 1)."""
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"smoothing weight must be in [0, 1), got {weight}")
    finite = [v for v in values if math.isfinite(v)]
    if finite and all(v == finite[0] for v in finite):  # TensorBoard leaves a constant series alone
        return [float(v) for v in values]
    smoothed, last, n = [], 0.0, 0
    for value in values:
        if not math.isfinite(value):
            smoothed.append(float(value))
            continue
        last = weight * last + (1.0 - weight) * value
        n += 1
        smoothed.append(last / (1.0 - weight**n))
    return smoothed


def global_model_curve(site_series: dict[str, list[tuple[int, float]]]) -> tuple[list[int], list[float]]:
    """(rounds, value) of the global model from each site's (step, value) series: mean over the sites at each
    round that every site logged."""
    by_site = [dict(series) for series in site_series.values() if series]
    if not by_site:
        return [], []
    rounds = sorted(set.intersection(*(set(s) for s in by_site)))
    return rounds, [float(np.mean([s[r] for s in by_site])) for r in rounds]


def job_curves(
    paths: JobPaths, tags: Sequence[str], tracking_uri: str | None = None
) -> dict[str, tuple[list[int], list[float]]]:
    """{tag: (rounds, values)} of one job's global model, from its TensorBoard events or its MLflow store."""
    scalars = read_job_scalars(paths, tracking_uri)
    return {tag: global_model_curve({site: s.get(tag, []) for site, s in scalars.items()}) for tag in tags}


def configuration_name(job: str) -> str:
    known = CONFIGURATION_NAMES.get(job)
    return f"{known} ({job})" if known else job


def plot_tag(curves: dict[str, tuple[list[int], list[float]]], tag: str, weight: float, note: str = "") -> plt.Figure:
    """One chart: per configuration, the raw curve faint and the smoothed one solid, same colour."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for i, (name, (rounds, values)) in enumerate(curves.items()):
        colour = f"C{i}"
        ax.plot(rounds, values, color=colour, alpha=0.3, linewidth=1.0, gid=f"raw:{name}")
        ax.plot(
            rounds, tensorboard_smooth(values, weight), color=colour, linewidth=2.0, label=name, gid=f"smoothed:{name}"
        )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("FL round")
    ax.set_ylabel("Dice")
    ax.set_title(TAG_TITLES.get(tag, tag) + f"\nglobal model, TensorBoard smoothing {weight:g}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    if note:
        fig.text(0.01, 0.01, note, fontsize=7, color="0.4")
    fig.tight_layout()
    return fig


def write_figure(fig: plt.Figure, out_dir: Path, stem: str, formats: Sequence[str]) -> list[Path]:
    written = []
    for fmt in formats:
        path = out_dir / f"{stem}.{fmt}"
        fig.savefig(path, format=fmt, metadata={"Date": None} if fmt == "svg" else None)
        written.append(path)
    plt.close(fig)
    return written


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m result_stat.plot_tensorboard_events",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--workspace",
        default=DEFAULT_WORKSPACE,
        help=f"simulator workspace root holding the jobs (default: {DEFAULT_WORKSPACE})",
    )
    p.add_argument(
        "--job_names",
        nargs="+",
        default=list(DEFAULT_JOBS),
        metavar="JOB",
        help=f"job folders to compare; jobs not run are skipped with a message (default: {' '.join(DEFAULT_JOBS)})",
    )
    p.add_argument(
        "--tags",
        nargs="+",
        default=list(TAG_TITLES),
        metavar="TAG",
        help=f"TensorBoard tags to plot, one chart each (default: {' '.join(TAG_TITLES)})",
    )
    p.add_argument(
        "--smoothing",
        type=float,
        default=0.8,
        help="TensorBoard smoothing weight in [0, 1); 0 = raw values (default: 0.8)",
    )
    p.add_argument("--output_dir", default="figs", help="folder for the figures, created if missing (default: figs)")
    p.add_argument(
        "--formats",
        nargs="+",
        default=["png", "svg"],
        choices=["png", "svg", "pdf"],
        help="file formats written for every chart (default: png svg)",
    )
    p.add_argument(
        "--tracking_uri",
        metavar="URI",
        help="read the curves from this MLflow store (the job.py --tracking_uri the jobs used; experiment = job "
        "name) (default: each job's TensorBoard events, else its <job>/server/simulate_job/mlflow.db)",
    )
    p.add_argument("--prefix", default="", help="prefix of the file names, e.g. 'demo_' (default: none)")
    p.add_argument("--note", default="", help="small print at the bottom of every chart, e.g. 'synthetic demo data'")
    return p


def available_jobs(workspace: Path, jobs: Sequence[str], log=print, tracking_uri: str | None = None) -> list[JobPaths]:
    """Jobs whose curves exist (TensorBoard events, or an MLflow store: the job's mlflow.db or --tracking_uri); the
    others are named and skipped."""
    found = []
    for job in jobs:
        paths = JobPaths(workspace, job)
        if has_tensorboard_events(paths) or paths.mlflow_db.is_file() or tracking_uri:
            found.append(paths)
        else:
            log(
                f"skipping {job}: no TensorBoard events at {paths.tb_events} nor MLflow store {paths.mlflow_db} "
                "(job not run?)"
            )
    return found


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if not 0.0 <= args.smoothing < 1.0:
            raise PlotInputError(f"--smoothing {args.smoothing}: need a weight in [0, 1)")
        workspace = Path(args.workspace)
        if not workspace.is_dir():
            raise PlotInputError(f"--workspace {workspace} does not exist; point it at the simulator workspace root")
        jobs = available_jobs(workspace, args.job_names, tracking_uri=args.tracking_uri)
        if not jobs:
            raise PlotInputError(
                f"none of the jobs {' '.join(args.job_names)} has TensorBoard events or an MLflow store under "
                f"{workspace}"
            )
        out_dir = Path(args.output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
    except PlotInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as e:
        print(f"error: cannot create --output_dir {args.output_dir}: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    per_job = {configuration_name(p.job_name): job_curves(p, args.tags, args.tracking_uri) for p in jobs}
    for tag in args.tags:
        curves = {name: c[tag] for name, c in per_job.items() if c[tag][0]}
        if not curves:
            print(f"skipping tag {tag}: no job logged it")
            continue
        fig = plot_tag(curves, tag, args.smoothing, args.note)
        for path in write_figure(fig, out_dir, f"{args.prefix}{tag}", args.formats):
            print(f"wrote {path}")
        for name, (rounds, values) in curves.items():
            smoothed = tensorboard_smooth(values, args.smoothing)
            print(
                f"  {tag} {name}: {len(rounds)} rounds, last {values[-1]:.4f} (smoothed {smoothed[-1]:.4f}), "
                f"best {max(values):.4f} at round {rounds[int(np.argmax(values))]}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
