"""Seconds per FL round: the upstream-equivalent pipeline against this project's defaults, in one invocation.

Runs the same federated job twice on the same data, with the same seed:

- upstream-equivalent: every case decompressed and resampled at every use (--no_cache), every site validating the
  global model every round (--validate_every_site), no loader workers (--num_workers 0), fp32 (--no_amp);
- the project's defaults: the disk cache of preprocessed cases, one validation per round, workers that fit the
  machine, mixed precision on CUDA.

It prints each run's seconds per round (median over the rounds after the first, which fills the cache), their ratio,
and the per-round validation Dice of both runs side by side: the two pipelines compute the same numbers, so the
curves agree (to 1e-3; only the order in which FedAvg adds the sites' updates differs).

    python -m benchmarks.round_time                                  # 4 sites, CPU-sized model, real-size volumes
    python -m benchmarks.round_time --dataset_base_dir /data/brats18 --paper_settings --gpu 0   # on a GPU

Data: --dataset_base_dir (split at random into the sites), else the 8-case BraTS 2018 sample of the project's
workplace when it is there, else synthetic cases of 240x240x155 voxels. --smoke runs a tiny version (2 sites,
32x32x24 volumes) so that the tests can keep the benchmark working.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from brats_fl.job_results import JobPaths, read_round_metrics
from brats_fl.settings import EXIT_BAD_INPUT, REPO_DIR

SAMPLE_DIR = REPO_DIR.parent / "shared" / "brats18_sample"  # present in the project's workplace only
FULL_SIZE = (240, 240, 155)
# CPU-sized: SegResNet of width 8 trained on the demo's 48x48x32 crops, so that a training step costs a fraction of
# a case's loading, as it does on a GPU; full-size volumes are validated with one 240x240x160 window, as the paper's.
CPU_SETTINGS = ["--init_filters", "8", "--roi_size", "48", "48", "32", "--infer_roi_size", "240", "240", "160"]
PAPER_SETTINGS = ["--init_filters", "16", "--roi_size", "224", "224", "144", "--infer_roi_size", "240", "240", "160"]
SMOKE_SETTINGS = ["--init_filters", "8", "--roi_size", "32", "32", "24", "--infer_roi_size", "32", "32", "24"]
UPSTREAM_FLAGS = ["--no_cache", "--validate_every_site", "--num_workers", "0", "--no_amp"]
AGREEMENT = 1e-3
TIMESTAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.round_time",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--n_clients", type=int, default=4, help="sites (default: 4; --smoke: 2)")
    p.add_argument("--num_rounds", type=int, default=4, help="rounds per run, >= 2 (default: 4; --smoke: 2)")
    p.add_argument("--dataset_base_dir", help="a BraTS folder to use (default: the sample, else synthetic cases)")
    p.add_argument(
        "--n_cases",
        type=int,
        default=10,
        help="synthetic cases to generate when no BraTS folder is used (default: 10; --smoke: at most 6)",
    )
    p.add_argument(
        "--paper_settings",
        action="store_true",
        help="SegResNet-16 with 224x224x144 crops, as the paper (for a GPU); default: CPU-sized, see above",
    )
    p.add_argument("--gpu", help="GPU ids for job.py's --gpu; all sites run at once (default: CPU)")
    p.add_argument(
        "--workspace",
        default="/tmp/nvflare/round_time",
        help="where the two jobs, their data and cache go (default: /tmp/nvflare/round_time)",
    )
    p.add_argument("--smoke", action="store_true", help="a tiny run that only checks the benchmark works")
    return p


def check_args(args: argparse.Namespace) -> str | None:
    if args.n_clients < 1:
        return f"--n_clients {args.n_clients}: need >= 1"
    if args.num_rounds < 2:
        return f"--num_rounds {args.num_rounds}: need >= 2 (the first round is left out of the median)"
    if args.dataset_base_dir and not Path(args.dataset_base_dir).is_dir():
        return f"--dataset_base_dir {args.dataset_base_dir} does not exist"
    if args.n_cases < args.n_clients + 1:
        return f"--n_cases {args.n_cases}: need at least one case per site and one to validate"
    return None


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------
def prepare_data(args: argparse.Namespace, workspace: Path) -> tuple[Path, Path, str]:
    """(dataset folder, datalist folder, description) shared by both runs."""
    from dataset_brats18 import build_datalist
    from dataset_brats18.synthetic import generate_dataset, write_federated_datalists

    if args.smoke or not (args.dataset_base_dir or SAMPLE_DIR.is_dir()):
        shape = (32, 32, 24) if args.smoke else FULL_SIZE
        data_dir = workspace / f"synthetic_{'x'.join(map(str, shape))}"
        cases = generate_dataset(data_dir, args.n_cases, shape)
        datalist_dir = write_federated_datalists(cases, data_dir / f"datalist_{args.n_clients}", args.n_clients, 2)
        return data_dir, datalist_dir, f"{len(cases)} synthetic cases of {'x'.join(map(str, shape))} voxels"
    data_dir = Path(args.dataset_base_dir or SAMPLE_DIR)
    datalist_dir = workspace / f"datalist_{args.n_clients}"
    flags = [
        "--dataset_base_dir",
        str(data_dir),
        "--output_dir",
        str(datalist_dir),
        "--strategy",
        "random",
        "--n_clients",
        str(args.n_clients),
    ]
    if build_datalist.main(flags) != 0:
        raise SystemExit(f"error: could not split {data_dir} into {args.n_clients} sites")
    return data_dir, datalist_dir, f"the BraTS cases under {data_dir}, split at random into {args.n_clients} sites"


# ---------------------------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------------------------
def job_command(args: argparse.Namespace, name: str, data: tuple[Path, Path], extra: list[str]) -> list[str]:
    settings = SMOKE_SETTINGS if args.smoke else PAPER_SETTINGS if args.paper_settings else CPU_SETTINGS
    command = [
        sys.executable,
        "job.py",
        "--dataset_base_dir",
        str(data[0]),
        "--datalist_json_path",
        str(data[1]),
        "--workspace",
        str(Path(args.workspace).resolve()),
        "--job_name",
        name,
        "--n_clients",
        str(args.n_clients),
        "--num_rounds",
        str(args.num_rounds),
        "--learning_rate",
        "1e-3",
        "--no_final_eval",  # the benchmark times training rounds
        *settings,
    ]
    command += ["--gpu", args.gpu] if args.gpu else []
    return command + extra


def run_job(command: list[str], log_path: Path) -> float:
    """Run job.py from the repository root; returns the wall time, raises SystemExit if it fails."""
    started = time.perf_counter()
    with open(log_path, "w") as log:
        code = subprocess.run(command, cwd=REPO_DIR, stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise SystemExit(f"error: {' '.join(command[1:3])}... exited with {code}; see {log_path}")
    return time.perf_counter() - started


def round_seconds(server_log: Path) -> list[float]:
    """Seconds of each round, from the server log's 'Round N started.' and 'Finished FedAvg.' lines."""
    marks, last = [], None
    for line in server_log.read_text(errors="replace").splitlines():
        stamp = TIMESTAMP.match(line)
        if stamp:
            last = datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f")
        elif last is not None and ("started." in line and "Round" in line or "Finished FedAvg." in line):
            marks.append(last)
    return [(b - a).total_seconds() for a, b in zip(marks, marks[1:])]


