"""Who gains from federating: every model scored on every site's own validation cases (the cross-site matrix).

The models are those earlier jobs saved: each site's best model of a local-only job (job.py --local_only), the best
global model of a federated job, the best model of the centralised baseline, and any checkpoint given by name. One
NVFlare job (brats_fl/site_models.py, ModelsAtSites) sends each model to every site; each site scores it case by
case on its own validation cases with the project's metrics (client.py final_evaluation, brats_fl/evaluation.py) and
only the scores come back. Per model, the matrix gives each site's Dice (overall, TC, WT, ET: means over the site's
cases), the mean over sites (each site counts once, whatever its number of cases), the worst site and the spread
(best site minus worst site). result_stat/cross_site.py is the command; docs/cross_site.md explains how to read it.

Also here: what job.py prints after a local-only job, whose final evaluation has each site score its own model.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, replace
from pathlib import Path

from brats_fl.evaluation import write_results
from brats_fl.job_results import JobPaths
from brats_fl.settings import InputError, TrainingSettings, site_names

MATRIX_SCORES = ("dice_overall", "dice_tc", "dice_wt", "dice_et")
MATRIX_FILES = ("cross_site.md", "cross_site.csv", "cross_site.json")  # in the matrix job's server folder
LOCAL_MODEL_PREFIX = "local "  # a local-only job's models: "local site-1", ...


@dataclass(frozen=True)
class MatrixModel:
    name: str  # the row of the matrix
    checkpoint: Path
    kind: str  # "local", "federated", "centralised" or "given"


# ---------------------------------------------------------------------------------------------------------------
# The numbers: cells, per-model summary, tables
# ---------------------------------------------------------------------------------------------------------------
def cell_means(cases: dict[str, dict]) -> dict[str, float]:
    """The mean of each matrix score over one site's cases, and their number."""
    means = {k: sum(c[k] for c in cases.values()) / len(cases) for k in MATRIX_SCORES}
    return {**means, "n_cases": len(cases)}


def matrix_cells(scores: dict[str, dict[str, dict]]) -> dict[str, dict[str, dict]]:
    """{model: {site: per-case scores}} -> {model: {site: cell means}}."""
    return {model: {site: cell_means(cases) for site, cases in sites.items()} for model, sites in scores.items()}


def model_summary(cells: dict[str, dict], score: str = "dice_overall") -> dict:
    """One model's row summary over the sites: mean (each site once), worst site and its value, spread (max - min)."""
    values = {site: cell[score] for site, cell in cells.items()}
    worst = min(sorted(values), key=values.get)
    return {
        "mean": sum(values.values()) / len(values),
        "worst_site": worst,
        "worst": values[worst],
        "spread": max(values.values()) - values[worst],
    }


