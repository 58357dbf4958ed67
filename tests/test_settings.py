"""The one source of settings: defaults, demo overrides, checks, and the JSON document the sites read."""

from __future__ import annotations

import json

import pytest

from brats_fl import settings as st


@pytest.mark.parametrize("roi", [[224, 224, 144], [8, 8, 8]])
def test_valid_roi_sizes_accepted(roi):
    assert st.roi_size_problem(roi) is None


@pytest.mark.parametrize("roi", [[224, 224, 150], [0, 8, 8], [8, 8]])
def test_roi_sizes_segresnet_cannot_take_are_rejected(roi):
    assert "divisible by 8" in st.roi_size_problem(roi, "--infer_roi_size")
    assert st.roi_size_problem(roi, "--infer_roi_size").startswith("--infer_roi_size ")


def test_paper_defaults_and_demo_overrides():
    paper = st.TrainingSettings()
    assert (paper.num_rounds, paper.learning_rate, paper.roi_size, paper.infer_roi_size, paper.init_filters) == (
        600,
        1e-4,
        (224, 224, 144),
        (240, 240, 160),
        16,
    )
    demo = st.demo_settings()
    assert (demo.num_rounds, demo.learning_rate, demo.roi_size, demo.infer_roi_size, demo.init_filters) == (
        12,
        3e-3,
        (32, 32, 32),
        (64, 64, 48),
        8,
    )
    assert st.default("roi_size", demo=True) == (32, 32, 32) and st.default("roi_size") == (224, 224, 144)
    assert st.describe_default("num_rounds") == "(default: 600; demo: 12)"
    assert st.describe_default("seed") == "(default: 0)"


def test_json_round_trip_keeps_every_value(tmp_path):
    original = st.TrainingSettings(
        num_rounds=3,
        roi_size=[32, 32, 24],
        dp_mechanism="dpsgd",
        dp_delta=1e-3,
        dataset_base_dir="/data",
        datalist_json_path="/data/dl",
    )
    path = original.write(tmp_path / st.SETTINGS_FILE)
    again = st.TrainingSettings.read(path)
    assert again == original and again.roi_size == (32, 32, 24)


def test_unknown_or_broken_settings_files_are_refused(tmp_path):
    (tmp_path / "new.json").write_text(json.dumps({"num_rounds": 3, "warp_drive": True}))
    with pytest.raises(st.SettingsError, match=r"unknown settings \['warp_drive'\]"):
        st.TrainingSettings.read(tmp_path / "new.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(st.SettingsError, match="bad.json"):
        st.TrainingSettings.read(tmp_path / "bad.json")


@pytest.mark.parametrize(
    "values, flag",
    [
        ({"num_rounds": 1}, "--num_rounds 1"),
        ({"learning_rate": 0.0}, "--learning_rate 0.0"),
        ({"init_filters": 12}, "--init_filters 12"),
        ({"cache_dataset": 1.5}, "--cache_dataset 1.5"),
        ({"roi_size": (224, 224, 150)}, "--roi_size 224 224 150"),
        ({"dp_mechanism": "svt", "dp_fraction": 0.0}, "--dp_fraction 0.0"),
        ({"dp_mechanism": "svt", "dp_gamma": -1.0}, "--dp_gamma -1.0"),
    ],
)
def test_check_names_the_flag(values, flag):
    with pytest.raises(st.SettingsError) as caught:
        st.TrainingSettings(**values).check()
    assert str(caught.value).startswith(flag)


def test_svt_values_are_only_checked_when_svt_is_on():
    st.TrainingSettings(dp_fraction=0.0).check()


def test_default_job_names():
    assert st.PAPER_JOB_NAMES == ("brats18_1", "brats18_4", "brats18_4_dp", "brats18_4_dpsgd")
