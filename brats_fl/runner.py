"""Running a job so that it can be stopped: signals end the whole process tree, and a watchdog ends a job whose site
has stopped for good while the server waits for it.

NVFlare's simulator starts several processes, some in sessions of their own: a signal to job.py alone leaves them
running (seen with NVFlare 2.9: killing the parent left 7 processes behind). :func:`stoppable` turns SIGINT and
SIGTERM into :class:`JobInterrupted` in job.py's main thread and, whatever ends the run, stops every process it
started. The :class:`Watchdog` reads the sites' logs: a site whose client runner stopped on a fatal error (seen with
NVFlare 2.9's simulator: a site that cannot start its script) leaves the server waiting for ever.
"""

from __future__ import annotations

import json
import shutil
import signal
import threading
import time
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import psutil

from brats_fl.job_results import JobPaths, site_failure_of
from brats_fl.nvflare_compat import DOWNLOADED_WORKSPACE, FATAL_SITE_MARKERS, admin_username, first_client_error

GRACE_SECONDS = 10  # SIGTERM first; whatever still runs after this gets SIGKILL


class JobInterrupted(BaseException):
    """SIGINT or SIGTERM reached job.py (a BaseException, so that no library's `except Exception` swallows it)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # 130 for SIGINT, 143 for SIGTERM, as shells report them


def job_processes_elsewhere(job_dir: Path) -> list[psutil.Process]:
    """NVFlare processes whose command line names the job's folder and that this process did not start: a
    descendant whose parent died is re-parented, and a run whose job.py was killed outright leaves its simulator
    running. (A TensorBoard or an editor on the folder is not an NVFlare process and is left alone.)"""
    me = psutil.Process()
    mine = {me.pid, *(p.pid for p in me.children(recursive=True))}
    marker = str(job_dir)
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            words = p.info["cmdline"] or []
            if p.pid not in mine and any("nvflare" in w for w in words) and any(marker in w for w in words):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def processes_of(job_dir: Path) -> list[psutil.Process]:
    """This process's descendants, and the job's NVFlare processes it lost track of."""
    return [*psutil.Process().children(recursive=True), *job_processes_elsewhere(job_dir)]


def stop_processes(processes: list[psutil.Process], grace: float = GRACE_SECONDS) -> None:
    """SIGTERM, then SIGKILL for whatever is still alive after grace seconds."""
    for p in processes:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace)


def _raise_interrupted(signum, _frame):
    raise JobInterrupted(signum)


_stop_requests: list[int] = []  # signals received in a stoppable(deferred=True) block, not yet acted on


def _defer_interrupted(signum, _frame):
    _stop_requests.append(signum)


def raise_if_stop_requested() -> None:
    """In a deferred block: raise JobInterrupted here, between two calls into NVFlare, if a signal came."""
    if _stop_requests:
        raise JobInterrupted(_stop_requests[0])


@contextmanager
def stoppable(job_dir: Path, deferred: bool = False):
    """Within the block, SIGINT and SIGTERM raise JobInterrupted; on leaving it, every process of the job is stopped.

    deferred: the signal is only recorded, and raise_if_stop_requested raises it where the caller checks. For NVFlare's
    admin sessions: an exception raised inside one leaves it open, and its connection thread keeps the process alive.
    Only the main thread receives signals, so this must wrap the (blocking) run in job.py's main thread."""
    _stop_requests.clear()
    handler = _defer_interrupted if deferred else _raise_interrupted
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s in previous:
            signal.signal(s, signal.SIG_IGN)  # no second signal may interrupt the clean-up
        stop_processes(processes_of(job_dir))
        for s, handler in previous.items():
            signal.signal(s, handler)


