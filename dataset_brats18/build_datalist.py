"""Write the datalists a job reads (site-1.json ... site-N.json and site-All.json) from a BraTS download.

    # the paper's split (Li et al. 2019), paths taken from what is really on disk:
    python -m dataset_brats18.build_datalist --dataset_base_dir /data/brats18 --output_dir /data/brats18/datalist
    # the paper's split from the CSV alone, for the official BraTS 2018 layout (how the shipped files are made):
    python -m dataset_brats18.build_datalist --trust_csv --output_dir dataset_brats18/datalist
    # your own federation: IID, or whole institutions per site (non-IID), with 15 % shared validation cases:
    python -m dataset_brats18.build_datalist --dataset_base_dir D --output_dir D/dl_iid --strategy random --n_clients 4
    python -m dataset_brats18.build_datalist --dataset_base_dir D --output_dir D/dl_inst --strategy institution \
        --n_clients 4

Recognised layouts (by file name; nothing is opened, so run python -m dataset_brats18.check_dataset afterwards):
BraTS 2017-2019 (HGG/ and LGG/ folders, ids carrying the institution), BraTS 2020 (flat; its name_mapping.csv,
found automatically, gives grade and institution), BraTS 2021 (flat, BraTS2021_xxxxx) and BraTS 2023+
(BraTS-GLI-xxxxx-xxx-{t1c,t1n,t2w,t2f,seg}, enhancing tumour labelled 3: the datalists then say "et_label": 3 and the
pipeline converts labels accordingly). Files may be .nii or .nii.gz. Images are listed as t1ce, t1, t2, flair.

A case missing a modality or its label stops the build (exit 2, every such case named) unless --skip_incomplete
is given, which leaves those cases out and names each of them. Cases of a split CSV that are not on disk are
reported and left out, never invented; a site left with no training case stops the build. Same input and seed,
same files, byte for byte.
Exit codes: 0 datalists written; 2 bad flag or input, nothing written.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from brats_fl.settings import EXIT_BAD_INPUT, site_names
from dataset_brats18.datalist import MAX_NAMED, DatalistError, brats18_case_entry, write_datalist
from dataset_brats18.layouts import (
    GRADES,
    UNKNOWN,
    NameMappingRow,
    ScannedCase,
    annotate_cases,
    duplicate_case_ids,
    institution_from_id,
    read_name_mapping,
    scan_dataset,
)
from dataset_brats18.splits import (
    institution_split,
    paper_split,
    per_site_validation,
    random_split,
    read_case_id_csv,
    read_split_csv,
    take_validation,
)

PACKAGE_DIR = Path(__file__).resolve().parent
PAPER_SPLIT_CSV = PACKAGE_DIR / "brats18_paper_split.csv"
STRATEGIES = ("paper", "random", "institution")
DEFAULT_VAL_FRACTION = 0.15  # the paper: 43 of 285 cases
NAMED_IN_WARNINGS = 5
TABLE_INSTITUTIONS = 5  # institutions named per table row


class BuildError(DatalistError):
    """Input the builder refuses; one line, exit code 2, nothing written."""


@dataclass(frozen=True)
class CaseInfo:
    """What the builder knows about one usable case: its datalist entry and what the summary table shows."""

    case_id: str
    entry: dict
    grade: str | None
    institution: str | None


@dataclass
class Plan:
    """Which case ids go where; validation[i] belongs to site i+1 (the same list for all when shared)."""

    training: list[list[str]]
    validation: list[list[str]]
    shared_validation: bool


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dataset_brats18.build_datalist",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--dataset_base_dir",
        help="folder holding the BraTS cases, scanned recursively; datalist paths "
        "are relative to it (the job's --dataset_base_dir). Not needed with --trust_csv",
    )
    p.add_argument(
        "--output_dir",
        required=True,
        help="folder to write site-1.json ... site-N.json and site-All.json into "
        "(created if missing; existing files of those names are replaced)",
    )
    p.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default="paper",
        help="paper: the split CSV (default); random: IID, seeded, sizes as equal as possible; "
        "institution: whole contributing institutions per site, sizes balanced (non-IID)",
    )
    p.add_argument(
        "--split_csv",
        default=str(PAPER_SPLIT_CSV),
        help="split CSV for --strategy paper, columns case_id,grade,split (default: the paper's split "
        "shipped in dataset_brats18/brats18_paper_split.csv)",
    )
    p.add_argument(
        "--trust_csv",
        action="store_true",
        help="--strategy paper only: do not scan; write every case of the CSV in the official BraTS 2018 "
        "layout training/<grade>/<id>/<id>_<modality>.nii.gz",
    )
    p.add_argument("--n_clients", type=int, help="number of sites for random/institution (paper: taken from the CSV)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random split and of validation draws (default: 0)")
    p.add_argument(
        "--val_fraction",
        type=float,
        help=f"fraction of cases drawn (seeded) as validation, in (0, 1) (default: {DEFAULT_VAL_FRACTION}; "
        "random/institution only)",
    )
    p.add_argument(
        "--val_csv",
        help="CSV whose case_id column lists the validation cases (if it has a split column, "
        "its 'validation' rows); shared by all sites. random/institution only",
    )
    p.add_argument(
        "--per_site_val",
        action="store_true",
        help="each site holds out --val_fraction of its own cases as its validation set instead of one "
        "shared set; site-All validates on their union. random/institution only",
    )
    p.add_argument(
        "--name_mapping", help="BraTS 2020 name_mapping.csv (default: any name_mapping.csv found in the scan)"
    )
    p.add_argument(
        "--skip_incomplete",
        action="store_true",
        help="leave out (and name) cases missing a modality or label instead of stopping",
    )
    p.add_argument("--verbose", action="store_true", help="name every case left out, not just the first few")
    return p


# ---------------------------------------------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------------------------------------------
def check_flags(args: argparse.Namespace) -> None:
    """Flag combinations that cannot work, reported before anything is read."""
    if args.trust_csv and args.strategy != "paper":
        raise BuildError("--trust_csv only works with --strategy paper (other strategies need the files scanned)")
    if not args.trust_csv and args.dataset_base_dir is None:
        raise BuildError("--dataset_base_dir is required (or --trust_csv to write the paper split without scanning)")
    if args.dataset_base_dir is not None and not Path(args.dataset_base_dir).is_dir():
        raise BuildError(f"--dataset_base_dir {args.dataset_base_dir} does not exist or is not a folder")
    if args.strategy == "paper":
        for flag in ("val_fraction", "val_csv"):
            if getattr(args, flag) is not None:
                raise BuildError(
                    f"--{flag}: the paper strategy uses the validation cases of --split_csv; "
                    "drop the flag or use --strategy random/institution"
                )
        if args.per_site_val:
            raise BuildError("--per_site_val: the paper strategy uses one shared validation set from --split_csv")
        return
    if args.n_clients is None or args.n_clients < 1:
        raise BuildError(f"--n_clients {args.n_clients}: --strategy {args.strategy} needs --n_clients >= 1")
    if args.val_csv is not None and (args.val_fraction is not None or args.per_site_val):
        raise BuildError(
            "--val_csv gives the validation cases: do not combine it with --val_fraction or --per_site_val"
        )
    if args.val_fraction is not None and not 0.0 < args.val_fraction < 1.0:
        raise BuildError(f"--val_fraction {args.val_fraction}: need a fraction in (0, 1)")


# ---------------------------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------------------------
def cases_from_csv(split_csv: str | Path) -> tuple[dict[str, CaseInfo], int]:
    """Every case of the split CSV in the official BraTS 2018 layout, without looking at any file."""
    rows = read_split_csv(split_csv)
    no_grade = [r.case_id for r in rows if r.grade not in GRADES]
    if no_grade:
        raise BuildError(
            f"{split_csv}: --trust_csv needs grade HGG or LGG for every case, missing for {_name_some(no_grade)}"
        )
    cases = {
        r.case_id: CaseInfo(r.case_id, brats18_case_entry(r.case_id, r.grade), r.grade, institution_from_id(r.case_id))
        for r in rows
    }
    return cases, 4


def cases_from_scan(args: argparse.Namespace) -> tuple[dict[str, CaseInfo], int]:
    """Usable cases found under --dataset_base_dir, and the dataset's ET label; every problem is reported."""
    base = Path(args.dataset_base_dir)
    scan = scan_dataset(base)
    if not scan.cases:
        raise BuildError(
            f"no BraTS case files under {base} (expected e.g. <id>/<id>_t1ce.nii.gz, "
            "<id>/<id>-t1c.nii.gz or HGG/<id>/<id>_t1ce.nii.gz); check --dataset_base_dir"
        )
    namings = sorted(scan.namings())
    if len(namings) > 1:
        raise BuildError(
            f"{base} mixes naming schemes ({' and '.join(namings)}): their label conventions differ; "
            "build datalists for each release separately"
        )
    repeated = duplicate_case_ids(scan.cases)
    if repeated:
        described = [f"{cid} ({', '.join(folders)})" for cid, folders in sorted(repeated.items())]
        raise BuildError(
            f"case(s) found in more than one folder under {base}: {_name_some(described)}; "
            "remove the copies or point --dataset_base_dir at one of them"
        )
    if scan.unrecognised:
        warn(
            f"{len(scan.unrecognised)} NIfTI file(s) under {base} follow no BraTS naming and were ignored: "
            f"{_name_some(scan.unrecognised, args.verbose)}"
        )
    annotate_cases(scan.cases, load_name_mappings(args, base, scan.name_mappings))
    usable = drop_incomplete(scan.cases, args.skip_incomplete, base)
    cases = {c.case_id: CaseInfo(c.case_id, c.entry(), c.grade, c.institution) for c in usable}
    return cases, scan.cases[0].naming.et_label


