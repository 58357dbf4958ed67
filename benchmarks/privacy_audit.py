"""What the server can learn, measured: the demo without privacy, with SVT at the paper's settings and with DP-SGD at
epsilon 8, each trained once with the privacy audit on (job.py --audit), side by side.

    python -m benchmarks.privacy_audit                   # 3 audited demo jobs, the table and figs/privacy_audit.png
    python -m benchmarks.privacy_audit --utility         # + each job without canaries and without the audit (Dice)
    python -m benchmarks.privacy_audit --replot_only     # re-read the finished jobs, rewrite table and figure
    python -m benchmarks.privacy_audit --canary_cost W0 W1 W2   # what canaries cost, over runs of other seeds

Each job is `python job.py --audit` on the demo data (4 sites, 12 rounds, SegResNet-8; no final evaluation) in
<workspace>/<name>, its output in <workspace>/<name>.log. The table has one row per mechanism, all sites pooled:
formal epsilon (delta) | estimate | lower bound (cap) | canary AUC | TPR@1%FPR | patient AUC | Dice; what each
figure means, and what it does not, is in docs/privacy.md ("The privacy audit"). The figure shows the canaries' ROC
curves on log axes and the score histograms of included and excluded canaries, per mechanism.

With --utility the Dice of each mechanism is also measured with the hold-out but no canaries (--audit_no_insert) and
in the ordinary job (all training cases, no audit): what the canaries cost, and what the hold-out costs. One job each
cannot tell the canaries' cost from run-to-run variation: run `--variants audited no_canaries --seed S` in one
workspace per seed, then `--canary_cost` over those workspaces compares the two variants seed by seed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from brats_fl.job_results import JobPaths, read_round_metrics
from brats_fl.privacy import audit_estimators as est
from brats_fl.privacy import audit_report
from brats_fl.settings import REPO_DIR

MECHANISMS = {
    "none": ("no privacy", (), "black"),
    "svt": ("SVT (paper's settings)", ("--enable_dp",), "tab:orange"),
    "dpsgd": ("DP-SGD (epsilon 8)", ("--enable_dp", "--dp_mechanism", "dpsgd", "--dp_target_epsilon", "8"), "tab:blue"),
}
ROC_STYLE = {"none": {"linewidth": 4, "alpha": 0.5}, "svt": {"linestyle": "--"}, "dpsgd": {}}  # overlaps stay visible
# Canaries of norm 0.01 under SVT (--dp_max_grad_norm, the canary norm outside DP-SGD): at norm 1, DP-SGD's C, they
# cost SVT 0.07-0.12 of Dice (seeds 1 and 2); at 0.01 nothing, and the server finds every one as well (docs/privacy.md).
CANARY_NORMS = {"svt": 0.01}
VARIANTS = {  # what --utility adds, per mechanism
    "audited": ("--audit",),
    "no_canaries": ("--audit", "--audit_no_insert"),
    "not_audited": (),
}


@dataclass(frozen=True)
class AuditJob:
    mechanism: str
    variant: str

    @property
    def canary_norm(self) -> float | None:
        """The canaries' norm when this job inserts them and it is not job.py's default."""
        return CANARY_NORMS.get(self.mechanism) if self.variant == "audited" else None

    @property
    def name(self) -> str:
        if self.variant != "audited":
            return f"audit_{self.mechanism}_{self.variant}"
        return f"audit_{self.mechanism}" + (f"_canary_norm_{self.canary_norm:g}" if self.canary_norm else "")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workspace", default="/tmp/nvflare/privacy_audit", help="jobs' workspace root (default: "
                   "/tmp/nvflare/privacy_audit)")  # fmt: skip
    p.add_argument("--output_dir", default=str(REPO_DIR / "figs"), help="where privacy_audit.png and "
                   "privacy_audit.md go (default: the repository's figs/)")  # fmt: skip
    p.add_argument("--audit_canaries", type=int, default=None, metavar="N",
                   help="canaries per site (default: job.py's)")  # fmt: skip
    p.add_argument("--num_rounds", type=int, default=None, help="FL rounds per job (default: the demo's 12)")
    p.add_argument("--seed", type=int, default=None, help="job.py's --seed for every job (initial weights, sampling, "
                   "augmentation; default: job.py's); repeat the benchmark with other seeds, each in its own "
                   "--workspace, to see the run-to-run spread")  # fmt: skip
    p.add_argument(
        "--utility",
        action="store_true",
        help="also run each mechanism without canaries and without the "
        "audit, to measure what the canaries and the hold-out cost in Dice (6 more jobs; same as --variants "
        f"{' '.join(VARIANTS)})",
    )
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["audited"], help="which jobs to run per "
                   "mechanism: audited (canaries and hold-out), no_canaries (--audit_no_insert: the hold-out alone), "
                   "not_audited (the ordinary job) (default: audited); the table reads every variant found in "
                   "--workspace")  # fmt: skip
    p.add_argument("--replot_only", action="store_true", help="run nothing: re-read the jobs in --workspace")
    p.add_argument("--canary_cost", nargs="+", metavar="WORKSPACE", help="run nothing: print, per mechanism, the best "
                   "Dice with canaries (audited) and without (no_canaries) in each of these workspaces (one seed "
                   "each) and the differences")  # fmt: skip
    return p


def jobs_to_run(variants: list[str]) -> list[AuditJob]:
    return [AuditJob(m, v) for v in variants for m in MECHANISMS]


def job_command(job: AuditJob, args: argparse.Namespace) -> list[str]:
    command = [sys.executable, str(REPO_DIR / "job.py"), "--workspace", args.workspace, "--job_name", job.name]
    command += ["--no_final_eval", "--overwrite", *MECHANISMS[job.mechanism][1], *VARIANTS[job.variant]]
    if args.audit_canaries is not None and "--audit" in VARIANTS[job.variant]:
        command += ["--audit_canaries", str(args.audit_canaries)]
    if job.canary_norm is not None:
        command += ["--dp_max_grad_norm", f"{job.canary_norm:g}"]
    if args.num_rounds is not None:
        command += ["--num_rounds", str(args.num_rounds)]
    if args.seed is not None:
        command += ["--seed", str(args.seed)]
    return command


RUN_TIMES = "run_times.json"  # in --workspace: each job's wall time, so that a re-plot can quote them


def record_run_time(workspace: str, name: str, seconds: float) -> None:
    path = Path(workspace) / RUN_TIMES
    times = json.loads(path.read_text()) if path.is_file() else {}
    times[name] = seconds
    path.write_text(json.dumps(times, indent=1) + "\n")


def recorded_run_times(workspace: str) -> dict[str, float]:
    path = Path(workspace) / RUN_TIMES
    return json.loads(path.read_text()) if path.is_file() else {}


def run_job(job: AuditJob, args: argparse.Namespace) -> float:
    """Run one job (output to its log), printing its start and end; returns its wall time in seconds."""
    log = Path(args.workspace) / f"{job.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"[{time.strftime('%H:%M:%S')}] {job.name}: started (log: {log})", flush=True)
    started = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.run(job_command(job, args), stdout=out, stderr=subprocess.STDOUT, cwd=REPO_DIR).returncode
    seconds = time.perf_counter() - started
    status = "finished" if code == 0 else f"FAILED (exit {code}, see {log})"
    print(f"[{time.strftime('%H:%M:%S')}] {job.name}: {status} in {seconds / 60:.1f} min", flush=True)
    if code != 0:
        return float("nan")
    record_run_time(args.workspace, job.name, seconds)
    return seconds


def audit_result(job: AuditJob, workspace: str) -> dict | None:
    path = JobPaths(Path(workspace), job.name).server_job_dir / audit_report.AUDIT_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def best_dice(job: AuditJob, workspace: str) -> float | None:
    """The job's best global validation Dice after round 0 (what its model selector keeps), or None when this
    benchmark has not recorded the job as finished (a job still running has only its first rounds)."""
    path = JobPaths(Path(workspace), job.name).round_metrics
    if job.name not in recorded_run_times(workspace) or not path.is_file():
        return None
    dice = [r.metrics["val_dice"] for r in read_round_metrics(path) if r.round > 0 and "val_dice" in r.metrics]
    return max(dice) if dice else None


def pooled_scores(result: dict) -> tuple:
    """(included, excluded) canary scores of every site."""
    scores = [(s["canary"], s["included"]) for s in result["scores"].values()]
    included = [x for canary, inc in scores for x, i in zip(canary, inc) if i]
    excluded = [x for canary, inc in scores for x, i in zip(canary, inc) if not i]
    return included, excluded


def plot_audit(results: dict[str, dict], png: Path, title: str) -> None:
    """ROC curves of the canaries on log axes (left) and each mechanism's score histograms (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 1 + len(results), figsize=(4.2 * (1 + len(results)), 3.8), dpi=90)
    roc = axes[0]
    floor = 1.0
    for mechanism, result in results.items():
        label, _, colour = MECHANISMS[mechanism]
        included, excluded = pooled_scores(result)
        fpr, tpr = est.roc_curve(included, excluded)
        floor = min(floor, 1 / max(len(excluded), 1))
        auc = result["all_sites"]["canaries"]["separation"]["auc"]
        roc.step(np.maximum(fpr, floor / 2), np.maximum(tpr, floor / 2), where="post", color=colour,
                 label=f"{label}: AUC {auc:.3f}", **ROC_STYLE[mechanism])  # fmt: skip
    grid = np.logspace(np.log10(floor / 2), 0, 50)
    roc.plot(grid, grid, ":", color="grey", label="chance")
    roc.set(xscale="log", yscale="log", xlabel="false-positive rate", ylabel="true-positive rate")
    roc.set_title("canaries: included vs excluded", fontsize=9)
    roc.legend(fontsize=7, loc="lower right")
    for ax, (mechanism, result) in zip(axes[1:], results.items()):
        label, _, colour = MECHANISMS[mechanism]
        included, excluded = pooled_scores(result)
        bins = np.histogram_bin_edges(np.concatenate([included, excluded]), bins=40)
        ax.hist(excluded, bins=bins, color="grey", alpha=0.6, label="excluded")
        ax.hist(included, bins=bins, color=colour, alpha=0.6, label="included")
        bound = result["all_sites"]["canaries"]["lower_bound"]
        estimate = result["all_sites"]["canaries"]["estimate"]
        ax.set_title(
            f"{label}, canaries of norm {result['canary_norm']:g}\nestimate {audit_report._fmt(estimate['epsilon'])}, "
            f"bound {float(bound['epsilon']):.2f} (cap {float(bound['cap']):.2f})",
            fontsize=8,
        )
        ax.set_xlabel("score: sum over rounds of cos(canary, -update)", fontsize=8)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def utility_lines(args: argparse.Namespace) -> list[str]:
    """Dice of each mechanism: audited, hold-out without canaries, the ordinary job."""
    lines = [
        "| mechanism | audited (canaries + hold-out) | hold-out, no canaries | ordinary job |",
        "| --- | --- | --- | --- |",
    ]
    for mechanism, (label, _, _) in MECHANISMS.items():
        cells = []
        for variant in VARIANTS:
            dice = best_dice(AuditJob(mechanism, variant), args.workspace)
            cells.append(f"{dice:.4f}" if dice is not None else "-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def canary_cost_lines(workspaces: list[str]) -> list[str]:
    """Per mechanism, the best Dice with and without canaries in each workspace (one seed each) and the differences:
    whether the canaries cost Dice beyond what changes from one run to the next anyway."""
    import numpy as np

    lines = [
        "| mechanism | with canaries | hold-out, no canaries | difference | mean difference (sd) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for mechanism, (label, _, _) in MECHANISMS.items():
        runs = [(best_dice(AuditJob(mechanism, "audited"), w), best_dice(AuditJob(mechanism, "no_canaries"), w))
                for w in workspaces]  # fmt: skip
        runs = [run for run in runs if None not in run]
        if not runs:
            continue
        differences = np.array([with_canaries - without for with_canaries, without in runs])
        spread = f" ({differences.std(ddof=1):.3f})" if len(runs) > 1 else ""
        cells = [" / ".join(f"{run[k]:.3f}" for run in runs) for k in (0, 1)]
        cells += [" / ".join(f"{d:+.3f}" for d in differences), f"{differences.mean():+.3f}{spread}"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.canary_cost:
        missing = [w for w in args.canary_cost if not Path(w).is_dir()]
        if missing:
            print(f"error: --canary_cost {missing[0]}: not a folder", file=sys.stderr)
            return 2
        print("\n".join(canary_cost_lines(args.canary_cost)))
        return 0
    if args.audit_canaries is not None and args.audit_canaries < 16:
        print(f"error: --audit_canaries {args.audit_canaries}: need >= 16", file=sys.stderr)
        return 2
    started = time.perf_counter()
    times = {}
    if not args.replot_only:
        for job in jobs_to_run(list(VARIANTS) if args.utility else args.variants):
            times[job.name] = run_job(job, args)
    results = {m: audit_result(AuditJob(m, "audited"), args.workspace) for m in MECHANISMS}
    missing = [m for m, r in results.items() if r is None]
    if missing:
        print(f"error: no privacy_audit.json for {', '.join(missing)} in {args.workspace}", file=sys.stderr)
        return 1
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    total = time.perf_counter() - started
    n_sites = len(next(iter(results.values()))["scores"])
    canaries = next(iter(results.values()))["canaries_per_site"]
    title = (
        f"Privacy audit of the synthetic demo ({n_sites} sites, {results['none']['rounds']} rounds, SegResNet-8, "
        f"{canaries} canaries per site), 2-core CPU"
    )
    plot_audit(results, out / "privacy_audit.png", title)
    table = audit_report.markdown_table([audit_report.table_row(r) for r in results.values()])
    lines = [*table]
    references = [AuditJob(m, v) for m in MECHANISMS for v in VARIANTS if v != "audited"]
    if any(best_dice(job, args.workspace) is not None for job in references):
        lines += ["", "Dice (best global val_dice):", "", *utility_lines(args)]
    recorded = recorded_run_times(args.workspace)
    audited = [AuditJob(m, "audited").name for m in MECHANISMS]
    if all(name in recorded for name in audited):
        lines += [
            "",
            "Wall time of the three audited jobs: "
            + ", ".join(f"{name} {recorded[name] / 60:.1f} min" for name in audited)
            + f"; {sum(recorded[name] for name in audited) / 60:.1f} min in all",
        ]
    if times:
        lines.append(f"This invocation: {len(times)} job(s), {total / 60:.1f} min")
    (out / "privacy_audit.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out / 'privacy_audit.png'} and {out / 'privacy_audit.md'}")
    return 0 if all(t == t for t in times.values()) else 1  # nan: a job failed


if __name__ == "__main__":
    sys.exit(main())
