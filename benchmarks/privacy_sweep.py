"""The privacy/accuracy trade-off, measured: a small sweep of job.py on the synthetic demo data.

Runs, one after another, the demo federation without DP, with NVFlare's SVT filter at several --dp_noise_var values
and with DP-SGD at several target epsilons; reads each job's best and final global val_dice and the largest
per-site epsilon from its privacy_report.json; writes a CSV and a plot of Dice against epsilon (PNG and SVG).

    python -m benchmarks.privacy_sweep                 # default size: about 7 jobs of 2 sites x 5 rounds

Each job runs `python job.py` (demo data: 32 training cases of 64x64x48 dealt to the sites, 4 validation cases) in
<workspace>/<config name>; its output goes to <workspace>/<config name>.log.
SVT's epsilon (pure DP of a site's whole update per round, summed over rounds) and DP-SGD's (per patient, with
delta) do not protect the same thing: the plot shows both on one axis only to show where each lands.
"""

from __future__ import annotations

import argparse
import csv
import math
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from brats_fl.job_results import JobPaths, JobResultError, summarize_job
from brats_fl.privacy.report import check_report, load_report
from brats_fl.settings import REPO_DIR, site_names

CSV_COLUMNS = (
    "config",
    "mechanism",
    "setting",
    "epsilon",
    "delta",
    "privacy_unit",
    "best_val_dice",
    "best_round",
    "final_val_dice",
    "initial_val_dice",
    "runtime_s",
    "status",
)
MECHANISM_STYLE = {
    "svt": ("tab:orange", "s", "SVT (NVFlare filter): per site update, delta 0"),
    "dpsgd": ("tab:blue", "o", "DP-SGD (Opacus RDP): per patient"),
}


@dataclass(frozen=True)
class SweepConfig:
    name: str  # job name and log name
    mechanism: str  # "none", "svt" or "dpsgd"
    setting: str  # what varies, for the CSV and the plot's labels
    flags: tuple[str, ...]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--output_dir",
        default=str(REPO_DIR / "figs"),
        help="where privacy_tradeoff.{csv,png,svg} go (default: the repository's figs/)",
    )
    p.add_argument(
        "--workspace",
        default="/tmp/nvflare/privacy_sweep",
        help="simulator workspace root of the sweep's jobs (default: /tmp/nvflare/privacy_sweep)",
    )
    p.add_argument("--n_clients", type=int, default=2, help="sites per job, >= 2 (default: 2)")
    p.add_argument("--num_rounds", type=int, default=5, help="FL rounds per job, >= 2 (default: 5)")
    p.add_argument("--init_filters", type=int, default=8, help="SegResNet base width, multiple of 8 (default: 8)")
    p.add_argument(
        "--dp_noise_var",
        type=float,
        nargs="*",
        default=[1.0, 0.1, 0.01],
        metavar="V",
        help="SVT runs, one per value, each job.py --dp_mechanism svt --dp_noise_var V (other SVT flags at "
        "job.py's defaults, the paper's); none given: no SVT run (default: 1 0.1 0.01)",
    )
    p.add_argument(
        "--dp_target_epsilon",
        type=float,
        nargs="*",
        default=[1.0, 8.0, 64.0],
        metavar="E",
        help="DP-SGD runs, one per value, each job.py --dp_mechanism dpsgd --dp_target_epsilon E (default delta "
        "and clipping); none given: no DP-SGD run (default: 1 8 64)",
    )
    p.add_argument("--no_baseline", action="store_true", help="skip the run without DP")
    p.add_argument(
        "--replot_only",
        action="store_true",
        help="run nothing: re-read the finished jobs in --workspace and rewrite the CSV and plot (run "
        "times are kept from the CSV already in --output_dir)",
    )
    return p


def check_args(args: argparse.Namespace) -> str | None:
    """The first bad flag, as one line, or None."""
    if args.n_clients < 2:
        return f"--n_clients {args.n_clients}: need >= 2 (a federation)"
    if args.num_rounds < 2:
        return f"--num_rounds {args.num_rounds}: need >= 2"
    if args.init_filters < 8 or args.init_filters % 8:
        return f"--init_filters {args.init_filters}: need a positive multiple of 8"
    for v in args.dp_noise_var:
        if not v > 0:
            return f"--dp_noise_var {v}: need values > 0"
    for e in args.dp_target_epsilon:
        if not (e > 0 and math.isfinite(e)):
            return f"--dp_target_epsilon {e}: need finite values > 0"
    if args.no_baseline and not args.dp_noise_var and not args.dp_target_epsilon:
        return "nothing to run: give --dp_noise_var or --dp_target_epsilon, or drop --no_baseline"
    return None


