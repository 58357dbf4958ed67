"""Every place this project depends on NVIDIA FLARE 2.9's internals, each with the line that says what it works around.

Upgrading NVFlare means reading this one file: :func:`require_nvflare_version` stops job.py with one line when the
installed NVFlare is not the version these workarounds were written for.

- The simulator's site mix-up: :func:`give_each_simulator_thread_its_own_build_ctx` and the launcher at the bottom
  (``python -m brats_fl.nvflare_compat``), run by ``SimulatorEnv`` (docs/nvflare_simulator_race.md).
- FedAvg that starts at a later round, and sums the sites' updates in a fixed order: ``ResumableFedAvgRecipe``
  rebuilds FedAvgRecipe's controller as a :class:`BratsFedAvg` (mirroring 2.9's private ``_create_controller``),
  which is a :class:`SiteOrderedFedAvg` (2.9 adds updates in arrival order; docs/determinism.md).
- A server component added to a recipe: :func:`add_server_component` (``recipe._job``, private in 2.9).
- Where NVFlare puts things: the simulator's folder layout (:data:`SERVER_RUN_DIR`, :func:`site_job_dir`,
  :func:`job_dir_of_model`), an admin kit's ``startup/fed_admin.json``, a downloaded result's ``workspace/``.
- What only NVFlare's log text says: :func:`early_stop_of`, :data:`FATAL_SITE_MARKERS`, :func:`first_client_error`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from tempfile import TemporaryDirectory

from nvflare.app_common.workflows.base_fedavg import _get_client_name
from nvflare.app_common.workflows.fedavg import FedAvg

NVFLARE_VERSION = "2.9.0"  # the version every workaround below was written for and tested with


class NVFlareVersionError(RuntimeError):
    """The installed NVFlare is not the one this module's workarounds were written for."""


def require_nvflare_version() -> None:
    """NVFlareVersionError unless NVFlare NVFLARE_VERSION is installed (a newer one may have fixed, or moved, what the
    workarounds here patch)."""
    import nvflare

    if nvflare.__version__ != NVFLARE_VERSION:
        raise NVFlareVersionError(
            f"NVFlare {nvflare.__version__} is installed but brats_fl/nvflare_compat.py was written for "
            f"{NVFLARE_VERSION}: install nvflare=={NVFLARE_VERSION} (requirements.txt), or check each workaround in "
            "that file against the new version and update NVFLARE_VERSION"
        )


# ---------------------------------------------------------------------------------------------------------------
# Where NVFlare 2.9 puts things
# ---------------------------------------------------------------------------------------------------------------
SERVER_RUN_DIR = Path("server") / "simulate_job"  # <workspace>/<job>/ + this: the server's outputs of a simulator job
SERVER_APP_DIR = "app_server"  # ... and its app (the best model, custom/ with the settings) inside that folder
ADMIN_CONFIG = Path("startup") / "fed_admin.json"  # in an admin's startup kit, written by nvflare provision
DOWNLOADED_WORKSPACE = "workspace"  # a deployed job's downloaded result holds the server's job folder here


def site_job_dir(script: str | Path) -> Path:
    """A job's folder at a site, from the path of its client script: NVFlare runs client.py from
    <site workspace>/<job id>/app_<site>/custom/ (simulator: <workspace>/<job>/site-N/simulate_job/app_site-N/...)."""
    return Path(script).resolve().parents[2]


def job_dir_of_model(model: str | Path) -> Path | None:
    """The simulator job folder a model file belongs to: its best model (<job>/server/simulate_job/app_server/x.pt)
    or its last global model (<job>/server/simulate_job/x.pt); None for any other file."""
    path = Path(model).resolve()
    run_dir = path.parent.parent if path.parent.name == SERVER_APP_DIR else path.parent
    job_dir = run_dir.parent.parent
    return job_dir if run_dir == job_dir / SERVER_RUN_DIR else None


def admin_username(startup_kit: Path) -> str:
    """The admin the kit was provisioned for: ProdEnv logs in as admin@nvidia.com unless told otherwise."""
    return json.loads((Path(startup_kit) / ADMIN_CONFIG).read_text())["admin"]["username"]


# ---------------------------------------------------------------------------------------------------------------
# What only NVFlare 2.9's log text says
# ---------------------------------------------------------------------------------------------------------------
FATAL_SITE_MARKERS = ("Stopped ClientRunner due to FATAL_SYSTEM_ERROR",)  # a site's runner gave up for good


