"""Who gains from federating, on the heterogeneous demo: one command trains the local-only, federated and centralised
models and writes the cross-site matrix (docs/cross_site.md).

    python -m benchmarks.cross_site_demo                  # 3 jobs + the matrix; figs/cross_site_demo.{png,md}
    python -m benchmarks.cross_site_demo --matrix_only    # the matrix again, from the jobs already trained

The jobs are job.py on `--demo heterogeneous` (4 sites that differ as hospitals do; demo settings: 12 rounds,
SegResNet-8, 32^3 crops), without their own final evaluation (the matrix scores the same models at the same sites):
`--local_only` (each site alone), FedAvg of the 4 sites, and the centralised baseline on their pooled cases. Each runs
in <workspace>/<name>, its output in <workspace>/<name>.log. The three jobs run at the same time: a 4-site job keeps
the CPU only half busy, as its three smaller sites wait each round for the large one (--sequential runs them one
after another, for each job's own time or a machine short of memory). Their results do not depend on it: a job's
figures do not depend on the machine's load. Then `python -m result_stat.cross_site` scores the 6 models at the 4
sites. figs/cross_site_demo.md records the table, each step's wall time and the machine's load.
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
    p.add_argument("--sequential", action="store_true", help="run the three jobs one after another rather than "
                   "at the same time: slower, less memory at once")  # fmt: skip
    return p


def run_steps(commands: dict[str, list[str]], workspace: Path) -> dict[str, float]:
    """Run the steps at the same time, each one's output in <workspace>/<name>.log; each one's wall time in seconds.
    RuntimeError naming the first that failed, once all have ended."""
    started, running = time.perf_counter(), {}
    for name, command in commands.items():
        log = workspace / f"{name}.log"
        print(f"{name}: {' '.join(command[1:])} (output in {log})", flush=True)
        with open(log, "w") as out:
            running[name] = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO_DIR)
    seconds, failed = {}, []
    while running:
        time.sleep(1.0)
        for name, proc in list(running.items()):
            if proc.poll() is None:
                continue
            seconds[name] = time.perf_counter() - started
            del running[name]
            if proc.returncode != 0:
                tail = (workspace / f"{name}.log").read_text(errors="replace").strip().splitlines()[-3:]
                failed.append(f"{name} failed (exit {proc.returncode}) after {seconds[name]:.0f} s: {' | '.join(tail)}")
            else:
                print(f"  {name} done in {seconds[name] / 60:.1f} min", flush=True)
    if failed:
        raise RuntimeError("; ".join(failed))
    return seconds


def write_demo_data(workspace: Path) -> None:
    """The heterogeneous demo's cases, once, before jobs that would otherwise all write them at the same time."""
    from dataset_brats18.heterogeneous import HETEROGENEOUS_SITES, heterogeneous_demo

    heterogeneous_demo(workspace, len(HETEROGENEOUS_SITES))


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
    load_before, started = os.getloadavg(), time.perf_counter()
    times = {}
    try:
        if not args.matrix_only:
            write_demo_data(workspace)
            times["data"] = time.perf_counter() - started
            commands = {name: job_command(name, workspace, args.overwrite) for name in JOBS}
            waves = [{name: command} for name, command in commands.items()] if args.sequential else [commands]
            for wave in waves:
                times.update(run_steps(wave, workspace))
        times.update(run_steps({"matrix": matrix_command(workspace, figure)}, workspace))
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    table = (workspace / "cross_site" / "server" / "simulate_job" / "cross_site.md").read_text()
    load = f"load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after ({os.cpu_count()} cores)"
    together = "" if args.sequential or args.matrix_only else " (the three jobs at the same time)"
    timing = ", ".join(f"{name} {seconds / 60:.1f} min" for name, seconds in times.items()) + together
    record = [
        "# Cross-site matrix of the heterogeneous demo",
        "",
        f"Made by `python -m benchmarks.cross_site_demo{''.join(f' {a}' for a in argv or sys.argv[1:])}`.",
        f"Wall time: {timing}; total {(time.perf_counter() - started) / 60:.1f} min; {load}.",
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