def load_name_mappings(args: argparse.Namespace, base: Path, found: Sequence[str]) -> dict[str, NameMappingRow]:
    paths = [Path(args.name_mapping)] if args.name_mapping else [base / f for f in found]
    if args.name_mapping and not paths[0].is_file():
        raise BuildError(f"--name_mapping {args.name_mapping} not found")
    mapping: dict[str, NameMappingRow] = {}
    for path in paths:
        mapping.update(read_name_mapping(path))
    return mapping


def drop_incomplete(cases: Sequence[ScannedCase], skip: bool, base: Path) -> list[ScannedCase]:
    """Complete cases; incomplete ones are each named, and stop the build unless skip is set."""
    bad = [c for c in cases if c.problem()]
    for case in bad:
        print(f"{'skipped' if skip else 'incomplete'}: {case.problem()}", file=sys.stderr)
    if bad and not skip:
        raise BuildError(
            f"{len(bad)} case(s) under {base} lack files (listed above); complete them, or pass "
            "--skip_incomplete to leave them out"
        )
    if bad:
        warn(f"left out {len(bad)} incomplete case(s) (listed above); {len(cases) - len(bad)} case(s) remain")
    return [c for c in cases if not c.problem()]


# ---------------------------------------------------------------------------------------------------------------
# Plans
# ---------------------------------------------------------------------------------------------------------------
def plan_paper(args: argparse.Namespace, cases: Mapping[str, CaseInfo], scanned: bool) -> Plan:
    """The CSV's split; cases not on disk are reported per split and left out, cases not in the CSV reported."""
    rows = read_split_csv(args.split_csv)
    csv_name = shown(args.split_csv)
    split = paper_split(rows, set(cases) if scanned else None)
    if args.n_clients is not None and args.n_clients != len(split.sites):
        raise BuildError(f"--n_clients {args.n_clients}: {csv_name} defines {len(split.sites)} sites")
    if split.missing:
        n_missing = sum(len(v) for v in split.missing.values())
        per_split = ", ".join(f"{name} {len(ids)}/{split.total[name]}" for name, ids in sorted(split.missing.items()))
        every = [cid for ids in split.missing.values() for cid in ids]
        warn(
            f"{n_missing} of the {len(rows)} cases of {csv_name} are not under {args.dataset_base_dir} and "
            f"were left out ({per_split}): {_name_some(sorted(every), args.verbose)}"
        )
    listed = {r.case_id for r in rows}
    unused = sorted(set(cases) - listed)
    if unused:
        warn(
            f"{len(unused)} case(s) under {args.dataset_base_dir} are not in {csv_name} and are not used: "
            f"{_name_some(unused, args.verbose)}"
        )
    for i, site in enumerate(split.sites):
        if not site:
            raise BuildError(
                f"site-{i + 1} of {csv_name} has none of its {split.total.get(f'site-{i + 1}', 0)} "
                f"training cases under {args.dataset_base_dir}; nothing written (a site cannot train "
                "on no data): use --strategy random or institution for a partial dataset"
            )
    if not split.validation:
        raise BuildError(
            f"none of the validation cases of {csv_name} is under {args.dataset_base_dir}; nothing written"
        )
    return Plan(split.sites, [split.validation] * len(split.sites), shared_validation=True)


