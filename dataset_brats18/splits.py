"""Split strategies, as pure functions of case ids: no files are read here, so every rule is unit-tested directly.

Randomness never comes from a library generator: a case's place in a seeded order is the SHA-256 of
``"<seed>:<case_id>"``. That order is the same on every machine and every Python/NumPy version, so the same input
and seed always give byte-identical datalists.
"""

from __future__ import annotations

import csv
import hashlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dataset_brats18.datalist import DatalistError

VALIDATION = "validation"


def seeded_order(case_ids: Iterable[str], seed: int) -> list[str]:
    """The case ids in a pseudo-random order fixed by seed (a stable hash, not a library RNG)."""
    return sorted(case_ids, key=lambda cid: (hashlib.sha256(f"{seed}:{cid}".encode()).hexdigest(), cid))


def equal_sizes(n_items: int, n_parts: int) -> list[int]:
    """Part sizes as equal as possible, larger parts first: equal_sizes(10, 4) == [3, 3, 2, 2]."""
    if n_parts < 1:
        raise ValueError(f"need at least 1 part, got {n_parts}")
    base, extra = divmod(n_items, n_parts)
    return [base + (1 if i < extra else 0) for i in range(n_parts)]


def random_split(case_ids: Sequence[str], n_sites: int, seed: int) -> list[list[str]]:
    """IID split: seeded shuffle, then consecutive chunks of equal_sizes; each site's ids sorted."""
    order = seeded_order(case_ids, seed)
    sites, start = [], 0
    for size in equal_sizes(len(order), n_sites):
        sites.append(sorted(order[start : start + size]))
        start += size
    return sites


def group_institutions(counts: Mapping[str, int], n_sites: int) -> list[list[str]]:
    """Deal whole institutions to n_sites so that site sizes are as balanced as possible (greedy).

    Largest institution first (ties by name), each into the site with the fewest cases so far (ties: lowest site
    number). Deterministic; the classic longest-processing-time rule, within 4/3 of the best possible maximum.
    """
    if n_sites < 1:
        raise ValueError(f"need at least 1 site, got {n_sites}")
    if len(counts) < n_sites:
        raise ValueError(f"{len(counts)} institution(s) cannot fill {n_sites} sites")
    sizes = [0] * n_sites
    groups: list[list[str]] = [[] for _ in range(n_sites)]
    for institution in sorted(counts, key=lambda i: (-counts[i], i)):
        target = min(range(n_sites), key=lambda s: (sizes[s], s))
        groups[target].append(institution)
        sizes[target] += counts[institution]
    return groups


def institution_split(institution_of: Mapping[str, str], n_sites: int) -> list[list[str]]:
    """Non-IID split: every institution's cases go to one site; each site's ids sorted."""
    counts = Counter(institution_of.values())
    groups = group_institutions(counts, n_sites)
    return [sorted(cid for cid, inst in institution_of.items() if inst in group) for group in groups]


def validation_count(n_cases: int, fraction: float) -> int:
    """round(fraction * n), but at least 1 and leaving at least 1 training case."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
    if n_cases < 2:
        raise ValueError(f"{n_cases} case(s) cannot give both a training and a validation case")
    return min(max(1, round(fraction * n_cases)), n_cases - 1)


def take_validation(case_ids: Sequence[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(training, validation), both sorted; validation is the first validation_count ids of the seeded order."""
    order = seeded_order(case_ids, seed)
    n_val = validation_count(len(order), fraction)
    return sorted(order[n_val:]), sorted(order[:n_val])


def per_site_validation(
    sites: Sequence[Sequence[str]], fraction: float, seed: int
) -> tuple[list[list[str]], list[list[str]]]:
    """Hold out a validation part inside each site: ([training per site], [validation per site])."""
    training, validation = [], []
    for i, site in enumerate(sites):
        try:
            train, val = take_validation(site, fraction, seed)
        except ValueError as e:
            raise ValueError(f"site-{i + 1}: {e}") from None
        training.append(train)
        validation.append(val)
    return training, validation


@dataclass(frozen=True)
class SplitRow:
    case_id: str
    grade: str | None
    split: str  # site-1 ... site-N or validation


def read_split_csv(path: str | Path) -> list[SplitRow]:
    """A split CSV with columns case_id,grade,split (the paper's brats18_paper_split.csv format)."""
    rows = _read_csv(path, required=("case_id", "split"))
    out = [SplitRow(r["case_id"].strip(), (r.get("grade") or "").strip() or None, r["split"].strip()) for r in rows]
    bad = sorted({r.split for r in out if r.split != VALIDATION and not _is_site_name(r.split)})
    if bad:
        raise DatalistError(f"{path}: split values {bad} are neither site-<n> nor {VALIDATION}")
    ids = Counter(r.case_id for r in out)
    repeated = sorted(cid for cid, n in ids.items() if n > 1)
    if repeated:
        raise DatalistError(f"{path}: case(s) listed more than once: {', '.join(repeated[:3])}")
    return out


def read_case_id_csv(path: str | Path) -> list[str]:
    """Validation case ids from a CSV with a case_id column; with a split column, only its 'validation' rows."""
    rows = _read_csv(path, required=("case_id",))
    if "split" in rows[0]:
        rows = [r for r in rows if (r.get("split") or "").strip() == VALIDATION]
    ids = [r["case_id"].strip() for r in rows if (r.get("case_id") or "").strip()]
    if not ids:
        raise DatalistError(f"{path} lists no validation case")
    return sorted(set(ids))


def _read_csv(path: str | Path, required: Sequence[str]) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise DatalistError(f"{path} not found")
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DatalistError(f"cannot read {path}: {e}") from None
    if not rows:
        raise DatalistError(f"{path} has no data rows")
    missing = [c for c in required if c not in rows[0]]
    if missing:
        raise DatalistError(f"{path} lacks column(s) {', '.join(missing)} (need a header row: case_id,grade,split)")
    return rows


def _is_site_name(name: str) -> bool:
    prefix, _, number = name.partition("-")
    return prefix == "site" and number.isdigit() and int(number) >= 1


def site_names_of(rows: Iterable[SplitRow]) -> list[str]:
    """site-1 ... site-N of a split CSV; the numbers must run from 1 without gaps."""
    numbers = sorted({int(r.split.split("-")[1]) for r in rows if r.split != VALIDATION})
    if numbers != list(range(1, len(numbers) + 1)):
        raise DatalistError(f"split sites must be numbered site-1 ... site-N without gaps, got {numbers}")
    return [f"site-{n}" for n in numbers]


@dataclass
class PaperSplit:
    sites: list[list[str]]
    validation: list[str]
    missing: dict[str, list[str]] = field(default_factory=dict)  # split name -> ids absent from the folder
    total: dict[str, int] = field(default_factory=dict)  # split name -> ids in the CSV


def paper_split(rows: Sequence[SplitRow], available: set[str] | None) -> PaperSplit:
    """The CSV's split restricted to the available case ids (all of them when available is None).

    Missing cases are recorded per split, never invented or moved elsewhere.
    """
    names = site_names_of(rows)
    result = PaperSplit([[] for _ in names], [])
    for row in sorted(rows, key=lambda r: r.case_id):
        result.total[row.split] = result.total.get(row.split, 0) + 1
        if available is not None and row.case_id not in available:
            result.missing.setdefault(row.split, []).append(row.case_id)
        elif row.split == VALIDATION:
            result.validation.append(row.case_id)
        else:
            result.sites[names.index(row.split)].append(row.case_id)
    return result
