"""Does any process of a job grow round after round? The demo for hundreds of rounds, its memory watched.

Runs ``python job.py`` (the synthetic demo, --num_rounds 300 by default) and samples the resident set size of every
process of the job (job.py and every process under it: the simulator, its server and site processes, loader
workers) every --sample_s seconds with psutil. Each sample is given the round the server log says is running. When
--minutes have passed the job is stopped as Ctrl-C would (SIGINT: job.py stops every process it started), so the
benchmark ends on time whatever the load; it then prints, per process, the rounds it was seen in, its peak RSS and its
growth per round: the least-squares slope of its largest RSS in each round, over the rounds after the first
--skip_rounds (loading, caches and allocator pools fill up in the first rounds). Goal: no process above 1 MB/round.

    python -m benchmarks.soak                      # 4 sites, 300 rounds or 30 minutes, whichever ends first
    python -m benchmarks.soak --minutes 60 --num_rounds 600
    python -m benchmarks.soak --smoke              # 2 sites, a few rounds: only checks that the benchmark works

The samples go to <workspace>/soak_samples.csv (time, round, process, pid, RSS) and the table to soak.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from brats_fl.job_results import JobPaths
from brats_fl.settings import EXIT_BAD_INPUT, REPO_DIR

GOAL_MB_PER_ROUND = 1.0
ROUND_STARTED = re.compile(r"Round (\d+) started\.")
SITE = re.compile(r"\bsite-\d+\b")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.soak", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--num_rounds", type=int, default=300, help="rounds the job is asked for (default: 300)")
    p.add_argument("--minutes", type=float, default=30.0, help="stop the job after this long (default: 30)")
    p.add_argument("--n_clients", type=int, default=4, help="sites (default: 4)")
    p.add_argument("--sample_s", type=float, default=2.0, help="seconds between samples (default: 2)")
    p.add_argument("--skip_rounds", type=int, default=10, help="rounds left out of the slope (default: 10)")
    p.add_argument("--workspace", default="/tmp/nvflare/soak", help="where the job runs (default: /tmp/nvflare/soak)")
    p.add_argument("--job_flags", default="", help="more flags for job.py, as one string (e.g. '--threads 2')")
    p.add_argument("--smoke", action="store_true", help="2 sites, 4 rounds, slope over all: checks the benchmark")
    return p


def check_args(args: argparse.Namespace) -> str | None:
    if args.num_rounds < 2:
        return f"--num_rounds {args.num_rounds}: need >= 2"
    if args.minutes <= 0 or args.sample_s <= 0:
        return "--minutes and --sample_s: need > 0"
    if not 0 <= args.skip_rounds < args.num_rounds:
        return f"--skip_rounds {args.skip_rounds}: need 0 .. num_rounds - 1 (a slope needs 3 rounds after them)"
    return None


# ---------------------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------------------
def process_label(proc: psutil.Process, root_pid: int) -> tuple[str, str]:
    """(label, command line): a label that stays the same when the simulator restarts a site's process (the site
    it runs), else the role and the pid (the simulator's server and client-runner processes share one command)."""
    try:
        command = " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "gone", ""
    if proc.pid == root_pid:
        return "job.py", command
    sites = set(SITE.findall(command))
    if len(sites) == 1 and ("client.py" in command or "worker" in command):
        return f"{sites.pop()} process", command
    if "multiprocessing" in command or "spawn_main" in command:
        return f"loader worker {proc.pid}", command
    if "brats_fl.nvflare_compat" in command:
        return f"simulator {proc.pid}", command
    return f"{Path(command.split(' ', 1)[0]).name or 'process'} {proc.pid}", command


def sample(root: psutil.Process, commands: dict[str, str]) -> list[tuple[str, int, float]]:
    """(label, pid, RSS MB) of the root and every process under it, now; commands collects each label's command."""
    rows = []
    try:
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return rows
    for proc in processes:
        try:
            label, command = process_label(proc, root.pid)
            rows.append((label, proc.pid, proc.memory_info().rss / 2**20))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        commands.setdefault(label, command[:300])
    return rows


def current_round(server_log: Path) -> int | None:
    """The last 'Round N started.' in the server log, or None before the first."""
    try:
        text = server_log.read_text(errors="replace")
    except OSError:
        return None
    found = ROUND_STARTED.findall(text)
    return int(found[-1]) if found else None


# ---------------------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------------------
def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs (nan with fewer than 2 distinct xs)."""
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mean_x) ** 2 for x in xs)
    if sxx == 0:
        return float("nan")
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sxx


def per_round_peaks(samples: list[dict]) -> dict[str, dict[int, float]]:
    """process label -> round -> the largest RSS sampled in that round (summed over processes of one label that
    run at the same time, e.g. several loader workers)."""
    at_time: dict[tuple[str, float], float] = {}
    round_of: dict[float, int] = {}
    for s in samples:
        if s["round"] is None:
            continue
        key = (s["label"], s["time"])
        at_time[key] = at_time.get(key, 0.0) + s["rss_mb"]
        round_of[s["time"]] = s["round"]
    peaks: dict[str, dict[int, float]] = {}
    for (label, t), rss in at_time.items():
        rounds = peaks.setdefault(label, {})
        rounds[round_of[t]] = max(rounds.get(round_of[t], 0.0), rss)
    return peaks


def growth_table(samples: list[dict], skip_rounds: int) -> list[dict]:
    """Per process: rounds seen, peak MB, and MB per round after the first skip_rounds (the last round, perhaps cut
    short by the stop, is left out)."""
    table = []
    for label, rounds in sorted(per_round_peaks(samples).items()):
        complete = sorted(r for r in rounds if r >= skip_rounds)[:-1]
        grow = slope([float(r) for r in complete], [rounds[r] for r in complete]) if len(complete) >= 3 else None
        table.append(
            {
                "process": label,
                "rounds": len(rounds),
                "first_mb": round(rounds[min(rounds)], 1),
                "peak_mb": round(max(rounds.values()), 1),
                "mb_per_round": None if grow is None or grow != grow else round(grow, 3),
            }
        )
    return table


def print_table(table: list[dict], rounds_reached: int | None, skip_rounds: int) -> bool:
    """Prints the table; True when every process meets the goal."""
    print(f"{'process':<24} {'rounds':>6} {'first MB':>9} {'peak MB':>8} {f'MB/round (rounds {skip_rounds}+)':>22}")
    ok = True
    for row in table:
        grow = row["mb_per_round"]
        shown = "too few rounds" if grow is None else f"{grow:+.3f}"
        if grow is not None and grow > GOAL_MB_PER_ROUND:
            ok, shown = False, shown + " ABOVE GOAL"
        print(f"{row['process']:<24} {row['rounds']:>6} {row['first_mb']:>9.1f} {row['peak_mb']:>8.1f} {shown:>22}")
    verdict = "met" if ok else "NOT met"
    print(f"rounds reached: {rounds_reached}; goal <= {GOAL_MB_PER_ROUND} MB/round per process: {verdict}")
    return ok


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------
def job_command(args: argparse.Namespace) -> list[str]:
    return [
        sys.executable,
        "job.py",
        "--workspace",
        str(Path(args.workspace).resolve()),
        "--job_name",
        "soak",
        "--n_clients",
        str(args.n_clients),
        "--num_rounds",
        str(args.num_rounds),
        "--no_final_eval",
        "--overwrite",
        *args.job_flags.split(),
    ]


def watch(args: argparse.Namespace, log_path: Path, commands: dict[str, str]) -> tuple[list[dict], int]:
    """Run the job, sampling it until it ends or --minutes pass; (samples, job.py's exit code)."""
    job_paths = JobPaths(Path(args.workspace).resolve(), "soak")  # its server_log is looked up at each sample
    samples: list[dict] = []
    started = time.monotonic()
    deadline = started + args.minutes * 60
    last_round = None
    with open(log_path, "w") as log:
        job = subprocess.Popen(job_command(args), cwd=REPO_DIR, stdout=log, stderr=subprocess.STDOUT)
        root = psutil.Process(job.pid)
        stopping = False
        while job.poll() is None:
            now = time.monotonic()
            if now > deadline and not stopping:
                print(f"  {args.minutes:g} minutes passed: stopping the job (SIGINT)", flush=True)
                job.send_signal(signal.SIGINT)
                stopping = True
            round_now = None if stopping else current_round(job_paths.server_log)
            for label, pid, rss in sample(root, commands) if not stopping else []:
                samples.append({"time": round(now - started, 2), "round": round_now, "label": label, "pid": pid,
                                "rss_mb": round(rss, 1)})  # fmt: skip
            if round_now is not None and round_now != last_round and round_now % 10 == 0:
                print(
                    f"  round {round_now} at {(now - started) / 60:.1f} min, load {os.getloadavg()[0]:.1f}", flush=True
                )
            last_round = round_now
            time.sleep(args.sample_s)
    return samples, job.returncode


def write_samples(samples: list[dict], path: Path) -> None:
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["time", "round", "label", "pid", "rss_mb"])
        writer.writeheader()
        writer.writerows(samples)
    partial.replace(path)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.smoke:
        args.n_clients, args.num_rounds, args.skip_rounds = 2, min(args.num_rounds, 5), 0
    problem = check_args(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_BAD_INPUT
    workspace = Path(args.workspace).resolve()
    workspace.mkdir(parents=True, exist_ok=True)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    job = f"job.py {args.job_flags}" if args.job_flags else "job.py (the demo)"
    print(
        f"Soak: {job}, {args.n_clients} sites x {args.num_rounds} rounds or {args.minutes:g} minutes; RSS of every "
        f"process every {args.sample_s:g} s; load average at start {load}",
        flush=True,
    )
    commands: dict[str, str] = {}
    samples, code = watch(args, workspace / "soak_job.log", commands)
    write_samples(samples, workspace / "soak_samples.csv")
    rounds = [s["round"] for s in samples if s["round"] is not None]
    reached = max(rounds) if rounds else None
    table = growth_table(samples, args.skip_rounds)
    ok = print_table(table, reached, args.skip_rounds)
    print(f"job.py exit code {code} (not 0 when --minutes stopped it; its output: {workspace}/soak_job.log)")
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    summary = {
        "rounds_reached": reached,
        "load_at_start": load,
        "processes": table,
        "goal_met": ok,
        "commands": commands,
    }
    (workspace / "soak.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