def early_stop_of(server_log: Path) -> tuple[str, int] | None:
    """(which early-stopping rule ended the run, at which round) from FedAvg's log lines; None if no rule did."""
    if not server_log.is_file():
        return None
    rule = None
    for line in server_log.read_text(errors="replace").splitlines():
        if "Early stop condition satisfied:" in line:
            rule = f"--stop_dice ({line.split('satisfied:', 1)[1].strip()})"
        elif "Exceeded the number of FL rounds" in line and "without improvements" in line:
            rounds = line.split("FL rounds (", 1)[1].split(")", 1)[0]
            rule = f"--patience ({rounds} rounds without a better val_dice)"
        elif "Stopping at round=" in line and rule:
            return rule, int(line.split("Stopping at round=", 1)[1].split()[0])
    return None


def first_client_error(job_dir: Path) -> str | None:
    """The exception that made a site fail (e.g. 'site-2: ValueError: ...'), from the sites' error_log.txt.

    Sites that were only aborted because another site failed log 'request to abort' errors; those are reported only
    when nothing else was logged."""
    found = []
    for log in sorted(Path(job_dir).glob("site-*/error_log.txt")):
        for line in log.read_text(errors="replace").splitlines():
            head = line.split(":", 1)[0]
            if head.isidentifier() and head.endswith(("Error", "Exception")):
                found.append(f"{log.parent.name}: {line.strip()}")
    root_causes = [f for f in found if "abort" not in f and "RuntimeError: applying transform" not in f]
    return (root_causes or found or [None])[0]


# ---------------------------------------------------------------------------------------------------------------
# FedAvg from a later round, and server components
# ---------------------------------------------------------------------------------------------------------------
class SiteOrderedFedAvg(FedAvg):
    def __init__(self, *args, **kwargs):
        """NVFlare's FedAvg (same arguments), adding the sites' updates in site-name order, not arrival order.

        Works around 2.9's "InTime" aggregation: its result callback ``_aggregate_one_result`` adds each update to a
        running weighted sum as it arrives, and floating-point addition is not associative, so the global model
        depended on which site finished first and two runs with the same seed drifted apart (docs/determinism.md).
        Here the callback holds the round's results; once all have arrived they go through NVFlare's own callback in
        site-name order, then its ``_get_aggregated_result``: the same weights, metrics and round records, one order
        of addition, at the price of holding one update per site until the round ends."""
        super().__init__(*args, **kwargs)
        self._held_results: list = []
        self._held_lock = threading.Lock()  # results arrive on NVFlare's communication threads

    def _aggregate_one_result(self, result) -> bool:
        """Hold a result with parameters (an accepted one); one without goes to NVFlare's callback, which skips it
        with a warning and reports it not accepted, as before."""
        if not result.params:
            return super()._aggregate_one_result(result)
        with self._held_lock:
            self._held_results.append(result)
        return True

    def _get_aggregated_result(self):
        with self._held_lock:
            held, self._held_results = self._held_results, []
        for result in sorted(held, key=_get_client_name):
            try:
                super()._aggregate_one_result(result)
            except Exception as e:  # as NVFlare treats a failing result callback: logged, the others go on
                self.error(f"Unsuccessful aggregation of the result from {_get_client_name(result)}: {e}")
        return super()._get_aggregated_result()


class BratsFedAvg(SiteOrderedFedAvg):
    def __init__(self, *args, best_value: float | None = None, rounds_without_improvement: int = 0, **kwargs):
        """NVFlare's FedAvg controller that never stops at, or keeps a best model of, round 0 (the untrained model),
        its early-stopping state seeded from the rounds a resumed job already ran (2.9 keeps that state in the
        attributes set below).

        Args:
            best_value: the best value of the stop condition's metric in the earlier rounds (None: none yet).
            rounds_without_improvement: rounds since that best value, which --patience counts on from.
            args, kwargs: NVFlare's FedAvg arguments (NVFlare's job configuration looks for them in the base
                classes only when the constructor takes both *args and **kwargs).
        """
        super().__init__(*args, **kwargs)
        self.best_value = best_value
        self.rounds_without_improvement = rounds_without_improvement
        self.best_target_metric_value = best_value
        self.num_fl_rounds_without_improvement = rounds_without_improvement

    def is_curr_model_better(self, curr_model) -> bool:
        if self.current_round == 0:
            return False  # the untrained model's Dice is no best value to improve on
        return super().is_curr_model_better(curr_model)

    def should_stop(self, metrics: dict | None = None) -> bool:
        return self.current_round != 0 and super().should_stop(metrics)


