"""The exported job must rebuild, on the server, exactly the model the clients train."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import job
from brats_fl import cli
from brats_fl.environments import Environment, Prod
from brats_fl.job_results import JobPaths
from brats_fl.run_options import RunOptions, new_job_name
from brats_fl.settings import SETTINGS_FILE, TrainingSettings
from model import BratsSegResNet, count_parameters

PAPER_PARAMETER_COUNT = 4_702_227


def export_job(tmp_path: Path, *flags: str, deployed: bool = False) -> Path:
    """Export the job; returns its server app folder. deployed: as job.py builds it for --env poc/prod."""
    args = cli.build_parser().parse_args(["--workspace", str(tmp_path / "ws"), *flags])
    name = new_job_name(args)
    env = Prod(startup_kit=tmp_path / "kit") if deployed else Environment()
    settings = cli.settings_from_flags(args, demo=False)
    run = RunOptions(settings, args.n_clients, JobPaths(tmp_path / "ws", name), env, threads=args.n_clients)
    job.training_recipe(run).export(job_dir=str(tmp_path / "exported"))
    return tmp_path / "exported" / name / ("app_server" if deployed else "app")


def rebuild_server_model(app_dir: Path) -> torch.nn.Module:
    """Instantiate the persistor's model from the exported config and custom code, as the server would."""
    config = json.loads((app_dir / "config" / "config_fed_server.json").read_text())
    persistor = next(c for c in config["components"] if c["id"] == "persistor")
    module_name, class_name = persistor["args"]["model"]["path"].rsplit(".", 1)
    spec = importlib.util.spec_from_file_location(f"exported_{module_name}", app_dir / "custom" / f"{module_name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, class_name)(**persistor["args"]["model"]["args"])


def test_default_model_has_the_papers_parameter_count():
    assert count_parameters(BratsSegResNet()) == PAPER_PARAMETER_COUNT


@pytest.mark.parametrize("init_filters", [16, 8])
def test_exported_job_rebuilds_a_3_output_model_of_the_same_size(tmp_path, init_filters):
    app_dir = export_job(tmp_path, "--init_filters", str(init_filters))
    server_model = rebuild_server_model(app_dir)
    client_model = BratsSegResNet(init_filters=init_filters)
    assert count_parameters(server_model) == count_parameters(client_model)
    if init_filters == 16:
        assert count_parameters(server_model) == PAPER_PARAMETER_COUNT
    assert server_model.state_dict().keys() == client_model.state_dict().keys()
    with torch.no_grad():
        assert tuple(server_model.eval()(torch.zeros(1, 4, 16, 16, 16)).shape) == (1, 3, 16, 16, 16)


def test_server_rebuilds_the_same_seeded_initial_weights(tmp_path):
    app_dir = export_job(tmp_path, "--seed", "7", "--init_filters", "8")
    server_model = rebuild_server_model(app_dir)
    torch.manual_seed(123)  # the caller's random state must not matter, nor be changed
    state_before = torch.random.get_rng_state()
    same_seed = BratsSegResNet(init_filters=8, init_seed=7)
    assert torch.equal(torch.random.get_rng_state(), state_before)
    other_seed = BratsSegResNet(init_filters=8, init_seed=8)
    for key, value in server_model.state_dict().items():
        assert torch.equal(value, same_seed.state_dict()[key]), key
    assert any(not torch.equal(v, other_seed.state_dict()[k]) for k, v in server_model.state_dict().items())


def test_exported_client_app_carries_the_package_and_its_settings(tmp_path):
    app_dir = export_job(tmp_path, "--learning_rate", "0.003")
    custom = app_dir / "custom"
    assert {p.name for p in custom.iterdir()} == {"client.py", "model.py", "brats_fl", SETTINGS_FILE}
    assert (custom / "brats_fl" / "pipeline.py").is_file() and (custom / "brats_fl" / "privacy" / "dpsgd.py").is_file()
    assert not list(custom.rglob("__pycache__"))
    assert TrainingSettings.read(custom / SETTINGS_FILE).learning_rate == 0.003
    config = json.loads((app_dir / "config" / "config_fed_client.json").read_text())
    scripts = [e["executor"]["args"].get("task_script_path") for e in config["executors"]]
    assert scripts == ["client.py"]  # relative: the exported job runs on a machine without this repository


@pytest.mark.parametrize("n_clients", [1, 3])
def test_deployed_job_goes_to_site_1_to_n_only(tmp_path, n_clients):
    """A deployment may have more hospitals than the job uses: the centralised job runs at site-1, not anywhere."""
    job_dir = export_job(tmp_path, "--n_clients", str(n_clients), deployed=True).parent
    deploy_map = json.loads((job_dir / "meta.json").read_text())["deploy_map"]
    sites = [f"site-{i}" for i in range(1, n_clients + 1)]
    assert deploy_map == {"app_server": ["server"], **{f"app_{s}": [s] for s in sites}}
    first = (job_dir / "app_site-1" / "config" / "config_fed_client.json").read_text()
    for site in sites:  # every site gets the same app
        assert (job_dir / f"app_{site}" / "config" / "config_fed_client.json").read_text() == first
        assert (job_dir / f"app_{site}" / "custom" / SETTINGS_FILE).is_file()
