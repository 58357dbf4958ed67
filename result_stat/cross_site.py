"""The cross-site evaluation matrix: every model of earlier jobs scored on every site's own validation cases, at the
sites, with the project's metrics (brats_fl/cross_site.py says how; docs/cross_site.md how to read it).

    python -m result_stat.cross_site --jobs /tmp/nvflare/simulation/brats18_4_local /tmp/nvflare/simulation/brats18_4
    python -m result_stat.cross_site --jobs <local job> <federated job> <centralised job> --figure figs/cross_site.png
    python -m result_stat.cross_site --jobs <federated job> --model mine=/path/to/checkpoint.pt

The sites (and their data) are those of the first job of two or more sites; every other such job must have the same
sites. A local-only job (job.py --local_only) gives one model per site, a federated job its best global model, a
centralised job (--n_clients 1) its best model. Nothing is trained: the models are read from the job folders. The
scoring runs as an NVFlare job in the simulator, <workspace>/<job_name> (default: the first job's workspace,
cross_site); its server folder receives cross_site.md, cross_site.csv, cross_site.json (every case's scores) and the
heatmap (or --figure). Bad input (a job folder that is not one, a model file that is not this network, a site with no
validation cases) stops it before anything runs, in one line, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from brats_fl.cross_site import (
    MATRIX_FILES,
    MatrixModel,
    check_models,
    check_site_validation,
    matrix_cells,
    models_of_job,
    plot_matrix,
    render_matrix,
    score_models_at_sites,
    write_matrix_csv,
)
from brats_fl.job_results import JobPaths
from brats_fl.settings import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, InputError, TrainingSettings, site_names

DEFAULT_JOB_NAME = "cross_site"


@dataclass(frozen=True)
class MatrixPlan:
    """Everything the matrix needs, checked before anything runs."""

    settings: TrainingSettings  # of the first multi-site job: its sites' data, the network's width
    n_clients: int
    models: list[MatrixModel]
    eval_paths: JobPaths
    figure: Path
    caption: str
    gpu: str | None = None

    @property
    def sites(self) -> list[str]:
        return site_names(self.n_clients)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m result_stat.cross_site",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--jobs", nargs="+", default=[], metavar="JOB_DIR", help="job folders (<workspace>/<job_name>)")
    p.add_argument(
        "--model", action="append", default=[], metavar="NAME=CHECKPOINT", help="a further model, by name (repeatable)"
    )
    p.add_argument("--workspace", help="where the scoring job runs (default: the first job's workspace)")
    p.add_argument(
        "--job_name", default=DEFAULT_JOB_NAME, help=f"the scoring job's folder (default: {DEFAULT_JOB_NAME})"
    )
    p.add_argument(
        "--figure", help="where the heatmap goes (default: cross_site.png in the scoring job's server folder)"
    )
    p.add_argument("--data_label", help="what the data is, for the figure's caption (default: the dataset folder)")
    p.add_argument("--gpu", help="GPU ids for the sites, as job.py's --gpu (default: none)")
    p.add_argument("--overwrite", action="store_true", help="replace a matrix the scoring job's folder already holds")
    return p


def read_jobs(job_dirs: list[str]) -> list[tuple[JobPaths, TrainingSettings, int]]:
    """(paths, settings, number of sites) of each job folder; InputError for a folder that is not a job's."""
    from brats_fl.resume import count_sites, read_job_settings

    jobs = []
    for given in job_dirs:
        path = Path(given).resolve()
        job = JobPaths(path.parent, path.name)
        what = f"--jobs {given}"
        jobs.append((job, read_job_settings(job, what), count_sites(job.job_dir, what)))
    return jobs


def given_models(specs: list[str]) -> list[MatrixModel]:
    models = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise InputError(f"--model {spec}: need NAME=CHECKPOINT")
        models.append(MatrixModel(name, Path(path).resolve(), "given"))
    return models


def plan_matrix(args: argparse.Namespace) -> MatrixPlan:
    """The matrix the flags ask for; InputError with one line naming the problem."""
    jobs = read_jobs(args.jobs)
    multi_site = [(job, settings, n) for job, settings, n in jobs if n >= 2]
    if not multi_site:
        raise InputError("--jobs: give at least one job of 2 or more sites (local-only or federated): its sites score")
    first, settings, n = multi_site[0]
    for job, other, m in multi_site[1:]:
        if m != n or Path(other.datalist_json_path or "") != Path(settings.datalist_json_path or ""):
            raise InputError(
                f"--jobs {job.job_dir}: its sites ({m}, datalists {other.datalist_json_path}) are not those of "
                f"{first.job_dir} ({n}, {settings.datalist_json_path}); the matrix scores every model at the same sites"
            )
    if settings.dataset_base_dir is None:
        raise InputError(f"--jobs {first.job_dir}: its sites read their own data (a deployed job); simulator jobs only")
    check_site_validation(settings, n)
    models = [model for job, s, m in jobs for model in models_of_job(job, s, m)] + given_models(args.model)
    check_models(models, settings)
    eval_paths = JobPaths(Path(args.workspace).resolve() if args.workspace else first.workspace_root, args.job_name)
    if (eval_paths.server_job_dir / MATRIX_FILES[0]).is_file() and not args.overwrite:
        raise InputError(f"{eval_paths.job_dir} already holds a matrix: give --overwrite or another --job_name")
    figure = Path(args.figure).resolve() if args.figure else eval_paths.server_job_dir / "cross_site.png"
    data = args.data_label or f"the validation cases of each site's datalist in {settings.datalist_json_path}"
    caption = (
        "Cross-site evaluation: Dice (mean of TC, WT, ET, mean over a site's cases) of each model (rows) on each "
        f"site's own validation cases (columns), scored at the sites. Data: {data}."
    )
    return MatrixPlan(settings, n, models, eval_paths, figure, caption, args.gpu)


def run_matrix(plan: MatrixPlan) -> int:
    from brats_fl.environments import Environment

    print(f"Cross-site evaluation: {len(plan.models)} models, each scored at {', '.join(plan.sites)}:", flush=True)
    for m in plan.models:
        print(f"  {m.name}: {m.checkpoint}", flush=True)
    specs = {m.name: {"checkpoint": str(m.checkpoint), "sites": plan.sites} for m in plan.models}
    outcome, scores = score_models_at_sites(
        plan.settings, Environment(), plan.n_clients, plan.n_clients, plan.gpu, specs, plan.eval_paths
    )
    if scores is None:
        why = f"stopped by {outcome.interrupted}" if outcome.interrupted else f"failed: {outcome.error}"
        print(f"error: the cross-site evaluation {why}", file=sys.stderr)
        return outcome.interrupted.exit_code if outcome.interrupted else EXIT_FAILED
    cells = matrix_cells({m.name: {s: scores[m.name][s] for s in plan.sites} for m in plan.models})
    out = plan.eval_paths.server_job_dir
    table = render_matrix(cells, plan.sites)
    markdown, table_csv, raw = (out / name for name in MATRIX_FILES)
    raw.write_text(json.dumps(scores, indent=1) + "\n")
    write_matrix_csv(cells, table_csv)
    plan.figure.parent.mkdir(parents=True, exist_ok=True)
    plot_matrix(cells, plan.sites, plan.caption, plan.figure)
    markdown.write_text(f"{plan.caption}\n\n{table}\n")
    print(
        f"{plan.caption}\n\n{table}\n\ntable: {markdown}\ncells: {table_csv}\nevery case: {raw}\nfigure: {plan.figure}"
    )
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        plan = plan_matrix(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return run_matrix(plan)


if __name__ == "__main__":
    sys.exit(main())
