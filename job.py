"""Federated BraTS 2018 brain-tumour segmentation (Li et al., MLMI 2019) on NVIDIA FLARE's Job Recipe API.

    python job.py                                                       # demo: synthetic data, a few CPU minutes
    python job.py --dataset_base_dir /data/brats18 --n_clients 1        # centralised
    python job.py --dataset_base_dir /data/brats18 --n_clients 4        # federated
    python job.py --dataset_base_dir /data/brats18 --n_clients 4 --enable_dp                         # + SVT
    python job.py --dataset_base_dir /data/brats18 --n_clients 4 --enable_dp --dp_mechanism dpsgd    # + DP-SGD
    python job.py --n_clients 4 --local_only --demo heterogeneous       # each site alone (brats18_4_local)
    python job.py --resume /tmp/nvflare/simulation/brats18_4            # continue a stopped or crashed job
    python job.py --checkpoint <job>/server/simulate_job/app_server/best_FL_global_model.pt   # score a model

Reads the flags into one set of training settings, builds NVFlare's FedAvg recipe around BratsSegResNet (sites send
weight differences; the server keeps the global model with the best validation Dice, and the last one), runs it
where --env says, then has the sites score the best model on their validation cases (the final evaluation) and
prints a summary. Ctrl-C stops every process the job started and prints the command that resumes it.

Where things are: the flags in brats_fl/cli.py, their checks in brats_fl/run_options.py, sim/poc/prod in
brats_fl/environments.py, the server components in brats_fl/fl_components.py, NVFlare 2.9 workarounds in
brats_fl/nvflare_compat.py, resuming in brats_fl/resume.py, the printed summary in brats_fl/reporting.py.
"""

from __future__ import annotations

import sys

# Importing nvflare.recipe strips NVFlare's own --export / --export-dir flags from sys.argv (recipe.execute honours
# them), so it must happen before our parser runs.
import nvflare.recipe  # noqa: F401

from brats_fl.job_results import JobPaths
from brats_fl.run_options import RunOptions, run_from_argv
from brats_fl.settings import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, KEY_METRIC, InputError

# torch, MONAI and NVFlare's recipes take seconds to import: they are imported inside the functions below, so that
# `python job.py --help` and bad-input errors answer at once.


def main(argv: list[str] | None = None) -> int:
    try:
        run = run_from_argv(argv, __doc__)  # the flags as settings, decided and checked; nothing written yet
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT

    from brats_fl.memory import limit_malloc_arenas, memory_preflight
    from brats_fl.reporting import print_opening_lines

    problem = memory_preflight(run)  # prints each site's memory estimate against what the machine has
    if problem:  # the sites that run at once would not fit: stop before anything runs
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_BAD_INPUT
    limit_malloc_arenas()  # for every process the job starts (docs/performance.md#memory)
    print_opening_lines(run)
    if run.checkpoint is not None:
        return evaluate_checkpoint(run)
    recipe = training_recipe(run)
    outcome = run.env.run(recipe, run.run_paths, run.n_clients, run.threads, run.gpu)
    return report_training(run, outcome)


def training_recipe(run: RunOptions):
    """NVFlare's FedAvg of BratsSegResNet over the run's sites, from round 0 or from where a resumed job stopped."""
    from nvflare.client.config import TransferType

    from brats_fl.fl_components import LastGlobalModelKeeper, SiteFailureWatcher
    from brats_fl.memory import RECIPE_MEMORY_CLEANUP
    from brats_fl.nvflare_compat import ResumableFedAvgRecipe, add_server_component
    from brats_fl.recipes import add_privacy, add_tracking, send_to_named_sites, ship_app_files, stop_condition
    from model import BratsSegResNet

    settings, start = run.settings, run.start
    recipe = ResumableFedAvgRecipe(
        name=run.run_paths.job_name,
        model=BratsSegResNet(init_filters=settings.init_filters, init_seed=settings.seed),  # the server rebuilds it
        initial_ckpt=str(run.env.checkpoint_for_recipe(start.initial_ckpt)) if start.initial_ckpt else None,
        min_clients=run.n_clients,
        num_rounds=run.rounds_to_run,
        train_script="client.py",  # relative: shipped in the job, so an exported job runs anywhere
        params_transfer_type=TransferType.DIFF,  # sites send the difference to the global model they received
        key_metric=KEY_METRIC,  # the best model is the one with the best validation Dice (round 0 never is)
        stop_cond=stop_condition(settings),  # --stop_dice, --patience
        patience=settings.patience,
        start_round=start.round,
        best_value=start.best_value,
        rounds_without_improvement=start.rounds_without_improvement,
        local_only=settings.local_only,  # --local_only: each site trains alone (brats_fl/site_models.py) ...
        local_final_evaluation=run.final_eval,  # ... then scores its own best model, in the same job
        **RECIPE_MEMORY_CLEANUP,  # gc + malloc_trim every round at server and sites: memory stays flat over rounds
    )
    if run.env.sends_to_named_sites:
        send_to_named_sites(recipe, run.n_clients)  # a deployment: site-1 ... site-N, not every site there is
    ship_app_files(recipe, settings)  # brats_fl/, model.py and brats_settings.json, next to client.py
    add_tracking(recipe, run.trackers, run.tracking_uri)  # --tracking: the sites' curves reach TensorBoard/MLflow
    add_server_component(recipe, LastGlobalModelKeeper())  # last_global_model.pt every round: what --resume needs
    recipe.add_server_input_filter(SiteFailureWatcher(), tasks=["train"])  # a site's error ends the job, named
    if settings.dp_mechanism:
        add_privacy(recipe, settings, run.n_clients, start.privacy_report)  # SVT filter / DP-SGD, privacy report
    if settings.audit:
        from brats_fl.privacy.audit_observer import add_audit_observer

        add_audit_observer(recipe, settings, run.n_clients)  # --audit: scores what the server receives
    return recipe


