"""What job.py prints: the opening lines of a run, the summary of a finished one, the line that says how to go on
after a stop, and the final evaluation at the sites (a second NVFlare job that scores the best model)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from brats_fl.cli import resume_command
from brats_fl.job_results import FINAL_EVALUATION_FILE, JobPaths, JobSummary, summarize_job
from brats_fl.run_options import RunOptions

FINAL_EVALUATION_JOB = "final_evaluation"  # <job>/final_evaluation/: the evaluation job run after training


def print_opening_lines(run: RunOptions) -> None:
    """Before anything runs: a GPU that cannot be used, the disk cache, each site's DP-SGD calibration."""
    import torch

    if run.gpu is not None and not torch.cuda.is_available():
        print(
            f"warning: --gpu {run.gpu} given but torch sees no CUDA device here; the sites will train on the CPU",
            file=sys.stderr,
            flush=True,
        )
    print(cache_line(run.settings.cache_dir), flush=True)
    for site, plan in run.dpsgd_plans.items():
        print(
            f"DP-SGD {site}: {plan.n_train} training cases, sampling rate {plan.sample_rate:.3g}, "
            f"{plan.total_steps} steps, noise multiplier {plan.noise_multiplier:.4g} for epsilon "
            f"{plan.target_epsilon} at delta {plan.delta:.3g}",
            flush=True,
        )
    if run.start.round:
        print(
            f"Resuming job {run.job.job_name} at round {run.start.round} of {run.settings.num_rounds} from "
            f"{run.start.initial_ckpt}; this part runs in {run.run_paths.job_dir} and is folded into the job when it "
            "ends.",
            flush=True,
        )


def cache_line(cache_dir: str | None) -> str:
    """One line on the disk cache the sites will fill and reuse (temporary files of dead runs are removed)."""
    from brats_fl.cache import CaseCache

    if cache_dir is None:
        return "Preprocessed-case cache: off (--no_cache); every case is loaded and preprocessed at every use."
    if not Path(cache_dir).is_absolute():
        return f"Preprocessed-case cache: at each site, in <its workspace>/{cache_dir}"
    cache = CaseCache(cache_dir)
    cache.remove_stale_temporaries()
    return f"Preprocessed-case cache: {cache.describe()}"


def stop_line(run: RunOptions, head: str) -> str:
    """One line: how far the job got, where its last global model is, and the command that continues it."""
    from brats_fl.resume import last_model_round

    last = last_model_round(run.job)
    if last < 0:
        return f"{head} before round 0 ended: nothing to resume from; start the job again."
    if run.settings.audit:
        from brats_fl.privacy.audit import NOT_RESUMABLE

        return f"{head} after round {last}; {NOT_RESUMABLE}"
    return (
        f"{head} after round {last} of rounds 0-{run.settings.num_rounds - 1}; last global model: "
        f"{run.job.last_global_model}; resume with: {resume_command(run.job.job_dir, run.given)}"
    )


def job_summary(run: RunOptions, rounds_run: int) -> JobSummary:
    """The finished job's figures and, under DP, what each site spent; JobResultError/ValueError if incomplete."""
    from brats_fl.privacy.report import check_report, load_report, summary_lines

    summary = summarize_job(
        run.job.workspace_root, run.job.job_name, rounds_run, run.settings.validating_sites(run.n_clients)
    )
    summary.trackers, summary.tracking_uri = run.trackers, run.tracking_uri
    report = None
    if run.settings.dp_mechanism:
        report = load_report(summary.paths.privacy_report)
        check_report(report, run.sites, len(summary.rounds))  # every site and round, none unprotected
        summary.extra_lines += summary_lines(report, summary.paths.privacy_report)
    if run.settings.audit:
        summary.extra_lines += audit_lines(run, summary, report)
    return summary


def audit_lines(run: RunOptions, summary: JobSummary, privacy_report: dict | None) -> list[str]:
    """--audit: the audit's figures, computed from what the auditor observed (brats_fl/privacy/audit_report.py)."""
    from brats_fl.privacy import audit_report

    print("Privacy audit: scoring the canaries and patients the server observed ...", flush=True)
    result = audit_report.audit_job(
        summary.paths.server_job_dir,
        run.settings,
        run.sites,
        len(summary.rounds),
        summary.best_metrics.get("val_dice"),
        privacy_report,
    )
    return audit_report.summary_lines(result, summary.paths.server_job_dir / audit_report.AUDIT_FILE)


def evaluate_at_sites(run: RunOptions, checkpoint: Path, eval_paths: JobPaths, output: JobPaths):
    """Run the evaluation job (brats_fl/recipes.py); on success write the results table and per-case CSV into
    output's server folder. Returns (RunOutcome, table path or None)."""
    from brats_fl.evaluation import write_results
    from brats_fl.recipes import build_evaluation_recipe
    from brats_fl.runner import RunOutcome
    from model import BratsSegResNet

    print(f"Final evaluation: the sites score {checkpoint} on their validation cases.", flush=True)
    recipe = build_evaluation_recipe(
        run.settings,
        BratsSegResNet(init_filters=run.settings.init_filters),
        eval_paths.job_name,
        run.n_clients,
        run.env.checkpoint_for_recipe(checkpoint),
        named_sites=run.env.sends_to_named_sites,
    )
    outcome = run.env.run(recipe, eval_paths, run.n_clients, run.threads, run.gpu)
    if outcome.interrupted or outcome.error:
        return outcome, None
    scores = eval_paths.server_job_dir / FINAL_EVALUATION_FILE
    if not scores.is_file():
        return RunOutcome(
            error=f"no site sent scores ({scores} is missing); see {eval_paths.job_dir}/site-*/log.txt"
        ), None
    output.server_job_dir.mkdir(parents=True, exist_ok=True)
    write_results(json.loads(scores.read_text()), output.final_evaluation_table, output.final_evaluation_csv)
    return outcome, output.final_evaluation_table


def final_evaluation_lines(output: JobPaths, table: Path) -> list[str]:
    return [
        "  final evaluation of the best model at the sites (means over cases, BraTS conventions: a region empty in "
        "truth and prediction scores Dice 1, in one only 0;",
        f"  every score of every case in {output.final_evaluation_csv}):",
        *(f"    {line}" for line in table.read_text().splitlines()),
    ]