def plan_own_split(args: argparse.Namespace, cases: Mapping[str, CaseInfo]) -> Plan:
    """random or institution: shared validation first (fraction or CSV), then the sites, or per-site validation."""
    ids = sorted(cases)
    fraction = DEFAULT_VAL_FRACTION if args.val_fraction is None else args.val_fraction
    shared_val: list[str] = []
    if args.val_csv is not None:
        shared_val = validation_from_csv(args.val_csv, set(ids), args.verbose)
        train_ids = sorted(set(ids) - set(shared_val))
    elif args.per_site_val:
        train_ids = ids
    else:
        train_ids, shared_val = _validation_split(ids, fraction, args.seed)
    sites = split_sites(args, train_ids, cases)
    if not args.per_site_val:
        return Plan(sites, [shared_val] * len(sites), shared_validation=True)
    try:
        training, validation = per_site_validation(sites, fraction, args.seed)
    except ValueError as e:
        raise BuildError(f"--per_site_val: {e}; use fewer --n_clients or a dataset with more cases") from None
    return Plan(training, validation, shared_validation=False)


def _validation_split(ids: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    try:
        return take_validation(ids, fraction, seed)
    except ValueError as e:
        raise BuildError(f"--val_fraction {fraction}: {e}") from None


def validation_from_csv(path: str, available: set[str], verbose: bool) -> list[str]:
    listed = read_case_id_csv(path)
    absent = [cid for cid in listed if cid not in available]
    if absent:
        warn(
            f"{len(absent)} of the {len(listed)} validation case(s) of --val_csv {path} are not in the dataset and "
            f"were left out: {_name_some(absent, verbose)}"
        )
    present = [cid for cid in listed if cid in available]
    if not present:
        raise BuildError(f"--val_csv {path}: none of its {len(listed)} case(s) is in the dataset")
    if len(present) == len(available):
        raise BuildError(f"--val_csv {path} lists every case of the dataset: nothing is left to train on")
    return present


def split_sites(args: argparse.Namespace, train_ids: list[str], cases: Mapping[str, CaseInfo]) -> list[list[str]]:
    if len(train_ids) < args.n_clients:
        raise BuildError(f"--n_clients {args.n_clients}: only {len(train_ids)} training case(s) to share")
    if args.strategy == "random":
        return random_split(train_ids, args.n_clients, args.seed)
    institution_of = institutions(train_ids, cases)
    n_institutions = len(set(institution_of.values()))
    if n_institutions < args.n_clients:
        raise BuildError(
            f"--n_clients {args.n_clients}: the training cases come from only {n_institutions} "
            "institution(s); use fewer sites or --strategy random"
        )
    return institution_split(institution_of, args.n_clients)


def institutions(ids: Sequence[str], cases: Mapping[str, CaseInfo]) -> dict[str, str]:
    """Institution of each case; cases without one are grouped as 'unknown' (loudly), all unknown is an error."""
    unknown = [cid for cid in ids if cases[cid].institution is None]
    if len(unknown) == len(ids):
        raise BuildError(
            "--strategy institution: these case ids carry no institution (only BraTS 2017-2019 ids "
            "do, and BraTS 2020 through its name_mapping.csv); use --strategy random"
        )
    if unknown:
        warn(
            f"{len(unknown)} case(s) have no known institution and are grouped as one institution '{UNKNOWN}': "
            f"{_name_some(unknown)}"
        )
    return {cid: cases[cid].institution or UNKNOWN for cid in ids}


# ---------------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------------
def write_plan(out_dir: Path, plan: Plan, cases: Mapping[str, CaseInfo], et_label: int) -> list[Path]:
    """site-1.json ... site-N.json and site-All.json; entries sorted by case id."""

    def entries(ids):
        return [cases[cid].entry for cid in sorted(ids)]

    written = []
    for site, train, val in zip(site_names(len(plan.training)), plan.training, plan.validation):
        path = out_dir / f"{site}.json"
        write_datalist(path, entries(train), entries(val), et_label)
        written.append(path)
    all_train = [cid for site in plan.training for cid in site]
    all_val = sorted({cid for site in plan.validation for cid in site})
    path = out_dir / "site-All.json"
    write_datalist(path, entries(all_train), entries(all_val), et_label)
    return written + [path]


def stale_site_files(out_dir: Path, n_sites: int) -> list[str]:
    """site-K.json files beyond the N just written (left from an earlier build with more sites)."""
    stale = []
    for path in sorted(out_dir.glob("site-*.json")):
        number = path.stem.split("-", 1)[1]
        if number.isdigit() and int(number) > n_sites:
            stale.append(path.name)
    return stale


def describe(ids: Sequence[str], cases: Mapping[str, CaseInfo]) -> tuple[str, str, str]:
    """HGG count, LGG count and institutions ('TCIA01 3, TCIA02 1') of a group of cases, for the table."""
    grades = Counter(cases[cid].grade for cid in ids)
    known = any(g is not None for g in grades)
    insts = Counter(cases[cid].institution or UNKNOWN for cid in ids)
    ranked = [f"{i} {n}" for i, n in sorted(insts.items(), key=lambda kv: (-kv[1], kv[0]))]
    inst_text = ", ".join(ranked[:TABLE_INSTITUTIONS])
    if len(ranked) > TABLE_INSTITUTIONS:
        inst_text += f", +{len(ranked) - TABLE_INSTITUTIONS} more ({len(ranked)} institutions)"
    if set(insts) == {UNKNOWN}:
        inst_text = "-"
    hgg, lgg = (str(grades["HGG"]), str(grades["LGG"])) if known else ("-", "-")
    return hgg, lgg, inst_text


def render_table(plan: Plan, cases: Mapping[str, CaseInfo]) -> str:
    """Per site: training cases, HGG/LGG, validation cases and institutions; then site-All and validation."""
    header = ("datalist", "training", "HGG", "LGG", "validation", "institutions (training cases)")

    def row(name: str, train: Sequence[str], n_val: int) -> tuple[str, ...]:
        hgg, lgg, insts = describe(train, cases)
        return (name, str(len(train)), hgg, lgg, str(n_val), insts)

    sites = site_names(len(plan.training))
    rows = [row(site, train, len(val)) for site, train, val in zip(sites, plan.training, plan.validation)]
    all_train = [cid for site in plan.training for cid in site]
    all_val = sorted({cid for site in plan.validation for cid in site})
    rows.append(row("site-All", all_train, len(all_val)))
    hgg, lgg, insts = describe(all_val, cases)
    val_name = "validation (shared)" if plan.shared_validation else "validation (union)"
    rows.append((val_name, "-", hgg, lgg, str(len(all_val)), insts))
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header) - 1)]
    lines = []
    for r in [header, *rows]:
        cells = [r[0].ljust(widths[0])] + [r[c].rjust(widths[c]) for c in range(1, len(widths))] + [r[-1]]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def shown(path: str | Path) -> str:
    """A path as short as it can be shown: relative to the working folder when inside it."""
    try:
        return Path(path).resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(path)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _name_some(items: Sequence[str], every: bool = False) -> str:
    limit = len(items) if every else max(MAX_NAMED, NAMED_IN_WARNINGS)
    named = ", ".join(items[:limit])
    return named + (f" (and {len(items) - limit} more; --verbose names all)" if len(items) > limit else "")


