"""A disk cache of preprocessed cases, shared by every round, every site on a machine and the evaluation.

Loading a real BraTS case (five .nii.gz files, RAS orientation, 1 mm spacing) takes about 2 s of CPU; the result, kept
in the files' own compact types (int16 image, uint8 label map), loads in a small fraction of that. This module stores
the output of the deterministic part of the pipeline (:func:`brats_fl.pipeline.preprocessing_transforms`) once per
case and hands it back unchanged: the model sees the same numbers with or without the cache.

MONAI's ``PersistentDataset`` does the same job but does not meet this project's rules: its entries are keyed by the
file paths only (a changed source file is not noticed), it writes through the system temp folder and ``shutil.move``
(a copy, not an atomic rename, when the cache is on another file system), it reraises on a truncated entry instead
of rebuilding it, and it stores float32 (143 MB per full-size case instead of about 80 MB).

Rules, each covered by a test:

- an entry's name is a hash of every source file's path, size and modification time, and of the preprocessing it
  holds (:data:`PREPROCESSING_VERSION`): a changed file or a changed preprocessing makes a new entry;
- entries are written to a temporary file in the cache folder and renamed into place, so two processes filling the
  same case at once each write a whole file, and a killed run leaves at most a temporary file nobody reads;
- every entry carries a checksum of its arrays; an entry that does not load or does not match is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

# Bump when preprocessing_transforms changes what it produces: every existing entry then becomes unused.
PREPROCESSING_VERSION = "ras-1mm-v1"
ENTRY_SUFFIX = ".pt"
TEMP_MARKER = ".tmp-"
STALE_TEMP_SECONDS = 3600  # a temporary file this old belongs to a run that died


class CaseCache:
    """Preprocessed cases on disk, keyed by their source files and the preprocessing."""

    def __init__(self, cache_dir: str | Path) -> None:
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.hits = self.misses = self.rebuilt = 0

    # -- keys ------------------------------------------------------------------------------------------------------
    def key(self, entry: dict, variant: str = "") -> str:
        """Hash of the preprocessing (its version and variant, e.g. the label convention it checked) and of every
        source file's absolute path, size and modification time."""
        files = [*entry["image"], entry["label"]]
        stats = []
        for name in files:
            st = os.stat(name)
            stats.append([str(Path(name).resolve()), st.st_size, st.st_mtime_ns])
        blob = json.dumps({"preprocessing": [PREPROCESSING_VERSION, variant], "files": stats}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def path_of(self, key: str) -> Path:
        return self.cache_dir / f"{key}{ENTRY_SUFFIX}"

    # -- reading and writing ---------------------------------------------------------------------------------------
    def get_or_build(self, entry: dict, build: Callable[[dict], dict], variant: str = "") -> dict:
        """The preprocessed case: from the cache when a valid entry exists, else built, stored and returned. A cached
        case comes back in the compact types it is stored in (int16 / uint8 when they hold every value exactly)."""
        path = self.path_of(self.key(entry, variant))
        if path.is_file():
            item = self._load(path)
            if item is not None:
                self.hits += 1
                return item
            self.rebuilt += 1
        self.misses += 1
        item = build(entry)
        self._store(path, item)
        return item

    def _load(self, path: Path) -> dict | None:
        """The entry's arrays (MetaTensors in their stored types), or None (with a warning) if it is damaged."""
        try:
            stored = torch.load(path, map_location="cpu", weights_only=False)  # our own files: MetaTensor pickles
            arrays = {k: stored[k] for k in ("image", "label")}
            if stored["checksum"] != checksum(arrays):
                raise ValueError("checksum mismatch")
        except Exception as e:  # truncated zip, unpickling error, missing key, wrong checksum: rebuild
            warnings.warn(f"cache entry {path} is damaged ({type(e).__name__}: {e}); rebuilding it", stacklevel=2)
            return None
        return {**stored["rest"], **{k: portable_trace(v) for k, v in arrays.items()}}

    def _store(self, path: Path, item: dict) -> None:
        arrays = {k: compact(item[k]) for k in ("image", "label")}
        rest = {k: v for k, v in item.items() if k not in arrays}
        tmp = path.with_name(f"{path.name}{TEMP_MARKER}{os.getpid()}-{time.monotonic_ns()}")
        try:
            torch.save({**arrays, "rest": rest, "checksum": checksum(arrays)}, tmp)
            os.replace(tmp, path)  # atomic within one folder: readers see the old state or the whole new file
        finally:
            tmp.unlink(missing_ok=True)

    # -- housekeeping ----------------------------------------------------------------------------------------------
    def entries(self) -> list[Path]:
        return sorted(self.cache_dir.glob(f"*{ENTRY_SUFFIX}"))

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.entries())

    def remove_stale_temporaries(self, older_than: float = STALE_TEMP_SECONDS) -> int:
        """Delete temporary files left by runs that died while writing; returns how many."""
        now, removed = time.time(), 0
        for tmp in self.cache_dir.glob(f"*{TEMP_MARKER}*"):
            try:
                if now - tmp.stat().st_mtime > older_than:
                    tmp.unlink()
                    removed += 1
            except FileNotFoundError:
                pass
        return removed

    def describe(self) -> str:
        return f"{self.cache_dir}: {len(self.entries())} case(s), {self.size_bytes() / 1e9:.2f} GB"


# ---------------------------------------------------------------------------------------------------------------
# Compact storage that gives back the same numbers
# ---------------------------------------------------------------------------------------------------------------
_COMPACT_TYPES = (torch.uint8, torch.int16)


def compact(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor in the smallest of uint8 / int16 that holds every value exactly, else unchanged (e.g. a volume
    resampled to 1 mm, whose values are no longer integers)."""
    for dtype in _COMPACT_TYPES:
        info = torch.iinfo(dtype)
        small = tensor.to(dtype)
        if (
            float(tensor.min()) >= info.min
            and float(tensor.max()) <= info.max
            and torch.equal(small.to(tensor.dtype), tensor)
        ):
            return small
    return tensor


def portable_trace(tensor: torch.Tensor) -> torch.Tensor:
    """Let the transforms of this process invert a MetaTensor preprocessed by another: MONAI matches a recorded
    transform to the instance that applied it by id() unless the recorded id says 'none'."""
    from monai.utils import TraceKeys

    for operation in getattr(tensor, "applied_operations", []):
        operation[TraceKeys.ID] = TraceKeys.NONE
    return tensor


def checksum(arrays: dict[str, torch.Tensor]) -> int:
    """CRC-32 over the arrays' bytes, in key order."""
    crc = 0
    for key in sorted(arrays):
        crc = zlib.crc32(np.ascontiguousarray(arrays[key].detach().cpu().numpy()).data, crc)
    return crc
