"""Where a site finds its data in a real deployment: a setting of the site itself, never a path in the job.

In NVFlare's simulator the job carries the data paths (every site runs on the submitter's machine). In a POC or a
provisioned deployment each hospital keeps its own: a small JSON file,

    {"dataset_base_dir": "/data/brats18", "datalist": "/data/brats18/site-1.json"}

(relative paths are relative to the file), found by the site's client in this order:

1. the environment variable ``BRATS_DATA_CONFIG`` of the client process: the file's path, in which ``{site}`` is
   replaced by the site's name (one machine running several POC sites can point each at its own file);
2. ``local/brats_data.json`` in the site's workspace (the folder of its startup kit; ``local/`` is where NVFlare keeps
   a site's own configuration, such as ``resources.json``).

A missing or wrong setting stops the site with one line that names the site, the setting and the path.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

DATA_CONFIG_ENV = "BRATS_DATA_CONFIG"
LOCAL_CONFIG_FILE = "brats_data.json"  # in the site workspace's local/ folder
SITE_PLACEHOLDER = "{site}"
HELP = "see docs/deployment.md"


class SiteDataError(ValueError):
    """The site's data setting is missing or wrong; the message names the site, the setting and the path."""


@dataclass(frozen=True)
class SiteData:
    dataset_base_dir: Path
    datalist: Path  # the site's own datalist JSON (training and validation cases)

    def to_json(self) -> str:
        return json.dumps({"dataset_base_dir": str(self.dataset_base_dir), "datalist": str(self.datalist)}, indent=2)


def config_path(site: str, site_workspace: Path, environ: Mapping[str, str] = os.environ) -> tuple[Path, str]:
    """(the site's data-setting file, how it was found, for messages)."""
    if environ.get(DATA_CONFIG_ENV):
        value = environ[DATA_CONFIG_ENV]
        return Path(value.replace(SITE_PLACEHOLDER, site)), f"{DATA_CONFIG_ENV}={value}"
    return site_workspace / "local" / LOCAL_CONFIG_FILE, f"the site's local/{LOCAL_CONFIG_FILE}"


def read_site_data(site: str, site_workspace: Path, environ: Mapping[str, str] = os.environ) -> SiteData:
    """The site's dataset root and datalist, checked: the file, its two entries, and that they exist."""
    path, source = config_path(site, site_workspace, environ)

    def fail(problem: str) -> SiteDataError:
        return SiteDataError(f"{site}: data setting ({source}) {path}: {problem}; {HELP}")

    if not path.is_file():
        raise fail(
            "no such file" if source.startswith(DATA_CONFIG_ENV) else f"no such file, and {DATA_CONFIG_ENV} is unset"
        )
    try:
        values = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise fail(f"not a readable JSON file ({e})") from None
    if not isinstance(values, dict) or not all(
        isinstance(values.get(k), str) for k in ("dataset_base_dir", "datalist")
    ):
        raise fail('need {"dataset_base_dir": "<folder>", "datalist": "<the site\'s datalist JSON>"}')
    data = SiteData(*(path.parent / Path(values[k]).expanduser() for k in ("dataset_base_dir", "datalist")))
    if not data.dataset_base_dir.is_dir():
        raise fail(f"dataset_base_dir {data.dataset_base_dir} is not a folder")
    if not data.datalist.is_file():
        raise fail(f"datalist {data.datalist} does not exist")
    return data


def write_site_configs(folder: Path, configs: Mapping[str, SiteData]) -> str:
    """Write one data-setting file per site into folder; returns the BRATS_DATA_CONFIG value that points every site
    at its own (what job.py does for a POC run on one machine, playing each hospital's part)."""
    folder.mkdir(parents=True, exist_ok=True)
    for site, data in configs.items():
        (folder / f"{site}.json").write_text(data.to_json() + "\n")
    return str(folder / f"{SITE_PLACEHOLDER}.json")