class Watchdog(threading.Thread):
    """Polls the sites' logs under job_dir; on a fatal error it stops the job's processes (the run then returns)
    and remembers the line that said why."""

    def __init__(self, job_dir: Path, period: float = 2.0):
        super().__init__(daemon=True, name="watchdog")
        self.job_dir = job_dir
        self.period = period
        self.reason: str | None = None
        self._done = threading.Event()
        self._read_up_to: dict[Path, int] = {}  # logs grow for days: read each line once
        self._since = time.time()  # a log last written before this is an earlier run's

    def run(self) -> None:
        while not self._done.wait(self.period):
            reason = self.fatal_error()
            if reason:
                self.reason = reason
                stop_processes(processes_of(self.job_dir))
                return

    def fatal_error(self) -> str | None:
        for log in sorted(self.job_dir.glob("site-*/log.txt")):
            try:
                stat = log.stat()
                if stat.st_mtime < self._since:
                    continue
                start = self._read_up_to.get(log, 0)
                if stat.st_size < start:  # the simulator wiped the folder: a new log
                    start = 0
                with open(log, "rb") as f:
                    f.seek(start)
                    data = f.read()
            except OSError:
                continue
            complete = data[: data.rfind(b"\n") + 1]  # a line still being written is read next time
            self._read_up_to[log] = start + len(complete)
            for line in complete.decode(errors="replace").splitlines():
                if any(marker in line for marker in FATAL_SITE_MARKERS):
                    return f"{log.parent.name}: {line.split(' - ', 3)[-1].strip()}"
        return None

    def stop(self) -> None:
        self._done.set()


@dataclass
class RunOutcome:
    """How a run in the simulator ended: normally (both None), stopped by a signal, or failed (why)."""

    interrupted: JobInterrupted | None = None
    error: str | None = None


def run_in_simulator(recipe, paths: JobPaths, clients: list[str], threads: int, gpu: str | None) -> RunOutcome:
    """Run the recipe as job paths.job_name in NVFlare's simulator under paths.workspace_root (which wipes the job's
    folder first), stoppable by SIGINT/SIGTERM and watched for sites that died. With NVFlare's --export flag,
    recipe.execute writes the job folder and raises SystemExit instead."""
    from brats_fl.nvflare_compat import SimulatorEnv

    env = SimulatorEnv(clients=clients, num_threads=threads, gpu_config=gpu, workspace_root=str(paths.workspace_root))
    watchdog = Watchdog(paths.job_dir)
    try:
        with stoppable(paths.job_dir):
            watchdog.start()
            recipe.execute(env)
    except JobInterrupted as stop:
        return RunOutcome(interrupted=stop)
    except Exception as e:  # the simulator exits non-zero when a site fails
        return RunOutcome(error=failure_of(paths) or watchdog.reason or str(e))
    finally:
        watchdog.stop()
    failure = site_failure_of(paths.server_log) or watchdog.reason  # a run can end "normally" after a system panic
    return RunOutcome(error=failure) if failure else RunOutcome()


def failure_of(paths: JobPaths) -> str | None:
    """Why a site failed: what it reported to the server, else the first error in the sites' logs."""
    return site_failure_of(paths.server_log) or first_client_error(paths.job_dir)


SUBMITTED_FILE = "submitted.json"  # in a deployed job's local folder: where and as what it ran
# NVFlare's admin login gives up after 10 s (PocEnv) or 5 s (ProdEnv); a POC server starting on a loaded machine took
# longer here (load 18 on 2 cores: "NoConnection: cannot connect to server for 10 seconds"), so wait a minute.
LOGIN_TIMEOUT_S = 60.0


def deployment_env(env: str, n_clients: int, gpu: str | None, startup_kit: str | None):
    from nvflare.recipe import PocEnv, ProdEnv

    if env == "poc":
        gpu_ids = [int(g) for g in gpu.split(",")] if gpu else None
        return PocEnv(num_clients=n_clients, gpu_ids=gpu_ids, extra={"login_timeout": LOGIN_TIMEOUT_S})
    return ProdEnv(
        startup_kit_location=str(startup_kit),
        username=admin_username(Path(startup_kit)),
        login_timeout=LOGIN_TIMEOUT_S,
    )