def build_configs(args: argparse.Namespace) -> list[SweepConfig]:
    configs = [] if args.no_baseline else [SweepConfig("sweep_no_dp", "none", "no DP", ())]
    for v in args.dp_noise_var:
        configs.append(
            SweepConfig(
                f"sweep_svt_noise_var_{v:g}",
                "svt",
                f"noise_var {v:g}",
                ("--enable_dp", "--dp_mechanism", "svt", "--dp_noise_var", f"{v:g}"),
            )
        )
    for e in args.dp_target_epsilon:
        configs.append(
            SweepConfig(
                f"sweep_dpsgd_eps_{e:g}",
                "dpsgd",
                f"target epsilon {e:g}",
                ("--enable_dp", "--dp_mechanism", "dpsgd", "--dp_target_epsilon", f"{e:g}"),
            )
        )
    return configs


def job_command(config: SweepConfig, args: argparse.Namespace) -> list[str]:
    return [
        sys.executable,
        str(REPO_DIR / "job.py"),
        "--workspace",
        str(args.workspace),
        "--job_name",
        config.name,
        "--n_clients",
        str(args.n_clients),
        "--num_rounds",
        str(args.num_rounds),
        "--init_filters",
        str(args.init_filters),
        *config.flags,
    ]


def run_config(config: SweepConfig, args: argparse.Namespace) -> dict:
    """Run one job (output to its log file) and read back its row; a failed job gives a row saying so."""
    log_path = Path(args.workspace) / f"{config.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log_path, "w") as log:
        code = subprocess.run(job_command(config, args), stdout=log, stderr=subprocess.STDOUT, cwd=REPO_DIR).returncode
    runtime = time.perf_counter() - started
    if code != 0:
        return failed_row(config, runtime, f"job.py exit {code}, see {log_path}")
    try:
        return read_row(config, args, runtime)
    except (JobResultError, OSError, ValueError, KeyError) as e:
        return failed_row(config, runtime, f"unreadable results: {e}")


def read_row(config: SweepConfig, args: argparse.Namespace, runtime: float) -> dict:
    """Best and final global val_dice (final = the last round's validation) and the largest per-site epsilon."""
    summary = summarize_job(Path(args.workspace), config.name, args.num_rounds, ["site-1"])
    row = {
        "config": config.name,
        "mechanism": config.mechanism,
        "setting": config.setting,
        "best_val_dice": summary.best_metrics["val_dice"],
        "best_round": summary.best_round,
        "final_val_dice": summary.rounds[-1].metrics["val_dice"],
        "initial_val_dice": summary.rounds[0].metrics["val_dice"],  # round 0 validates the untrained model
        "runtime_s": round(runtime, 1),
        "status": "ok",
    }
    if config.mechanism == "none":
        return {**row, "epsilon": math.inf, "delta": 0.0, "privacy_unit": "none"}
    report = load_report(JobPaths(Path(args.workspace), config.name).privacy_report)
    check_report(report, site_names(args.n_clients), args.num_rounds)
    deltas = [s["delta"] for s in report["sites"].values()]
    unit = "site update per round, summed" if config.mechanism == "svt" else "patient (training case)"
    return {**row, "epsilon": report["max_epsilon"], "delta": max(deltas), "privacy_unit": unit}


def failed_row(config: SweepConfig, runtime: float, why: str) -> dict:
    return {
        "config": config.name,
        "mechanism": config.mechanism,
        "setting": config.setting,
        "epsilon": math.nan,
        "delta": math.nan,
        "privacy_unit": "",
        "best_val_dice": math.nan,
        "best_round": -1,
        "final_val_dice": math.nan,
        "initial_val_dice": math.nan,
        "runtime_s": round(runtime, 1),
        "status": f"failed: {why}",
    }


def replot_rows(args: argparse.Namespace, previous_csv: Path) -> list[dict]:
    """Rows re-read from the finished jobs, with the run times recorded in the previous CSV."""
    runtimes = {r["config"]: r["runtime_s"] for r in read_csv(previous_csv)} if previous_csv.is_file() else {}
    rows = []
    for config in build_configs(args):
        try:
            rows.append(read_row(config, args, runtimes.get(config.name, math.nan)))
        except (JobResultError, OSError, ValueError, KeyError) as e:
            rows.append(failed_row(config, math.nan, f"unreadable results: {e}"))
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row[k] for k in CSV_COLUMNS})


