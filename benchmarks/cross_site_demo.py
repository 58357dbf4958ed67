"""Who gains from federating, on the heterogeneous demo: one command trains the local-only, federated and centralised
models and writes the cross-site matrix (docs/cross_site.md).

    python -m benchmarks.cross_site_demo                  # 3 jobs + the matrix; figs/cross_site_demo.{png,md}
    python -m benchmarks.cross_site_demo --matrix_only    # the matrix again, from the jobs already trained

The jobs are job.py on `--demo heterogeneous` (4 sites that differ as hospitals do; demo settings: 12 rounds,
SegResNet-8, 32^3 crops), without their own final evaluation (the matrix scores the same models at the same sites):
`--local_only` (each site alone), FedAvg of the 4 sites, and the centralised baseline on their pooled cases. Each runs
in <workspace>/<name>, its output in <workspace>/<name>.log. Then `python -m result_stat.cross_site` scores the 6
models at the 4 sites. figs/cross_site_demo.md records the table, each step's wall time and the machine's load.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from brats_fl.settings import DEFAULT_WORKSPACE, EXIT_FAILED, EXIT_OK, REPO_DIR

JOBS = {  # name -> job.py flags besides --demo heterogeneous
    "het_local": ("--n_clients", "4", "--local_only"),
    "het_fedavg": ("--n_clients", "4"),
    "het_central": ("--n_clients", "1"),
}
DATA_LABEL = (
    "the heterogeneous synthetic demo (job.py --demo heterogeneous: site-1 a large centre of 16 training cases, "
    "site-2 an older low-contrast noisy scanner, site-3 small double tumours, site-4 a very small hospital of 2 "
    "training cases with another contrast protocol; 4, 3, 3 and 3 validation cases of each site's own)"
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cross_site_demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--workspace", default=f"{DEFAULT_WORKSPACE}/cross_site_demo", help="where the jobs run")
    p.add_argument("--figs_dir", default=str(REPO_DIR / "figs"), help="where the figure and the table go")
    p.add_argument("--matrix_only", action="store_true", help="score the jobs already trained in --workspace")
    p.add_argument("--overwrite", action="store_true", help="train again over jobs that --workspace already holds")
    return p


def run_step(name: str, command: list[str], workspace: Path) -> float:
    """Run one step, its output in <workspace>/<name>.log; its wall time in seconds (RuntimeError if it fails)."""
    log = workspace / f"{name}.log"
    print(f"{name}: {' '.join(command[1:])} (output in {log})", flush=True)
    started = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO_DIR).returncode
    seconds = time.perf_counter() - started
    if code != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(f"{name} failed (exit {code}) after {seconds:.0f} s: {' | '.join(tail)}")
    print(f"  done in {seconds / 60:.1f} min", flush=True)
    return seconds


def job_command(name: str, workspace: Path, overwrite: bool) -> list[str]:
    command = [sys.executable, "job.py", "--demo", "heterogeneous", *JOBS[name], "--workspace", str(workspace)]
    return command + ["--job_name", name, "--no_final_eval"] + (["--overwrite"] if overwrite else [])


def matrix_command(workspace: Path, figure: Path) -> list[str]:
    jobs = [str(workspace / name) for name in JOBS]
    return [sys.executable, "-m", "result_stat.cross_site", "--jobs", *jobs, "--figure", str(figure),
            "--data_label", DATA_LABEL, "--overwrite"]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    workspace, figs = Path(args.workspace).resolve(), Path(args.figs_dir).resolve()
    workspace.mkdir(parents=True, exist_ok=True)
    figure = figs / "cross_site_demo.png"
    load_before = os.getloadavg()
    times = {}
    try:
        if not args.matrix_only:
            for name in JOBS:
                times[name] = run_step(name, job_command(name, workspace, args.overwrite), workspace)
        times["matrix"] = run_step("matrix", matrix_command(workspace, figure), workspace)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    table = (workspace / "cross_site" / "server" / "simulate_job" / "cross_site.md").read_text()
    load = f"load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after ({os.cpu_count()} cores)"
    timing = ", ".join(f"{name} {seconds / 60:.1f} min" for name, seconds in times.items())
    record = [
        "# Cross-site matrix of the heterogeneous demo",
        "",
        "Made by `python -m benchmarks.cross_site_demo`" + (" --matrix_only" if args.matrix_only else "") + ".",
        f"Wall time: {timing}; total {sum(times.values()) / 60:.1f} min; {load}.",
        "",
        table.strip(),
        "",
        f"Figure: [{figure.name}]({figure.name})",
    ]
    (figs / "cross_site_demo.md").write_text("\n".join(record) + "\n")
    print("\n".join(record[3:]))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
