"""The preprocessed-case cache: same numbers, invalidation, atomic writes, damaged entries rebuilt."""

from __future__ import annotations

import multiprocessing
import os
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import brats_fl.pipeline as bp
from brats_fl.cache import CaseCache, compact


def synthetic_entry(tiny_federation) -> dict:
    data_dir, datalist_dir = tiny_federation
    datalist = bp.read_datalist(datalist_dir / "site-1.json")
    return bp.resolve_entries(datalist["validation"], data_dir)[0]


def preprocess(entry: dict) -> dict:
    return bp.preprocessing_transforms()(dict(entry))


def test_compact_storage_gives_back_exactly_the_same_numbers():
    image = torch.tensor([[-32768.0, 0.0, 1234.0, 32767.0]])
    assert compact(image).dtype == torch.int16 and torch.equal(compact(image).float(), image)
    label = torch.tensor([[0.0, 1.0, 2.0, 4.0]])
    assert compact(label).dtype == torch.uint8 and torch.equal(compact(label).float(), label)
    resampled = torch.tensor([[0.5, 1.25]])  # not integers: kept as they are
    assert compact(resampled).dtype == torch.float32 and torch.equal(compact(resampled), resampled)
    too_big = torch.tensor([[70000.0]])
    assert compact(too_big).dtype == torch.float32


def test_cached_case_equals_the_uncached_one_and_is_compact(tiny_federation, tmp_path):
    entry = synthetic_entry(tiny_federation)
    cache = CaseCache(tmp_path)
    first = cache.get_or_build(entry, preprocess)
    second = cache.get_or_build(entry, preprocess)
    assert (cache.misses, cache.hits) == (1, 1)
    uncached = preprocess(entry)
    assert second["image"].dtype == torch.int16 and second["label"].dtype == torch.uint8  # as stored
    for key in ("image", "label"):
        assert uncached[key].dtype == torch.float32
        assert torch.equal(second[key].float(), uncached[key]) and torch.equal(first[key].float(), uncached[key])
        assert np.allclose(second[key].affine, uncached[key].affine)
    # after the steps every case is float32 again, whichever way it came
    steps = bp.validation_steps()
    assert torch.equal(steps(dict(second))["image"], steps(dict(uncached))["image"])


def test_a_changed_source_file_makes_a_new_entry(tiny_federation, tmp_path):
    entry = synthetic_entry(tiny_federation)
    cache = CaseCache(tmp_path / "cache")
    key = cache.key(entry)
    copy_dir = tmp_path / "copy"
    copy_dir.mkdir()
    copied = {"image": [], "label": str(copy_dir / Path(entry["label"]).name)}
    for src in entry["image"]:
        dst = copy_dir / Path(src).name
        dst.write_bytes(Path(src).read_bytes())
        copied["image"].append(str(dst))
    Path(copied["label"]).write_bytes(Path(entry["label"]).read_bytes())
    key_copy = cache.key(copied)
    assert key_copy != key  # another path is another case
    os.utime(copied["image"][0], ns=(time.time_ns(), time.time_ns() + 10**9))  # the file changed
    assert cache.key(copied) != key_copy


def test_a_damaged_or_truncated_entry_is_rebuilt_not_trusted(tiny_federation, tmp_path):
    entry = synthetic_entry(tiny_federation)
    cache = CaseCache(tmp_path)
    reference = cache.get_or_build(entry, preprocess)
    path = cache.entries()[0]
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)  # bytes overwritten inside the stored arrays
    path.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="damaged"):
        again = cache.get_or_build(entry, preprocess)
    assert cache.rebuilt == 1 and torch.equal(again["image"], reference["image"])
    path.write_bytes(path.read_bytes()[:1000])  # a half-written file
    with pytest.warns(UserWarning, match="damaged"):
        again = cache.get_or_build(entry, preprocess)
    assert cache.rebuilt == 2 and torch.equal(again["label"], reference["label"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache.get_or_build(entry, preprocess)  # rebuilt entries are whole again


def _fill(args) -> int:
    cache_dir, entry = args
    cache = CaseCache(cache_dir)
    item = cache.get_or_build(entry, preprocess)
    return int(item["label"].sum())


def test_two_processes_filling_the_same_case_at_once_leave_one_whole_entry(tiny_federation, tmp_path):
    entry = synthetic_entry(tiny_federation)
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        sums = pool.map(_fill, [(str(tmp_path), entry)] * 4)
    assert len(set(sums)) == 1
    assert len(CaseCache(tmp_path).entries()) == 1
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # no temporary file left behind
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert int(CaseCache(tmp_path).get_or_build(entry, preprocess)["label"].sum()) == sums[0]


def test_temporaries_of_a_killed_run_are_never_read_and_are_cleaned_up(tiny_federation, tmp_path):
    entry = synthetic_entry(tiny_federation)
    cache = CaseCache(tmp_path)
    key = cache.key(entry)
    orphan = tmp_path / f"{key}.pt.tmp-99999-1"
    orphan.write_bytes(b"half a file")
    old = time.time() - 7200
    os.utime(orphan, (old, old))
    item = cache.get_or_build(entry, preprocess)  # the orphan is not mistaken for the entry
    assert cache.misses == 1 and item["image"].shape[0] == 4
    assert cache.remove_stale_temporaries() == 1 and not orphan.exists()
