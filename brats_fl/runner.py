"""Running a job so that it can be stopped: signals end the whole process tree, and a watchdog ends a job whose site
has stopped for good while the server waits for it.

NVFlare's simulator starts several processes, some in sessions of their own: a signal to job.py alone leaves them
running (seen with NVFlare 2.9: killing the parent left 7 processes behind). :func:`stoppable` turns SIGINT and
SIGTERM into :class:`JobInterrupted` in job.py's main thread and, whatever ends the run, stops every process it
started. The :class:`Watchdog` reads the sites' logs: a site whose client runner stopped on a fatal error (seen with
NVFlare 2.9's simulator: a site that cannot start its script) leaves the server waiting for ever.
"""

from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil

from brats_fl.job_results import JobPaths, first_client_error

GRACE_SECONDS = 10  # SIGTERM first; whatever still runs after this gets SIGKILL
FATAL_MARKERS = ("Stopped ClientRunner due to FATAL_SYSTEM_ERROR",)


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


@contextmanager
def stoppable(job_dir: Path):
    """Within the block, SIGINT and SIGTERM raise JobInterrupted; on leaving it, every process of the job is stopped.

    Only the main thread receives signals, so this must wrap the (blocking) run in job.py's main thread."""
    previous = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGINT, signal.SIGTERM)}
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
                if any(marker in line for marker in FATAL_MARKERS):
                    return f"{log.parent.name}: {line.split(' - ', 3)[-1].strip()}"
        return None

    def stop(self) -> None:
        self._done.set()


def wait_for(condition, timeout: float, period: float = 0.5) -> bool:
    """Poll condition() until it is true or timeout seconds have passed; returns whether it became true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(period)
    return bool(condition())


@dataclass
class RunOutcome:
    """How a run in the simulator ended: normally (both None), stopped by a signal, or failed (why)."""

    interrupted: JobInterrupted | None = None
    error: str | None = None


def run_in_simulator(recipe, paths: JobPaths, n_clients: int, threads: int, gpu: str | None) -> RunOutcome:
    """Run the recipe as job paths.job_name in NVFlare's simulator under paths.workspace_root (which wipes the job's
    folder first), stoppable by SIGINT/SIGTERM and watched for sites that died. With NVFlare's --export flag,
    recipe.execute writes the job folder and raises SystemExit instead."""
    from nvflare.recipe import SimEnv

    env = SimEnv(num_clients=n_clients, num_threads=threads, gpu_config=gpu, workspace_root=str(paths.workspace_root))
    watchdog = Watchdog(paths.job_dir)
    try:
        with stoppable(paths.job_dir):
            watchdog.start()
            recipe.execute(env)
    except JobInterrupted as stop:
        return RunOutcome(interrupted=stop)
    except Exception as e:  # the simulator raises when an in-process site fails
        return RunOutcome(error=first_client_error(paths.workspace_root, paths.job_name) or watchdog.reason or str(e))
    finally:
        watchdog.stop()
    if watchdog.reason:
        return RunOutcome(error=first_client_error(paths.workspace_root, paths.job_name) or watchdog.reason)
    return RunOutcome()
