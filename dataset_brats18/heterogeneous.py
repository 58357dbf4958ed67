"""The heterogeneous synthetic demo (job.py --demo heterogeneous): sites that differ the way hospitals do.

Each site has its own scanner style (brats_fl's synthetic generator, :class:`ScannerStyle`: tissue contrast per
modality, intensity gain, noise, tumour size and number of lesions) and its own number of cases, from a large centre
to a very small hospital, and validates on its own cases, drawn like its training cases. The centralised baseline
(--n_clients 1) pools every site's training cases and validates on every site's validation cases.

Usage: ``python -m dataset_brats18.heterogeneous --output_dir /tmp/het --n_clients 4`` writes the cases and the
datalists a job reads (site-1.json ... site-N.json, site-All.json).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from dataset_brats18.synthetic import ScannerStyle, SyntheticCase, grade_for, write_case

HETEROGENEOUS_SHAPE = (64, 64, 48)  # the uniform demo's volume size
GENERATOR_VERSION = 1


@dataclass(frozen=True)
class SiteProfile:
    """One hospital of the demo: what it is like, how many cases it has, how its scanner draws them."""

    description: str
    n_train: int
    n_validation: int
    style: ScannerStyle


HETEROGENEOUS_SITES = (
    SiteProfile("large centre, reference scanner", 16, 4, ScannerStyle()),
    SiteProfile(
        "older scanner: low tissue contrast (weak T1ce enhancement), dim, noisy",
        6,
        3,
        ScannerStyle(contrast=(0.6, 0.35, 0.6, 0.5), gain=0.6, noise_sd=55.0),
    ),
    SiteProfile(
        "screening centre: small tumours, two lesions per case", 6, 3, ScannerStyle(tumour_scale=0.55, n_tumours=2)
    ),
    SiteProfile(
        "very small hospital: another contrast protocol, large tumours, noisy",
        2,
        3,
        ScannerStyle(contrast=(1.4, 1.6, 0.7, 1.5), gain=1.4, noise_sd=70.0, tumour_scale=1.3),
    ),
)


def site_cases(out_dir: Path, site_index: int, profile: SiteProfile) -> list[SyntheticCase]:
    """Where the site's cases go: ids Brats18_HET<site>_<index>_1, training cases first."""
    cases = []
    for i in range(profile.n_train + profile.n_validation):
        case_id, grade = f"Brats18_HET{site_index}_{i:03d}_1", grade_for(i)
        cases.append(SyntheticCase(case_id, grade, out_dir / "training" / grade / case_id))
    return cases


def write_site(out_dir: Path, site_index: int, profile: SiteProfile, shape, seed: int) -> list[SyntheticCase]:
    """Generate one site's cases (reused when the folder already holds them from the same manifest)."""
    cases = site_cases(out_dir, site_index, profile)
    for i, case in enumerate(cases):
        if not (case.folder / f"{case.case_id}_seg.nii.gz").is_file():
            write_case(out_dir, 1000 * site_index + i, shape, seed, profile.style, case)
    return cases


def generate_heterogeneous(
    out_dir: str | Path,
    profiles: tuple[SiteProfile, ...] = HETEROGENEOUS_SITES,
    shape: tuple[int, int, int] = HETEROGENEOUS_SHAPE,
    seed: int = 0,
) -> Path:
    """Write every site's cases under out_dir and their datalists in out_dir/datalist_<N>_sites; returns that folder.
    The same arguments give the same voxels; a folder made with other arguments is written afresh."""
    from brats_fl.job_results import write_atomically
    from brats_fl.settings import site_names
    from dataset_brats18.datalist import brats18_case_entry, write_datalist

    if len(profiles) < 1 or any(p.n_train < 1 or p.n_validation < 1 for p in profiles):
        raise ValueError("every site needs at least one training and one validation case")
    out_dir = Path(out_dir)
    manifest = out_dir / "heterogeneous_manifest.json"
    sites = [asdict(p) for p in profiles]
    settings = {"version": GENERATOR_VERSION, "shape": list(shape), "seed": seed, "sites": sites}
    settings = json.loads(json.dumps(settings))  # tuples as lists, as they read back
    if manifest.is_file() and json.loads(manifest.read_text()) != settings:
        raise ValueError(f"{out_dir} holds a heterogeneous demo made with other settings; remove it or use another")
    out_dir.mkdir(parents=True, exist_ok=True)
    datalist_dir = out_dir / f"datalist_{len(profiles)}_sites"
    pooled_train, pooled_val = [], []
    for site_index, (site, profile) in enumerate(zip(site_names(len(profiles)), profiles), start=1):
        cases = write_site(out_dir, site_index, profile, shape, seed)
        training = [brats18_case_entry(c.case_id, c.grade) for c in cases[: profile.n_train]]
        validation = [brats18_case_entry(c.case_id, c.grade) for c in cases[profile.n_train :]]
        write_datalist(datalist_dir / f"{site}.json", training, validation)
        pooled_train += training
        pooled_val += validation
    write_datalist(datalist_dir / "site-All.json", pooled_train, pooled_val)
    write_atomically(manifest, lambda tmp: tmp.write_text(json.dumps(settings, indent=1) + "\n"))
    return datalist_dir


def heterogeneous_demo(workspace: Path, n_clients: int) -> tuple[Path, Path]:
    """(dataset folder, datalist folder) of job.py's --demo heterogeneous: the first n_clients sites of
    HETEROGENEOUS_SITES; the centralised baseline (1 client) pools all of them. ValueError if there are too few."""
    if n_clients > len(HETEROGENEOUS_SITES):
        raise ValueError(f"--n_clients {n_clients}: the demo has {len(HETEROGENEOUS_SITES)} sites")
    profiles = HETEROGENEOUS_SITES if n_clients == 1 else HETEROGENEOUS_SITES[:n_clients]
    data_dir = Path(workspace) / f"synthetic_heterogeneous_{len(profiles)}"
    datalist_dir = generate_heterogeneous(data_dir, profiles)
    print(f"No dataset given: running the heterogeneous synthetic demo in {data_dir}:", flush=True)
    for i, p in enumerate(profiles, start=1):
        print(f"  site-{i}: {p.n_train} training, {p.n_validation} validation cases; {p.description}", flush=True)
    return data_dir.resolve(), datalist_dir.resolve()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="folder to write the cases and datalists into")
    parser.add_argument("--n_clients", type=int, default=len(HETEROGENEOUS_SITES), help="sites (default: all 4)")
    args = parser.parse_args(argv)
    if not 1 <= args.n_clients <= len(HETEROGENEOUS_SITES):
        parser.error(f"--n_clients: need 1 to {len(HETEROGENEOUS_SITES)}")
    profiles = HETEROGENEOUS_SITES if args.n_clients == 1 else HETEROGENEOUS_SITES[: args.n_clients]
    print(f"datalists in {generate_heterogeneous(args.output_dir, profiles)}")


if __name__ == "__main__":
    main()