def add_server_component(recipe, component) -> None:
    """Add a component to the server app, as NVFlare's own recipe helpers (add_experiment_tracking) do."""
    recipe._job.to_server(component)


MLFLOW_RECEIVER_ID = "mlflow_receiver"


def add_mlflow_receiver(recipe, tracking_uri: str | None, experiment_name: str) -> None:
    """NVFlare's MLflowReceiver at the server, under its own component id: add_experiment_tracking registers every
    receiver as "receiver", so it cannot add MLflow next to TensorBoard. Without a URI the receiver writes to
    sqlite:///<server job folder>/mlflow.db (NVFlare 2.9's default; MLflow 3.x refuses a plain ./mlruns folder store
    unless MLFLOW_ALLOW_FILE_STORE is set)."""
    from nvflare.app_opt.tracking.mlflow.mlflow_receiver import MLflowReceiver

    tags = {"job": experiment_name, "project": "brats-fl"}  # both given: NVFlare prints a notice for a missing one
    kw_args = {"experiment_name": experiment_name, "run_name": "brats-fl", "experiment_tags": tags, "run_tags": tags}
    recipe._job.to_server(MLflowReceiver(tracking_uri=tracking_uri, kw_args=kw_args), MLFLOW_RECEIVER_ID)


def _resumable_fedavg_recipe():
    """ResumableFedAvgRecipe (see __getattr__ below)."""
    from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe

    class ResumableFedAvgRecipe(FedAvgRecipe):
        def __init__(
            self,
            *,
            start_round: int = 0,
            best_value: float | None = None,
            rounds_without_improvement: int = 0,
            **kwargs,
        ) -> None:
            """NVFlare's PyTorch FedAvg recipe, its controller a BratsFedAvg that runs ``num_rounds`` rounds numbered
            start_round, start_round + 1, ... with the early-stopping state of the rounds before.

            Args:
                start_round: the first round to run.
                best_value, rounds_without_improvement: the early-stopping state of the earlier rounds.
                kwargs: FedAvgRecipe's arguments.
            """
            self._resume_state = {
                "start_round": start_round,
                "best_value": best_value,
                "rounds_without_improvement": rounds_without_improvement,
            }
            super().__init__(**kwargs)

        def _create_controller(self, persistor_id: str, model_params, model_aggregator):
            """FedAvgRecipe's controller, built as NVFlare 2.9's recipe builds it, but a BratsFedAvg."""
            return BratsFedAvg(
                num_clients=self.min_clients,
                num_rounds=self.num_rounds,
                persistor_id=persistor_id,
                model=model_params,
                save_filename=self.save_filename,
                aggregator=model_aggregator,
                stop_cond=self.stop_cond,
                patience=self.patience,
                task_name="train",
                exclude_vars=self.exclude_vars,
                aggregation_weights=self.aggregation_weights,
                memory_gc_rounds=self.server_memory_gc_rounds,
                enable_tensor_disk_offload=self.enable_tensor_disk_offload,
                **self._resume_state,
            )

    return ResumableFedAvgRecipe


# ---------------------------------------------------------------------------------------------------------------
# The simulator's site mix-up (NVFlare 2.9 SimulatorClientRunner.do_one_task, docs/nvflare_simulator_race.md)
# ---------------------------------------------------------------------------------------------------------------
class _BuildCtxOfThisThread:
    """SimulatorClientRunner.build_ctx, one copy per client thread.

    NVFlare 2.9 shares one build_ctx dict between every client thread of the simulator: do_one_task writes the site's
    name into it, then sends it to that site's worker process, without a lock. Two threads starting sites at once can
    interleave, and a worker is then sent another site's name: it takes that identity but keeps its own workspace,
    looks for ``app_<other site>/custom/client.py``, which does not exist, and fails. With this descriptor on
    the class, each thread writes and sends its own copy."""

    def __set__(self, runner, shared: dict) -> None:
        runner.__dict__["_brats_shared_build_ctx"] = shared
        runner.__dict__["_brats_build_ctx_of_thread"] = threading.local()

    def __get__(self, runner, owner=None):
        if runner is None:
            return self
        of_thread = runner.__dict__["_brats_build_ctx_of_thread"]
        if not hasattr(of_thread, "ctx"):
            of_thread.ctx = dict(runner.__dict__["_brats_shared_build_ctx"])  # only client_name is ever written
        return of_thread.ctx


