"""Where a job runs (--env sim|poc|prod), and everything that differs between the three, decided here.

- ``sim``: NVFlare's simulator runs every site on this machine; the job carries the data paths.
- ``poc``: NVFlare starts a POC deployment on this machine (server and sites as separate processes over the network)
  and removes it afterwards. The job carries no data path: job.py plays each hospital's part and writes every site's
  own data setting next to the job folder, unless ``BRATS_DATA_CONFIG`` already names them.
- ``prod``: the job is submitted to a running provisioned project through an admin's startup kit; each hospital's
  site reads its own data setting (brats_fl/site_data.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from brats_fl.job_results import JobPaths
from brats_fl.settings import CACHE_FOLDER, InputError, TrainingSettings, site_names
from brats_fl.site_data import DATA_CONFIG_ENV


@dataclass(frozen=True)
class Environment:
    """The simulator; Poc and Prod below change what differs."""

    name: str = "sim"
    startup_kit: Path | None = None
    site_data_config: str | None = None  # poc: the BRATS_DATA_CONFIG value the sites are started with

    sends_to_named_sites = False  # the simulator runs exactly site-1 ... site-N anyway

    @property
    def sites_read_own_data(self) -> bool:
        """Whether each site reads its own data setting, the job naming no data (and the paper's defaults apply)."""
        return False

    def default_cache_dir(self, workspace: Path) -> str:
        """The simulator's sites share one cache on this machine; a deployed site keeps its own (a path of the
        submitter's machine means nothing there, so the setting is relative to each site's workspace)."""
        return str((workspace / CACHE_FOLDER).resolve())

    def checkpoint_for_recipe(self, path: Path) -> Path:
        """Absolute in the simulator (the server reads it where it is); relative in a deployment, which makes
        NVFlare carry the file inside the job to the server."""
        return Path(path).resolve()

    def with_site_data(self, settings: TrainingSettings, n_clients: int, job: JobPaths):
        """(this environment, the job's settings) once the data is resolved: the simulator's sites read the job's."""
        return self, settings

    def check_existing_job_data(self, settings: TrainingSettings, job: JobPaths, what: str) -> Environment:
        """A job whose sites read their own data settings (it ran deployed) cannot run in the simulator."""
        if settings.dataset_base_dir is None:
            raise InputError(
                f"{what}: the job's sites read their own data settings (it ran with --env poc or prod): give "
                "--env poc, or --env prod --startup_kit <admin kit>"
            )
        return self

    def run(self, recipe, paths: JobPaths, n_clients: int, threads: int, gpu: str | None):
        """Run a recipe; the server's outputs land in paths.server_job_dir. Returns a runner.RunOutcome."""
        from brats_fl.runner import run_in_simulator

        return run_in_simulator(recipe, paths, site_names(n_clients), threads, gpu)


@dataclass(frozen=True)
class Poc(Environment):
    name: str = "poc"
    sends_to_named_sites = True  # a deployment may have more sites than the job uses

    @property
    def sites_read_own_data(self) -> bool:
        return bool(os.environ.get(DATA_CONFIG_ENV))

    def default_cache_dir(self, workspace: Path) -> str:
        return CACHE_FOLDER

    def checkpoint_for_recipe(self, path: Path) -> Path:
        return Path(os.path.relpath(Path(path).resolve()))

    def with_site_data(self, settings: TrainingSettings, n_clients: int, job: JobPaths):
        """Play each hospital's part: write every site's own data setting (brats_fl/site_data.py) next to the job
        folder; the job then carries no data path, as in a real deployment."""
        from brats_fl.site_data import SiteData, write_site_configs
        from dataset_brats18.datalist import site_datalist_names

        datalists = Path(settings.datalist_json_path)
        configs = {
            site: SiteData(Path(settings.dataset_base_dir), datalists / f"{name}.json")
            for site, name in zip(site_names(n_clients), site_datalist_names(n_clients))
        }
        value = write_site_configs(site_settings_dir(job), configs)
        print(f"POC: each site reads its data setting from {DATA_CONFIG_ENV}={value}", flush=True)
        return replace(self, site_data_config=value), replace(settings, dataset_base_dir=None, datalist_json_path=None)

    def check_existing_job_data(self, settings: TrainingSettings, job: JobPaths, what: str) -> Environment:
        """A POC job resumed or evaluated reads the data settings job.py wrote for its sites when it started, unless
        BRATS_DATA_CONFIG is set."""
        if settings.dataset_base_dir is not None or os.environ.get(DATA_CONFIG_ENV):
            return self
        folder = site_settings_dir(job)
        if not folder.is_dir():
            raise InputError(
                f"--env poc: no site data settings in {folder}: set {DATA_CONFIG_ENV} (docs/deployment.md)"
            )
        return replace(self, site_data_config=str(folder / "{site}.json"))

    def run(self, recipe, paths: JobPaths, n_clients: int, threads: int, gpu: str | None):
        from brats_fl.runner import run_deployed

        if self.site_data_config:
            os.environ[DATA_CONFIG_ENV] = self.site_data_config  # the POC's sites are started from this process
        return run_deployed(recipe, paths, n_clients, gpu, self.name, None)


@dataclass(frozen=True)
class Prod(Poc):
    name: str = "prod"

    @property
    def sites_read_own_data(self) -> bool:
        return True

    def check_existing_job_data(self, settings: TrainingSettings, job: JobPaths, what: str) -> Environment:
        return self

    def run(self, recipe, paths: JobPaths, n_clients: int, threads: int, gpu: str | None):
        from brats_fl.runner import run_deployed

        return run_deployed(recipe, paths, n_clients, gpu, self.name, self.startup_kit)


def site_settings_dir(job: JobPaths) -> Path:
    """Where job.py writes each POC site's data setting, next to the job folder."""
    return job.workspace_root / f"{job.job_name}_site_data"


def environment(name: str, startup_kit: str | None) -> Environment:
    """The environment --env names, its flags checked (InputError)."""
    if name != "prod":
        if startup_kit:
            raise InputError(f"--startup_kit is for --env prod (got --env {name})")
        return Poc() if name == "poc" else Environment()
    check_startup_kit(startup_kit)
    return Prod(startup_kit=Path(startup_kit))


def check_startup_kit(kit: str | None) -> None:
    """--env prod logs in with an admin's startup kit: its startup/fed_admin.json names the server and the admin."""
    from brats_fl.nvflare_compat import ADMIN_CONFIG, admin_username

    if not kit:
        raise InputError(f"--env prod needs --startup_kit, the admin's startup kit (the folder holding {ADMIN_CONFIG})")
    try:
        admin_username(Path(kit))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(
            f"--startup_kit {kit}: not an admin startup kit ({ADMIN_CONFIG}: {type(e).__name__}: {e}); give the "
            "folder nvflare provision wrote for the admin"
        ) from None