def val_dice_per_round(paths: JobPaths) -> list[float]:
    return [r.metrics.get("val_dice", float("nan")) for r in read_round_metrics(paths.round_metrics)]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.smoke:
        args.n_clients, args.num_rounds = min(args.n_clients, 2), 2
        args.n_cases = min(args.n_cases, 6)
    problem = check_args(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_BAD_INPUT
    workspace = Path(args.workspace).resolve()
    workspace.mkdir(parents=True, exist_ok=True)
    data_dir, datalist_dir, described = prepare_data(args, workspace)
    print(f"Round time: {args.n_clients} sites x {args.num_rounds} rounds on {described}", flush=True)
    runs = {"upstream": UPSTREAM_FLAGS, "defaults": ["--cache_dir", str(workspace / f"cache_{time.time_ns()}")]}
    results = {}
    for name, extra in runs.items():
        command = job_command(args, f"round_time_{name}", (data_dir, datalist_dir), extra)
        print(f"  running {name}: python job.py ... {' '.join(extra)}", flush=True)
        wall = run_job(command, workspace / f"round_time_{name}.log")
        paths = JobPaths(workspace, f"round_time_{name}")
        seconds = round_seconds(paths.server_log)
        results[name] = {
            "wall": wall,
            "rounds": seconds,
            "median": statistics.median(seconds[1:]),
            "val_dice": val_dice_per_round(paths),
        }
    print_results(results)
    (workspace / "round_time.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


def print_results(results: dict) -> None:
    up, ours = results["upstream"], results["defaults"]
    print(f"{'':>10}  {'s/round (median, rounds 1+)':>27}  {'round 0 s':>9}  {'job wall s':>10}")
    for name, r in results.items():
        print(f"{name:>10}  {r['median']:>27.1f}  {r['rounds'][0]:>9.1f}  {r['wall']:>10.1f}")
    print(f"ratio upstream / defaults: {up['median'] / ours['median']:.2f}")
    print(f"{'round':>5}  {'val_dice upstream':>17}  {'val_dice defaults':>17}  {'|difference|':>12}")
    worst = 0.0
    for r, (a, b) in enumerate(zip(up["val_dice"], ours["val_dice"])):
        worst = max(worst, abs(a - b))
        print(f"{r:>5}  {a:>17.6f}  {b:>17.6f}  {abs(a - b):>12.2e}")
    verdict = "agree" if worst <= AGREEMENT else "DISAGREE"
    print(f"val_dice curves {verdict}: largest difference {worst:.2e} (tolerance {AGREEMENT:g})")


if __name__ == "__main__":
    sys.exit(main())
