"""NVFlare 2.9's simulator can send a site's worker another site's name (docs/nvflare_simulator_race.md).

The race is forced, not waited for: every client thread is held between writing its site's name into build_ctx and
sending build_ctx to its worker until all threads have written theirs. NVFlare's own do_one_task runs; only the
worker process and its connection are stand-ins that record what each worker would receive.
"""

from __future__ import annotations

import copy
import os
import sys
import threading
from argparse import Namespace

import pytest
from nvflare.private.fed.app.simulator import simulator_runner
from nvflare.private.fed.app.simulator.simulator_runner import SimulatorClientRunner
from nvflare.private.fed.simulator.simulator_const import SimulatorConstants

from brats_fl import nvflare_compat

SITES = ["site-1", "site-2", "site-3"]


class FakeProcess:
    def poll(self):
        return None

    def terminate(self):
        pass

    def wait(self, timeout=None):
        return 0


class RecordingConnection:
    """What one worker receives: its build_ctx's client name, read when it is sent (as pickling would)."""

    def __init__(self):
        self.sent_name = None
        self._replies = iter([True, None])  # stop the run after this task; no END_RUN client

    def send(self, data):
        if isinstance(data, dict):
            self.sent_name = data[SimulatorConstants.BUILD_CTX]["client_name"]

    def recv(self):
        return next(self._replies)


class HoldUntilAllNamed:
    """Stands in for the `copy` module inside simulator_runner: do_one_task deep-copies its deploy arguments between
    writing the name and sending, so each thread waits there until every thread has written its name."""

    def __init__(self, n_threads: int):
        self.barrier = threading.Barrier(n_threads, timeout=10)

    def deepcopy(self, value, memo=None):
        if sys._getframe(1).f_code.co_name == "do_one_task":  # the deploy arguments, name already written
            self.barrier.wait()
        return copy.deepcopy(value, memo)


def names_each_worker_receives(tmp_path, monkeypatch) -> dict[str, str]:
    """Run NVFlare's do_one_task for every site at once, threads held in the window; site -> name its worker got."""
    connections = {}
    monkeypatch.setattr(simulator_runner, "copy", HoldUntilAllNamed(len(SITES)))
    monkeypatch.setattr(simulator_runner.subprocess, "Popen", lambda *a, **k: FakeProcess())
    clients = [Namespace(client_name=s, token="t", cell=None, simulate_running=False) for s in SITES]
    for c in clients:
        c.cell = Namespace(get_root_url_for_child=lambda: "tcp://x", get_internal_listener_url=lambda: "tcp://y")
    for site in SITES:
        for folder in ("startup", "local"):  # what NVFlare's Workspace checks for
            (tmp_path / site / folder).mkdir(parents=True)
    args = Namespace(workspace=str(tmp_path), set=[], log_config=None)
    build_ctx = {"client_name": None, "server_config": []}
    deploy_args = Namespace(workspace="w")
    runner = SimulatorClientRunner(str(tmp_path / "server_custom"), args, clients, {}, deploy_args, build_ctx)

    def connect(self, port, timeout=60.0):
        conn = RecordingConnection()
        connections[threading.current_thread().name] = conn
        return conn

    monkeypatch.setattr(SimulatorClientRunner, "_create_connection", connect)
    errors = []

    def run_task(client):
        try:
            runner.do_one_task(client, len(SITES), None, threading.Lock())
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run_task, args=(c,), name=c.client_name) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert not errors, errors
    return {site: conn.sent_name for site, conn in connections.items()}


@pytest.fixture
def unpatched_runner():
    """NVFlare's SimulatorClientRunner as shipped, before and after the test."""

    def remove_fix():
        if "build_ctx" in SimulatorClientRunner.__dict__:
            delattr(SimulatorClientRunner, "build_ctx")

    remove_fix()
    yield
    remove_fix()


def test_unpatched_nvflare_sends_a_worker_another_sites_name(tmp_path, monkeypatch, unpatched_runner):
    received = names_each_worker_receives(tmp_path, monkeypatch)
    assert set(received) == set(SITES)
    wrong = {site: name for site, name in received.items() if name != site}
    assert wrong, "NVFlare no longer mixes up the names: the workaround in brats_fl/nvflare_compat.py may go"


def test_with_the_fix_every_worker_receives_its_own_sites_name(tmp_path, monkeypatch, unpatched_runner):
    nvflare_compat.give_each_simulator_thread_its_own_build_ctx()
    received = names_each_worker_receives(tmp_path, monkeypatch)
    assert received == {site: site for site in SITES}


def test_the_fix_leaves_the_shared_build_ctx_of_the_simulator_alone(tmp_path, monkeypatch, unpatched_runner):
    nvflare_compat.give_each_simulator_thread_its_own_build_ctx()
    nvflare_compat.give_each_simulator_thread_its_own_build_ctx()  # idempotent
    shared = {"client_name": "site-9", "server_config": ["a"]}
    runner = SimulatorClientRunner("x", Namespace(workspace=str(tmp_path), set=[]), [], {}, None, shared)
    runner.build_ctx["client_name"] = "site-1"
    assert shared["client_name"] == "site-9"
    seen_by_other_thread = {}
    t = threading.Thread(target=lambda: seen_by_other_thread.update(runner.build_ctx))
    t.start()
    t.join()
    assert seen_by_other_thread == shared
    assert runner.build_ctx["client_name"] == "site-1"


def test_a_different_nvflare_version_is_refused_in_one_line(monkeypatch):
    import nvflare

    monkeypatch.setattr(nvflare, "__version__", "2.10.0")
    with pytest.raises(nvflare_compat.NVFlareVersionError, match="2.10.0 is installed .* written for 2.9.0"):
        nvflare_compat.give_each_simulator_thread_its_own_build_ctx()


@pytest.mark.e2e
def test_the_real_simulator_runs_a_job_with_the_race_forced(tiny_federation, tmp_path):
    """A 2-site, 2-round job in NVFlare's simulator, both client threads held inside the window: it completes and
    each site's log carries its own identity (unfixed, site-1's worker takes site-2's name and cannot find
    client.py)."""
    import subprocess

    import job
    from brats_fl.run_options import run_from_argv
    from brats_fl.settings import REPO_DIR

    data_dir, datalist_dir = tiny_federation
    argv = ["--dataset_base_dir", str(data_dir), "--datalist_json_path", str(datalist_dir), "--n_clients", "2"]
    argv += ["--num_rounds", "2", "--roi_size", "32", "32", "24", "--infer_roi_size", "32", "32", "24"]
    argv += ["--init_filters", "8", "--workspace", str(tmp_path / "ws"), "--no_final_eval"]
    run = run_from_argv(argv)
    job.training_recipe(run).export(job_dir=str(tmp_path / "exported"))
    command = [sys.executable, "tests/forced_race_simulator.py", str(tmp_path / "exported" / run.job.job_name)]
    command += ["-w", str(run.job.job_dir), "-c", "site-1,site-2", "-t", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO_DIR)}  # the script lives in tests/; brats_fl is at the root
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO_DIR, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for site, other in (("site-1", "site-2"), ("site-2", "site-1")):
        log = (run.job.job_dir / site / "log.txt").read_text()
        assert f"identity={site}" in log and f"identity={other}" not in log
    assert run.job.best_model.is_file()
