"""End-to-end: the same job in an NVFlare POC deployment (server and 2 sites as separate processes on this machine),
each site finding its data only through its own data setting, with SVT on; then nothing of the POC is left.

A site whose setting is wrong fails the job at once with one line naming the site, the setting and the path."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from test_e2e import tiny_args

from brats_fl.job_results import JobPaths, read_round_metrics
from brats_fl.privacy import report as privacy_report
from brats_fl.settings import EXIT_FAILED, REPO_DIR, TrainingSettings
from brats_fl.site_data import DATA_CONFIG_ENV
from result_stat.tb_events import read_site_scalars

pytestmark = pytest.mark.e2e
POC_PORTS = (8002, 8003)  # NVFlare 2.9's POC defaults: federated learning and admin


def hospital(data_dir: Path, folder: Path, site: str, drop_training_cases: int = 0) -> dict:
    """A private copy of the tiny data for one site, and that site's data setting."""
    shutil.copytree(data_dir, folder)
    datalist = folder / "datalist" / f"{site}.json"
    content = json.loads(datalist.read_text())
    content["training"] = content["training"][: len(content["training"]) - drop_training_cases]
    datalist.write_text(json.dumps(content))
    return {"dataset_base_dir": str(folder), "datalist": str(datalist)}


def poc_processes(poc_dir: Path) -> list[psutil.Process]:
    """NVFlare server, client and job processes, of this POC or of any other POC (not simulator processes, which other
    tests or jobs on the machine may be running)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        words = " ".join(p.info["cmdline"] or [])
        deployed = "nvflare.private.fed.app" in words and ".simulator." not in words
        if "nvflare" in words and (str(poc_dir) in words or deployed):
            found.append(p)
    return found


def listening(ports) -> list[int]:
    return sorted(
        {c.laddr.port for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port in ports}
    )


def test_poc_job_with_site_local_data_settings(tiny_federation, tmp_path):
    data_dir, datalist_dir = tiny_federation
    if listening(POC_PORTS) or poc_processes(tmp_path / "poc"):
        pytest.skip(f"a POC (or something else) already listens on ports {POC_PORTS} here")
    settings_dir = tmp_path / "site_settings"
    settings_dir.mkdir()
    (settings_dir / "site-1.json").write_text(json.dumps(hospital(data_dir, tmp_path / "hospital_a", "site-1")))
    site_2 = hospital(data_dir, tmp_path / "hospital_b", "site-2", drop_training_cases=1)
    (settings_dir / "site-2.json").write_text(json.dumps({**site_2, "dataset_base_dir": str(tmp_path / "nowhere")}))
    env = {
        **os.environ,
        DATA_CONFIG_ENV: str(settings_dir / "{site}.json"),
        "NVFLARE_POC_WORKSPACE": str(tmp_path / "poc"),
    }
    argv = tiny_args(tmp_path / "unused", tmp_path / "unused", tmp_path / "ws", "--n_clients", "2", "--enable_dp")
    argv = [a for a in argv if a not in ("--dataset_base_dir", "--datalist_json_path", str(tmp_path / "unused"))]
    command = [sys.executable, "job.py", *argv, "--env", "poc"]

    failed = subprocess.run(command, capture_output=True, text=True, cwd=REPO_DIR, env=env, timeout=600)
    assert failed.returncode == EXIT_FAILED, failed.stdout[-2000:] + failed.stderr[-2000:]
    assert (
        f"site-2: data setting ({DATA_CONFIG_ENV}={settings_dir}/{{site}}.json) {settings_dir}/site-2.json: "
        f"dataset_base_dir {tmp_path / 'nowhere'} is not a folder"
    ) in failed.stderr

    (settings_dir / "site-2.json").write_text(json.dumps(site_2))
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO_DIR, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Job brats18_2_dp finished: 2 rounds" in done.stdout
    paths = JobPaths(tmp_path / "ws", "brats18_2_dp")
    assert paths.best_model.is_file() and paths.last_global_model.is_file()
    assert [r.round for r in read_round_metrics(paths.round_metrics)] == [0, 1]
    privacy_report.check_report(privacy_report.load_report(paths.privacy_report), ["site-1", "site-2"], 2)
    shipped = TrainingSettings.read(paths.settings_file)
    assert shipped.dataset_base_dir is None and shipped.datalist_json_path is None  # the job carries no data path
    curves = read_site_scalars(paths.tb_events)
    assert all(curves[site]["privacy_epsilon"][-1][1] > 0 for site in ("site-1", "site-2"))
    # each site trained on its own folder's datalist (hospital_b lists one training case fewer): FedAvg's weights,
    # the sites' local steps, say so; every site validates its own cases in a deployment
    for line in paths.round_metrics.read_text().splitlines():
        assert {s["name"]: s["weight"] for s in json.loads(line)["sites"]} == {"site-1": 4.0, "site-2": 3.0}
    assert not poc_processes(tmp_path / "poc")
    assert listening(POC_PORTS) == []
    assert not (tmp_path / "poc").exists()  # NVFlare removed the POC workspace after the results were copied out