def build(args: argparse.Namespace) -> tuple[Plan, dict[str, CaseInfo], int, list[Path]]:
    """Everything after parsing: check, plan, write; raises BuildError before writing on any problem."""
    check_flags(args)
    if args.trust_csv:
        cases, et_label = cases_from_csv(args.split_csv)
    else:
        cases, et_label = cases_from_scan(args)
        if not cases:
            raise BuildError(f"no complete case under {args.dataset_base_dir}; nothing written")
    if args.strategy == "paper":
        plan = plan_paper(args, cases, scanned=not args.trust_csv)
    else:
        plan = plan_own_split(args, cases)
    out_dir = Path(args.output_dir)
    written = write_plan(out_dir, plan, cases, et_label)
    stale = stale_site_files(out_dir, len(plan.training))
    if stale:
        warn(
            f"{out_dir} also holds {', '.join(stale)} from an earlier build; a job with --n_clients "
            f"{len(plan.training)} ignores them, but delete them to avoid confusion"
        )
    return plan, cases, et_label, written


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        plan, cases, et_label, written = build(args)
    except DatalistError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    source = "the split CSV (not scanned)" if args.trust_csv else str(args.dataset_base_dir)
    print(f"strategy {args.strategy}: {len(plan.training)} site(s) from {source}")
    print(render_table(plan, cases))
    print(f"wrote {', '.join(p.name for p in written)} to {args.output_dir} (et_label {et_label})")
    if not args.trust_csv:
        print(
            f"next: python -m dataset_brats18.check_dataset --dataset_base_dir {args.dataset_base_dir} "
            f"--datalist_json_path {args.output_dir}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