def read_csv(path: Path) -> list[dict]:
    """Rows as written, numbers parsed (used to re-plot without re-running)."""
    numeric = {"epsilon", "delta", "best_val_dice", "final_val_dice", "initial_val_dice", "runtime_s"}
    with open(path, newline="") as f:
        return [
            {k: (float(v) if k in numeric else int(v) if k == "best_round" else v) for k, v in r.items()}
            for r in csv.DictReader(f)
        ]


def plot_tradeoff(rows: list[dict], png: Path, svg: Path, title: str) -> None:
    """Best (filled) and final (hollow) global val_dice against the largest per-site epsilon, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["svg.fonttype"] = "none"  # text stays text: a small SVG
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5), dpi=100)
    for mechanism, (colour, marker, label) in MECHANISM_STYLE.items():
        pts = [r for r in rows if r["mechanism"] == mechanism and r["status"] == "ok"]
        if not pts:
            continue
        eps = [r["epsilon"] for r in pts]
        ax.scatter(eps, [r["best_val_dice"] for r in pts], color=colour, marker=marker, label=f"{label}: best")
        ax.scatter(
            eps,
            [r["final_val_dice"] for r in pts],
            facecolors="none",
            edgecolors=colour,
            marker=marker,
            label=f"{label}: final",
        )
        for r in pts:
            ax.annotate(
                r["setting"],
                (r["epsilon"], r["best_val_dice"]),
                textcoords="offset points",
                xytext=(5, 5),
                fontsize=7,
                color=colour,
            )
    for r in rows:
        if r["mechanism"] == "none" and r["status"] == "ok":
            ax.axhline(r["best_val_dice"], color="black", linestyle="--", linewidth=1, label="no DP: best")
            ax.axhline(r["final_val_dice"], color="grey", linestyle=":", linewidth=1, label="no DP: final")
    initial = [r["initial_val_dice"] for r in rows if r["status"] == "ok"]
    if initial:  # each job starts from its own random initial model
        ax.axhspan(
            min(initial), max(initial), color="tab:red", alpha=0.12, label="untrained models (round 0), range over jobs"
        )
    ax.set_xscale("log")
    finite = [r["epsilon"] for r in rows if r["status"] == "ok" and math.isfinite(r["epsilon"])]
    if finite:
        ax.set_xlim(min(finite) / 10, max(finite) * 10)
    ax.set_xlabel("epsilon spent (largest over sites; log scale)")
    ax.set_ylabel("global val Dice (mean of TC, WT, ET)")
    ax.set_ylim(0.0, 1.0)
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(png)
    fig.savefig(svg)
    plt.close(fig)


def print_table(rows: list[dict]) -> None:
    print(f"{'config':<26} {'epsilon':>12} {'delta':>8} {'best Dice':>9} {'final Dice':>10} {'run s':>7}  status")
    for r in rows:
        print(
            f"{r['config']:<26} {r['epsilon']:>12.4g} {r['delta']:>8.3g} {r['best_val_dice']:>9.4f} "
            f"{r['final_val_dice']:>10.4f} {r['runtime_s']:>7.0f}  {r['status']}"
        )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    problem = check_args(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows = replot_rows(args, out_dir / "privacy_tradeoff.csv") if args.replot_only else []
    for config in [] if args.replot_only else build_configs(args):
        print(f"running {config.name} ...", flush=True)
        rows.append(run_config(config, args))
        print(f"  {rows[-1]['status']} in {rows[-1]['runtime_s']:.0f} s", flush=True)
    total = sum(r["runtime_s"] for r in rows) if args.replot_only else time.perf_counter() - started
    write_csv(rows, out_dir / "privacy_tradeoff.csv")
    title = (
        f"Synthetic demo data, SegResNet init_filters {args.init_filters}, {args.n_clients} sites x "
        f"{args.num_rounds} rounds, CPU"
    )
    plot_tradeoff(rows, out_dir / "privacy_tradeoff.png", out_dir / "privacy_tradeoff.svg", title)
    print_table(rows)
    print(
        f"sweep of {len(rows)} jobs took {total / 60:.1f} min; wrote {out_dir / 'privacy_tradeoff.csv'}, "
        f"{out_dir / 'privacy_tradeoff.png'}, {out_dir / 'privacy_tradeoff.svg'}"
    )
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
