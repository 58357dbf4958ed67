"""A site's own data setting (brats_fl/site_data.py): where it is found, and one clear line for each way it is wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from brats_fl.site_data import DATA_CONFIG_ENV, SiteData, SiteDataError, read_site_data, write_site_configs


@pytest.fixture
def site_folder(tmp_path) -> Path:
    """A site workspace with a dataset folder and a datalist, and a local/brats_data.json naming them relatively."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "site-1.json").write_text("{}")
    (tmp_path / "local").mkdir()
    return tmp_path


def write_setting(path: Path, values) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(values if isinstance(values, str) else json.dumps(values))
    return path


def test_local_setting_resolves_paths_relative_to_the_file(site_folder):
    write_setting(
        site_folder / "local" / "brats_data.json", {"dataset_base_dir": "../data", "datalist": "../data/site-1.json"}
    )
    data = read_site_data("site-1", site_folder, environ={})
    assert data.dataset_base_dir.resolve() == (site_folder / "data").resolve()
    assert data.datalist.resolve() == (site_folder / "data" / "site-1.json").resolve()


def test_environment_variable_wins_and_names_each_site_its_own_file(site_folder, tmp_path):
    write_setting(site_folder / "local" / "brats_data.json", {"dataset_base_dir": "nowhere", "datalist": "nowhere"})
    absolute = {"dataset_base_dir": str(site_folder / "data"), "datalist": str(site_folder / "data" / "site-1.json")}
    write_setting(tmp_path / "settings" / "site-1.json", absolute)
    env = {DATA_CONFIG_ENV: str(tmp_path / "settings" / "{site}.json")}
    assert read_site_data("site-1", site_folder, environ=env) == SiteData(
        site_folder / "data", site_folder / "data" / "site-1.json"
    )
    with pytest.raises(SiteDataError) as e:  # site-2 has no file of its own
        read_site_data("site-2", site_folder, environ=env)
    assert str(e.value) == (
        f"site-2: data setting ({DATA_CONFIG_ENV}={env[DATA_CONFIG_ENV]}) {tmp_path / 'settings' / 'site-2.json'}: "
        "no such file; see docs/deployment.md"
    )


def test_missing_local_setting_says_the_variable_is_unset_too(site_folder):
    with pytest.raises(
        SiteDataError, match=f"local/brats_data.json\\) .*: no such file, and {DATA_CONFIG_ENV} is unset"
    ):
        read_site_data("site-1", site_folder, environ={})


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("{not json", "not a readable JSON file"),
        ([1, 2], 'need {"dataset_base_dir"'),
        ({"dataset_base_dir": "../data"}, 'need {"dataset_base_dir"'),
        ({"dataset_base_dir": "../data", "datalist": 3}, 'need {"dataset_base_dir"'),
        ({"dataset_base_dir": "../nope", "datalist": "../data/site-1.json"}, "is not a folder"),
        ({"dataset_base_dir": "../data", "datalist": "../data/site-9.json"}, "site-9.json does not exist"),
    ],
)
def test_each_wrong_setting_is_one_line_naming_site_file_and_problem(site_folder, content, problem):
    path = write_setting(site_folder / "local" / "brats_data.json", content)
    with pytest.raises(SiteDataError) as e:
        read_site_data("site-1", site_folder, environ={})
    message = str(e.value)
    assert message.startswith(f"site-1: data setting (the site's local/brats_data.json) {path}: ")
    assert problem in message and message.endswith("see docs/deployment.md") and "\n" not in message


def test_written_settings_are_read_back_by_every_site(tmp_path):
    (tmp_path / "data").mkdir()
    configs = {}
    for site in ("site-1", "site-2"):
        (tmp_path / "data" / f"{site}.json").write_text("{}")
        configs[site] = SiteData(tmp_path / "data", tmp_path / "data" / f"{site}.json")
    value = write_site_configs(tmp_path / "settings", configs)
    assert value == str(tmp_path / "settings" / "{site}.json")
    for site, expected in configs.items():
        assert read_site_data(site, tmp_path / "unused", environ={DATA_CONFIG_ENV: value}) == expected