def report_training(run: RunOptions, outcome) -> int:
    """Fold a resumed part into its job, then print how the run ended: stopped (with the resume command), failed, or
    finished with its summary and the final evaluation of the best model at the sites."""
    from brats_fl.job_results import JobResultError
    from brats_fl.nvflare_compat import early_stop_of
    from brats_fl.reporting import (
        FINAL_EVALUATION_JOB,
        evaluate_at_sites,
        final_evaluation_lines,
        job_summary,
        stop_line,
    )
    from brats_fl.resume import fold_part_into_job

    job = run.job
    if run.start.round:
        fold_part_into_job(job, run.run_paths, run.start.round)
    if outcome.interrupted:
        print(stop_line(run, f"Stopped by {outcome.interrupted}"), file=sys.stderr, flush=True)
        return outcome.interrupted.exit_code
    if outcome.error:
        print(f"error: job {job.job_name} failed: {outcome.error}", file=sys.stderr)
        print(stop_line(run, "Once the cause is fixed, the job can go on:"), file=sys.stderr)
        return EXIT_FAILED
    early_stop = early_stop_of(run.run_paths.server_log)
    if early_stop is None and run.last_round < run.settings.num_rounds - 1:
        print(stop_line(run, "Stopped as --stop_after_round asked"), flush=True)
        return EXIT_OK
    if run.settings.local_only:
        from brats_fl.cross_site import report_local_only

        return report_local_only(run)  # each site's best model, each scoring its own
    try:
        summary = job_summary(run, early_stop[1] + 1 if early_stop else run.settings.num_rounds)
    except (JobResultError, OSError, ValueError) as e:
        print(f"error: job {job.job_name} did not finish properly: {e}", file=sys.stderr)
        return EXIT_FAILED
    if early_stop:
        summary.extra_lines.append(f"  stopped early by {early_stop[0]} at round {early_stop[1]}")
    if not run.final_eval:
        print(summary.render())
        return EXIT_OK
    outcome, table = evaluate_at_sites(run, job.best_model, JobPaths(job.job_dir, FINAL_EVALUATION_JOB), job)
    if table:
        summary.extra_lines += final_evaluation_lines(job, table)
    print(summary.render())
    if outcome.interrupted or outcome.error:
        why = f"stopped by {outcome.interrupted}" if outcome.interrupted else f"failed: {outcome.error}"
        print(
            f"error: the final evaluation {why}; training is complete: score the best model with "
            f"python job.py --checkpoint {job.best_model}",
            file=sys.stderr,
        )
        return outcome.interrupted.exit_code if outcome.interrupted else EXIT_FAILED
    return EXIT_OK


def evaluate_checkpoint(run: RunOptions) -> int:
    """--checkpoint: the sites score one model; the table goes into the evaluation job's server folder."""
    from brats_fl.reporting import evaluate_at_sites, final_evaluation_lines

    outcome, table = evaluate_at_sites(run, run.checkpoint, run.job, run.job)
    if outcome.interrupted:
        print(f"Stopped by {outcome.interrupted}: the evaluation did not finish.", file=sys.stderr)
        return outcome.interrupted.exit_code
    if outcome.error:
        print(f"error: the evaluation of {run.checkpoint} failed: {outcome.error}", file=sys.stderr)
        return EXIT_FAILED
    print("\n".join([f"Evaluation of {run.checkpoint} finished:", *final_evaluation_lines(run.job, table)]))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