def run_deployed(recipe, paths: JobPaths, n_clients: int, gpu: str | None, env: str, startup_kit: str | None):
    """Submit to a POC (NVFlare starts a fresh one on this machine and removes it afterwards) or to a running
    provisioned project (ProdEnv, through the admin startup kit); wait for the job; download its result through
    NVFlare and copy the server's workspace into paths.server_job_dir. Ctrl-C aborts the job."""
    deployment = deployment_env(env, n_clients, gpu, startup_kit)
    job_id = None
    try:
        with stoppable(paths.job_dir, deferred=True):
            try:
                job_id = recipe.execute(deployment).get_job_id()
                reset_job_folder(paths, env, job_id, n_clients)
                print(f"Submitted {paths.job_name} to the {env} deployment as job {job_id}; waiting for it "
                      f"(Ctrl-C aborts it; NVFlare's messages: {paths.job_dir / ADMIN_LOG}).", flush=True)  # fmt: skip
                status = wait_for_job(deployment, job_id, paths)
                with admin_log(paths):
                    result = deployment.get_job_result(job_id, timeout=0.0)
                raise_if_stop_requested()
                if result:
                    shutil.copytree(Path(result) / DOWNLOADED_WORKSPACE, paths.server_job_dir, dirs_exist_ok=True)
            except JobInterrupted:
                if job_id:
                    abort_and_download(deployment, job_id, paths)
                raise
            finally:
                if env == "poc":
                    deployment.stop(clean_up=True)  # stops the POC's server and clients, removes its workspace
    except JobInterrupted as stop:
        return RunOutcome(interrupted=stop)
    except Exception as e:  # submission or download failed: say so in one line
        return RunOutcome(error=f"{env} deployment: {type(e).__name__}: {e}")
    if not result:
        return RunOutcome(error=f"job {job_id} ended with status {status} and no result could be downloaded")
    failure = site_failure_of(paths.server_log)
    if failure or not str(status).endswith("COMPLETED"):
        return RunOutcome(error=failure or f"job {job_id} ended with status {status}; see {paths.server_log}")
    return RunOutcome()


ADMIN_LOG = "nvflare_admin.log"  # in a deployed job's local folder: what NVFlare's admin API printed


@contextmanager
def admin_log(paths: JobPaths):
    """NVFlare's admin API prints job metadata and a dot every poll: into the job's log, not onto the screen."""
    with open(paths.job_dir / ADMIN_LOG, "a") as log, redirect_stdout(log):
        yield


def wait_for_job(deployment, job_id: str, paths: JobPaths, poll_s: float = 10.0, heartbeat_s: float = 1800.0) -> str:
    """Poll the job's status until it is finished; print each new status and, while it runs, a line every
    heartbeat_s, so that a days-long run shows it is alive. Returns the final status, e.g. FINISHED:COMPLETED."""
    started = printed_at = time.monotonic()
    last = None
    while True:
        with admin_log(paths):
            status = str(deployment.get_job_status(job_id))
        now = time.monotonic()
        if status != last or now - printed_at >= heartbeat_s:
            print(f"  job {job_id}: {status} after {(now - started) / 60:.1f} min", flush=True)
            last, printed_at = status, now
        if status.startswith("FINISHED"):
            return status
        pause_until = now + min(poll_s, 1.0 + (now - started) / 60)  # every second at first (short jobs), then poll_s
        while time.monotonic() < pause_until:
            raise_if_stop_requested()
            time.sleep(0.2)
        raise_if_stop_requested()


def reset_job_folder(paths: JobPaths, env: str, job_id: str, n_clients: int) -> None:
    """A fresh local job folder, as the simulator starts with, recording where the job ran."""
    shutil.rmtree(paths.job_dir, ignore_errors=True)
    paths.server_job_dir.mkdir(parents=True)
    record = {"env": env, "job_id": job_id, "n_clients": n_clients}
    (paths.job_dir / SUBMITTED_FILE).write_text(json.dumps(record) + "\n")


def abort_and_download(deployment, job_id: str, paths: JobPaths, timeout: float = 60.0) -> None:
    """Abort the job, then fetch what its server kept (the last global model, the round records), so that it can be
    resumed; best effort: the deployment may already be gone."""
    try:
        with admin_log(paths):
            deployment.abort_job(job_id)
            result = deployment.get_job_result(job_id, timeout=timeout)
        if result:
            shutil.copytree(Path(result) / DOWNLOADED_WORKSPACE, paths.server_job_dir, dirs_exist_ok=True)
    except Exception:
        pass