def render_matrix(cells: dict[str, dict[str, dict]], sites: list[str]) -> str:
    """Markdown: the overall Dice of every model at every site with its summary; then TC / WT / ET per cell."""
    head = ["Model", *sites, "mean over sites", "worst site", "spread"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for model, row in cells.items():
        s = model_summary(row)
        values = [f"{row[site]['dice_overall']:.4f}" for site in sites]
        summary = [f"{s['mean']:.4f}", f"{s['worst_site']} ({s['worst']:.4f})", f"{s['spread']:.4f}"]
        lines.append("| " + " | ".join([model, *values, *summary]) + " |")
    lines += ["", "TC / WT / ET Dice:", "", "| Model | " + " | ".join(sites) + " |"]
    lines.append("|" + "|".join(["---"] * (len(sites) + 1)) + "|")
    for model, row in cells.items():
        regions = [" / ".join(f"{row[site][k]:.3f}" for k in MATRIX_SCORES[1:]) for site in sites]
        lines.append("| " + " | ".join([model, *regions]) + " |")
    cases = ", ".join(f"{site} {next(iter(cells.values()))[site]['n_cases']}" for site in sites)
    lines += ["", f"Validation cases per site: {cases}. Dice: mean over a site's cases (BraTS conventions)."]
    return "\n".join(lines)


def write_matrix_csv(cells: dict[str, dict[str, dict]], path: Path) -> None:
    """One row per (model, site) cell, then one per model summary (site "mean over sites")."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "site", "n_cases", *MATRIX_SCORES, "worst_site", "spread"])
        for model, row in cells.items():
            for site, cell in row.items():
                writer.writerow([model, site, cell["n_cases"], *(f"{cell[k]:.6f}" for k in MATRIX_SCORES), "", ""])
            means = {k: model_summary(row, k)["mean"] for k in MATRIX_SCORES}
            s = model_summary(row)
            writer.writerow(
                [model, "mean over sites", sum(c["n_cases"] for c in row.values())]
                + [f"{means[k]:.6f}" for k in MATRIX_SCORES]
                + [s["worst_site"], f"{s['spread']:.6f}"]
            )


def plot_matrix(cells: dict[str, dict[str, dict]], sites: list[str], caption: str, path: Path) -> None:
    """Heatmap of the overall Dice (rows: models, columns: sites, then the mean over sites), values written in."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    models = list(cells)
    rows = [[cells[m][s]["dice_overall"] for s in sites] + [model_summary(cells[m])["mean"]] for m in models]
    values = np.array(rows)
    fig, ax = plt.subplots(figsize=(1.3 * len(sites) + 4.5, 0.55 * len(models) + 2.2))
    image = ax.imshow(values, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(sites) + 1), [*sites, "mean"])
    ax.set_yticks(range(len(models)), models)
    ax.axvline(len(sites) - 0.5, color="white", linewidth=3)
    for (i, j), v in np.ndenumerate(values):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="black" if v > 0.6 else "white", fontsize=9)
    ax.set_xlabel("validation cases of site")
    fig.colorbar(image, ax=ax, label="Dice (mean of TC, WT, ET)")
    fig.text(0.01, 0.01, caption, fontsize=8, wrap=True, va="bottom")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------------------------
# Which models, which sites: from job folders, checked before anything runs
# ---------------------------------------------------------------------------------------------------------------
def models_of_job(job: JobPaths, settings: TrainingSettings, n_clients: int) -> list[MatrixModel]:
    """A local-only job's per-site best models, a federated job's best global model, a centralised job's best."""
    from brats_fl.site_models import LOCAL_MODELS_DIR

    if settings.local_only:
        return [
            MatrixModel(f"{LOCAL_MODEL_PREFIX}{site}", job.server_job_dir / LOCAL_MODELS_DIR / f"{site}.pt", "local")
            for site in site_names(n_clients)
        ]
    if n_clients == 1:
        return [MatrixModel(f"centralised ({job.job_name})", job.best_model, "centralised")]
    return [MatrixModel(f"FedAvg ({job.job_name})", job.best_model, "federated")]


def check_models(models: list[MatrixModel], settings: TrainingSettings) -> None:
    """Every model file exists and is this project's network at the settings' width; InputError naming it."""
    from brats_fl.evaluation import checkpoint_problem
    from model import BratsSegResNet

    names = [m.name for m in models]
    for m in models:
        if names.count(m.name) > 1:
            raise InputError(f"model name {m.name!r} given twice: each row of the matrix needs its own name")
        if not m.checkpoint.is_file():
            raise InputError(f"{m.name}: no model file {m.checkpoint} (did its job finish?)")
        problem = checkpoint_problem(m.checkpoint, BratsSegResNet(init_filters=settings.init_filters))
        if problem:
            raise InputError(
                f"{m.name}: {m.checkpoint} is not a BratsSegResNet of init_filters {settings.init_filters} (the "
                f"sites' network): {problem}"
            )


def check_site_validation(settings: TrainingSettings, n_clients: int) -> None:
    """Every site lists validation cases of its own in its datalist; InputError naming the first that does not."""
    from brats_fl.pipeline import read_datalist

    for site in site_names(n_clients):
        path = Path(settings.datalist_json_path) / f"{site}.json"
        try:
            validation = read_datalist(path).get("validation")
        except (OSError, ValueError) as e:
            raise InputError(f"{site}: cannot read its datalist {path}: {e}") from None
        if not validation:
            raise InputError(
                f"{site}: its datalist {path} lists no validation cases; the matrix scores every model on each site's "
                "own validation cases"
            )