def give_each_simulator_thread_its_own_build_ctx() -> None:
    """Install :class:`_BuildCtxOfThisThread` on NVFlare's SimulatorClientRunner (idempotent). Must run in the
    simulator's own process before its clients start: the launcher below does it."""
    require_nvflare_version()
    from nvflare.private.fed.app.simulator.simulator_runner import SimulatorClientRunner

    if not isinstance(SimulatorClientRunner.__dict__.get("build_ctx"), _BuildCtxOfThisThread):
        SimulatorClientRunner.build_ctx = _BuildCtxOfThisThread()


SIMULATOR_LAUNCHER = "brats_fl.nvflare_compat"  # python -m brats_fl.nvflare_compat <NVFlare simulator arguments>


def simulator_command(job_folder: str, workspace: str, clients: list[str], threads: int, gpu: str | None) -> list[str]:
    """The command that runs an exported job in NVFlare's simulator, through the launcher below."""
    command = [sys.executable, "-m", SIMULATOR_LAUNCHER, job_folder, "-w", workspace, "-c", ",".join(clients)]
    command += ["-t", str(threads)]
    return command + (["-gpu", gpu] if gpu else [])


def _simulator_env():
    """SimulatorEnv (see __getattr__ below)."""
    from nvflare.recipe import SimEnv

    class SimulatorEnv(SimEnv):
        """NVFlare's SimEnv, but the simulator runs through this module's launcher, which first gives each client
        thread its own build_ctx (SimEnv.deploy starts ``python -m nvflare.private.fed.app.simulator.simulator``
        itself, where nothing of this project could run first)."""

        def deploy(self, job) -> str:
            workspace = os.path.join(self.workspace_root, job.name)
            self._ensure_default_component_policy(workspace)
            with TemporaryDirectory() as job_root:
                job.export_job(job_root)
                command = simulator_command(
                    os.path.join(job_root, job.name), workspace, self.clients, self.num_threads, self.gpu_config
                )
                status = subprocess.Popen(command, start_new_session=True).wait()
            self.last_run_failed = status != 0
            if self.last_run_failed:
                raise RuntimeError(f"the simulator exited with status {status}; logs in {workspace}/*/log.txt")
            return job.name

    return SimulatorEnv


_LAZY_CLASSES = {"ResumableFedAvgRecipe": _resumable_fedavg_recipe, "SimulatorEnv": _simulator_env}
_lazy_made: dict[str, type] = {}


def __getattr__(name: str):
    """ResumableFedAvgRecipe and SimulatorEnv subclass NVFlare classes whose modules import torch (seconds): they are
    made on first use, so that importing this module (job.py's checks, the log readers) stays fast."""
    if name not in _LAZY_CLASSES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name not in _lazy_made:
        made = _LAZY_CLASSES[name]()
        made.__qualname__ = name  # as if defined at module level, which its module and name resolve to
        _lazy_made[name] = made
    return _lazy_made[name]


def run_simulator(argv: list[str]) -> int:
    """NVFlare's simulator main (nvflare.private.fed.app.simulator.simulator), with the build_ctx fix installed."""
    import argparse

    from nvflare.private.fed.app.simulator.simulator import define_simulator_parser
    from nvflare.private.fed.app.simulator.simulator import run_simulator as nvflare_run_simulator
    from nvflare.private.fed.app.utils import version_check

    give_each_simulator_thread_its_own_build_ctx()
    if sys.platform == "darwin":  # as NVFlare's own simulator main does
        import multiprocessing

        multiprocessing.set_start_method("spawn")
    version_check()
    parser = argparse.ArgumentParser(prog=f"python -m {SIMULATOR_LAUNCHER}")
    define_simulator_parser(parser)
    return nvflare_run_simulator(parser.parse_args(argv))


if __name__ == "__mp_main__":  # a process the simulator spawns (macOS) re-imports this module under this name
    give_each_simulator_thread_its_own_build_ctx()

if __name__ == "__main__":
    sys.exit(run_simulator(sys.argv[1:]))