# ---------------------------------------------------------------------------------------------------------------
# Running the scoring job
# ---------------------------------------------------------------------------------------------------------------
def score_models_at_sites(settings, env, n_clients: int, threads: int, gpu, models: dict, eval_paths: JobPaths):
    """Run the ModelsAtSites job; (RunOutcome, {model: {site: {case: scores}}} or None)."""
    from brats_fl.recipes import build_models_at_sites_recipe
    from brats_fl.runner import RunOutcome
    from brats_fl.site_models import MODELS_AT_SITES_FILE

    settings = replace(settings, validate_at="every_site")  # every site scores on its own cases
    recipe = build_models_at_sites_recipe(settings, eval_paths.job_name, n_clients, models)
    outcome = env.run(recipe, eval_paths, n_clients, threads, gpu)
    if outcome.interrupted or outcome.error:
        return outcome, None
    path = eval_paths.server_job_dir / MODELS_AT_SITES_FILE
    scores = json.loads(path.read_text()) if path.is_file() else {}
    missing = [f"{m} at {s}" for m, spec in models.items() for s in spec["sites"] if not scores.get(m, {}).get(s)]
    if missing:
        return RunOutcome(error=f"no scores for {', '.join(missing)}; see {eval_paths.job_dir}/site-*/log.txt"), None
    return outcome, scores


# ---------------------------------------------------------------------------------------------------------------
# After a local-only job (job.py --local_only)
# ---------------------------------------------------------------------------------------------------------------
def local_training_lines(run) -> list[str]:
    """Each site's best round and model, from what LocalOnlyTraining recorded; JobResultError if a site has none."""
    from brats_fl.job_results import JobResultError
    from brats_fl.site_models import LOCAL_TRAINING_FILE

    path = run.job.server_job_dir / LOCAL_TRAINING_FILE
    if not path.is_file():
        raise JobResultError(f"no {path}: the local-only training recorded nothing")
    record = json.loads(path.read_text())
    lines = []
    for model in models_of_job(run.job, run.settings, run.n_clients):
        site = model.name.removeprefix(LOCAL_MODEL_PREFIX)
        best = record.get(site, {})
        if best.get("best_round") is None or not model.checkpoint.is_file():
            raise JobResultError(f"{site} has no best local model (no val_dice after round 0 in {path})")
        lines.append(
            f"  {site}: best val_dice {best['best_val_dice']:.4f} on its own validation cases at round "
            f"{best['best_round']}; model: {model.checkpoint}"
        )
    return lines


def report_local_only(run) -> int:
    """What job.py prints after a local-only job: each site's best model, then (unless --no_final_eval) the scores
    each site gave its own model case by case at the end of the job, as in the final evaluation of a federated job,
    and the command that builds the cross-site matrix."""
    import sys

    from brats_fl.job_results import FINAL_EVALUATION_FILE, JobResultError
    from brats_fl.reporting import final_evaluation_lines
    from brats_fl.settings import EXIT_FAILED, EXIT_OK

    job = run.job
    try:
        lines = local_training_lines(run)
    except JobResultError as e:
        print(f"error: job {job.job_name} did not finish properly: {e}", file=sys.stderr)
        return EXIT_FAILED
    head = f"Job {job.job_name} finished: {run.settings.num_rounds} rounds of local-only training (no aggregation)"
    print("\n".join([f"{head}, workspace {job.job_dir}", *lines]), flush=True)
    if run.final_eval:  # LocalOnlyTraining had each site score its own best model, at the end of the job
        scores_path = job.server_job_dir / FINAL_EVALUATION_FILE
        per_site = json.loads(scores_path.read_text()) if scores_path.is_file() else {}
        missing = [s for s in run.sites if not per_site.get(s)]
        if missing:
            print(f"error: the final evaluation has no scores of {', '.join(missing)} ({scores_path})", file=sys.stderr)
            return EXIT_FAILED
        write_results(per_site, job.final_evaluation_table, job.final_evaluation_csv)
        lines = final_evaluation_lines(job, job.final_evaluation_table)
        print("\n".join(lines).replace("of the best model", "of each site's own model"))
    print(f"  compare: python -m result_stat.cross_site --jobs {job.job_dir} <federated job folder>")
    return EXIT_OK
