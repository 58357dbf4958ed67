"""How much memory one site needs, estimated before a job starts, and whether the sites that run at once fit.

A site's peak is that of its larger piece of work: one training step on a --roi_size crop, or the sliding-window
validation of one whole volume with an --infer_roi_size window. Both are straight lines in what sets them, fitted by
least squares on the points ``python -m benchmarks.memory_points`` measured (figs/memory_points_cpu.csv, process RSS
on the CPU, fp32):

    train MB = base + a * init_filters * crop voxels + b * crop voxels
    val MB   = base + c * init_filters * window voxels + d * padded volume voxels

The base is the process with Python, torch and MONAI imported; the init_filters terms are SegResNet's activations
(their channels grow with the width, their size with the voxels); the plain voxel terms are the tensors of fixed
channels: input, label and loss (train), and the whole-volume image and output sliding-window inference keeps
(val). The comparison is against what the machine has: free host memory, and each GPU's free memory with --gpu.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from brats_fl.settings import DEMO_SHAPE, TrainingSettings

BRATS_VOLUME = (240, 240, 155)  # every BraTS 2018 volume
DEMO_DATA_FOLDER = "synthetic_brats18"  # job.py's demo data (run_options.resolve_data): DEMO_SHAPE volumes

# Fitted on figs/memory_points_cpu.csv by fit_coefficients (tests/test_memory.py refits them from the CSV).
TRAIN_FIT = (0.0, 0.0, 0.0)  # base MB, MB per filter-voxel, MB per voxel
VAL_FIT = (0.0, 0.0, 0.0)  # base MB, MB per filter-window-voxel, MB per padded volume voxel

# Not measured yet (no GPU was lent to the session that fitted the above): on a GPU the activations are taken to
# need what they need on the CPU, plus the CUDA context; mixed precision stores them in half precision, taken to
# save 40% of them (weights, gradients and Adam's state stay fp32). benchmarks/gpu_check.py measures the paper point.
CUDA_CONTEXT_MB = 600.0
AMP_ACTIVATION_FACTOR = 0.6
HOST_SITE_ON_GPU_MB = 3000.0  # host RSS of a site process that trains on a GPU (CUDA libraries, data): assumed
# job.py, the simulator's server and client-runner processes together, measured by benchmarks/soak.py (the demo)
JOB_OVERHEAD_MB = 1500.0


# Memory over hundreds of rounds (benchmarks/soak.py, docs/performance.md#memory). Without them every site process and
# the simulator's server grew by 1.2-1.5 MB per round over 46 demo rounds (about 0.8 GB over the paper's 600): freed
# memory that glibc keeps in its per-thread arenas instead of returning it. NVFlare 2.9 runs gc.collect() and
# malloc_trim() (and torch.cuda.empty_cache() on a GPU) after every round at the server and the sites when its FedAvg
# recipe is given these; MALLOC_ARENA_MAX caps the arenas glibc keeps in every process job.py starts.
RECIPE_MEMORY_CLEANUP = {"server_memory_gc_rounds": 1, "client_memory_gc_rounds": 1, "cuda_empty_cache": True}
MALLOC_ARENA_MAX = "2"


def limit_malloc_arenas() -> None:
    """Set MALLOC_ARENA_MAX for the processes started from now on (a value the user set is kept)."""
    import os

    os.environ.setdefault("MALLOC_ARENA_MAX", MALLOC_ARENA_MAX)


# ---------------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------------
def voxels(size: Sequence[int]) -> int:
    return math.prod(int(s) for s in size)


def padded_volume(volume: Sequence[int], window: Sequence[int]) -> tuple[int, ...]:
    """The volume as sliding-window inference holds it: padded up to the window where it is smaller."""
    return tuple(max(int(v), int(w)) for v, w in zip(volume, window))


def train_features(init_filters: int, crop: Sequence[int]) -> tuple[float, float, float]:
    return 1.0, float(init_filters * voxels(crop)), float(voxels(crop))


def val_features(init_filters: int, window: Sequence[int], volume: Sequence[int]) -> tuple[float, float, float]:
    return 1.0, float(init_filters * voxels(window)), float(voxels(padded_volume(volume, window)))


def linear(coefficients: Sequence[float], features: Sequence[float]) -> float:
    return sum(c * f for c, f in zip(coefficients, features))


@dataclass(frozen=True)
class SiteWork:
    """What sets one site's memory."""

    init_filters: int
    roi_size: tuple[int, int, int]
    infer_roi_size: tuple[int, int, int]
    volume: tuple[int, int, int]  # a whole validation volume
    amp: bool = False  # mixed precision (on a GPU only)
    trains: bool = True  # False: the site only validates (job.py --checkpoint)

    @classmethod
    def of(cls, settings: TrainingSettings, on_gpu: bool, trains: bool = True) -> SiteWork:
        demo = settings.dataset_base_dir is not None and settings.dataset_base_dir.rstrip("/").endswith(
            DEMO_DATA_FOLDER
        )
        return cls(
            settings.init_filters,
            settings.roi_size,
            settings.infer_roi_size,
            DEMO_SHAPE if demo else BRATS_VOLUME,
            amp=on_gpu and settings.uses_amp("cuda"),
            trains=trains,
        )

    def train_mb(self) -> float:
        """Peak RSS of one training step on the CPU (0 when the site only validates)."""
        return linear(TRAIN_FIT, train_features(self.init_filters, self.roi_size)) if self.trains else 0.0

    def val_mb(self) -> float:
        return linear(VAL_FIT, val_features(self.init_filters, self.infer_roi_size, self.volume))

    def host_mb(self) -> float:
        """Peak RSS of the site's process on the CPU (fp32): its larger piece of work."""
        return max(self.train_mb(), self.val_mb())

    def gpu_mb(self) -> float:
        """Peak memory on the site's GPU (not measured: see CUDA_CONTEXT_MB and AMP_ACTIVATION_FACTOR)."""
        work = max(self.train_mb() - TRAIN_FIT[0] if self.trains else 0.0, self.val_mb() - VAL_FIT[0])
        return CUDA_CONTEXT_MB + work * (AMP_ACTIVATION_FACTOR if self.amp else 1.0)


# ---------------------------------------------------------------------------------------------------------------
# The fit
# ---------------------------------------------------------------------------------------------------------------
def fit_coefficients(rows: list[dict]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(TRAIN_FIT, VAL_FIT) by least squares over the rows of figs/memory_points_cpu.csv (as csv.DictReader
    gives them)."""
    import numpy as np

    def fit(kind: str, features) -> tuple[float, ...]:
        chosen = [r for r in rows if r["kind"] == kind]
        x = np.array([features(r) for r in chosen])
        y = np.array([float(r["peak_rss_mb"]) for r in chosen])
        return tuple(float(c) for c in np.linalg.lstsq(x, y, rcond=None)[0])

    def size(text: str) -> tuple[int, ...]:
        return tuple(int(s) for s in text.split("x"))

    train = fit("train", lambda r: train_features(int(r["init_filters"]), size(r["size"])))
    val = fit("val", lambda r: val_features(int(r["init_filters"]), size(r["window"]), size(r["size"])))
    return train, val


def predicted_mb(row: dict) -> float:
    """The model's figure for one row of the CSV."""
    size = tuple(int(s) for s in row["size"].split("x"))
    if row["kind"] == "train":
        return linear(TRAIN_FIT, train_features(int(row["init_filters"]), size))
    window = tuple(int(s) for s in row["window"].split("x"))
    return linear(VAL_FIT, val_features(int(row["init_filters"]), window, size))


# ---------------------------------------------------------------------------------------------------------------
# Where the sites run, and how many at once
# ---------------------------------------------------------------------------------------------------------------
def gpu_placement(sites: Sequence[str], gpu_ids: Sequence[int]) -> dict[int, list[str]]:
    """The sites on each GPU: dealt round-robin, as NVFlare's simulator (SimulatorRunner.split_clients) and its POC
    (client_gpu_assignments) place them: --gpu 0,1 with 4 sites puts site-1 and site-3 on 0, site-2 and site-4 on 1."""
    placement: dict[int, list[str]] = {g: [] for g in gpu_ids}
    for i, site in enumerate(sites):
        placement[gpu_ids[i % len(gpu_ids)]].append(site)
    return placement


@dataclass(frozen=True)
class AtOnce:
    """How many sites run at the same time: on this machine's host memory, and on each GPU."""

    host: int
    per_gpu: dict[int, int]


def sites_at_once(sites: Sequence[str], threads: int, gpu_ids: Sequence[int], env: str) -> AtOnce:
    """In POC every site is its own process, all running. NVFlare's simulator runs --threads sites at once on the
    CPU or one GPU; with several GPUs it runs one site per GPU at a time (it sets its threads to 1 per GPU group)."""
    placement = gpu_placement(sites, gpu_ids) if gpu_ids else {}
    if env == "poc":
        return AtOnce(len(sites), {g: len(s) for g, s in placement.items()})
    if len(gpu_ids) > 1:
        return AtOnce(len(gpu_ids), {g: 1 for g in placement})
    return AtOnce(threads, {g: threads for g in placement})


def parse_gpu_ids(gpu: str | None) -> list[int]:
    return [int(g) for g in gpu.split(",")] if gpu else []


# ---------------------------------------------------------------------------------------------------------------
# What the machine has
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Machine:
    host_available_mb: float
    gpu_free_mb: dict[int, float]  # by GPU id; a GPU torch cannot see is left out


# Run in a child process: querying a GPU creates a CUDA context, which job.py's process would then hold on every
# card for the whole job (hundreds of MB each).
GPU_FREE_SCRIPT = """
import json, sys, torch
ids = [int(g) for g in sys.argv[1].split(",")]
seen = torch.cuda.device_count() if torch.cuda.is_available() else 0
print(json.dumps({g: torch.cuda.mem_get_info(g)[0] / 2**20 for g in ids if g < seen}))
"""


def gpu_free_mb(gpu_ids: Sequence[int]) -> dict[int, float]:
    """Free memory of each GPU now, by torch.cuda.mem_get_info; {} where torch sees no CUDA device."""
    import json
    import subprocess

    if not gpu_ids:
        return {}
    done = subprocess.run(
        [sys.executable, "-c", GPU_FREE_SCRIPT, ",".join(map(str, gpu_ids))], capture_output=True, text=True
    )
    if done.returncode != 0:
        return {}
    return {int(g): float(mb) for g, mb in json.loads(done.stdout.strip().splitlines()[-1]).items()}


def machine_now(gpu_ids: Sequence[int]) -> Machine:
    import psutil

    return Machine(psutil.virtual_memory().available / 2**20, gpu_free_mb(gpu_ids))


# ---------------------------------------------------------------------------------------------------------------
# The check
# ---------------------------------------------------------------------------------------------------------------
def gb(mb: float) -> str:
    return f"{mb / 1024:.1f} GB"


@dataclass(frozen=True)
class MemoryCheck:
    lines: list[str]  # printed in the job's opening lines
    problem: str | None  # one line when the sites that run at once do not fit


SMALLER_CROP = (128, 128, 96)


def host_site_mb(work: SiteWork, on_gpu: bool) -> float:
    return HOST_SITE_ON_GPU_MB if on_gpu else work.host_mb()


def check_memory(work: SiteWork, at_once: AtOnce, machine: Machine, on_gpu: bool) -> MemoryCheck:
    """The estimate against what the machine has. Every running site is counted at its peak (validation and
    training at once at every site: the worst case), plus JOB_OVERHEAD_MB for the server and the simulator."""
    host_site = host_site_mb(work, on_gpu)
    host_need = JOB_OVERHEAD_MB + at_once.host * host_site
    precision = "mixed precision" if work.amp else "fp32"
    where = f"on its GPU ({precision}; not measured, computed)" if on_gpu else "on the CPU (fp32)"
    lines = [
        f"Memory estimate (brats_fl/memory.py): each site needs about "
        f"{gb(work.gpu_mb() if on_gpu else host_site)} {where}: training step {gb(work.train_mb())}, validation "
        f"{gb(work.val_mb())} on the CPU",
        f"  this machine: {at_once.host} site(s) at once + the server need about {gb(host_need)} of host memory; "
        f"available {gb(machine.host_available_mb)}",
    ]
    problems = []
    if host_need > machine.host_available_mb:
        problems.append(
            f"{at_once.host} site(s) at once need about {gb(host_need)}, {gb(machine.host_available_mb)} "
            "of memory is available"
        )
    for g, n in at_once.per_gpu.items():
        if g not in machine.gpu_free_mb:
            lines.append(f"  GPU {g}: not visible to torch here; not checked")
            continue
        need = n * work.gpu_mb()
        lines.append(f"  GPU {g}: {n} site(s) at once need about {gb(need)}; free {gb(machine.gpu_free_mb[g])}")
        if need > machine.gpu_free_mb[g]:
            problems.append(f"GPU {g}: {n} site(s) at once need about {gb(need)}, {gb(machine.gpu_free_mb[g])} free")
    if not problems:
        return MemoryCheck(lines, None)
    return MemoryCheck(lines, f"memory: {'; '.join(problems)}. {ways_out(work, machine, on_gpu)}")


def sites_that_fit(work: SiteWork, machine: Machine, on_gpu: bool) -> int:
    """How many sites at once the host memory (and every GPU checked) has room for."""
    counts = [int((machine.host_available_mb - JOB_OVERHEAD_MB) // host_site_mb(work, on_gpu))]
    if on_gpu:
        counts += [int(free // work.gpu_mb()) for free in machine.gpu_free_mb.values()]
    return max(0, min(counts))


def ways_out(work: SiteWork, machine: Machine, on_gpu: bool) -> str:
    """The ways out, with the figures that say how far each goes."""
    fitting = sites_that_fit(work, machine, on_gpu)
    fewer = f"--threads {fitting}" if fitting >= 1 else "--threads 1 (even one site may not fit)"
    crop = SiteWork(work.init_filters, SMALLER_CROP, work.infer_roi_size, work.volume, work.amp, work.trains)
    return (
        f"Ways out: fewer sites at once ({fewer}); the sites spread over several GPUs (--gpu 0,1: one site per GPU "
        f"at a time); a smaller crop (--roi_size {' '.join(map(str, SMALLER_CROP))}: about {gb(crop.host_mb())} per "
        f"site on the CPU) or --infer_roi_size; mixed precision on a GPU (no --no_amp); or --skip_memory_check"
    )


def memory_preflight(run) -> str | None:
    """job.py, before anything runs: prints each site's estimate against what this machine has; returns the one-line
    problem when the sites that run at once do not fit (None when they fit, with --skip_memory_check, or in a
    deployment, whose sites are other machines)."""
    settings, trains = run.settings, run.checkpoint is None
    gpu_ids = parse_gpu_ids(run.gpu)
    if run.env.name == "prod":
        cpu, gpu = SiteWork.of(settings, False, trains), SiteWork.of(settings, True, trains)
        print(
            f"Memory estimate (brats_fl/memory.py): each site needs about {gb(cpu.host_mb())} on a CPU (fp32), or "
            f"{gb(gpu.gpu_mb())} on a GPU (computed); the sites are other machines: not checked here",
            flush=True,
        )
        return None
    if not gpu_ids and cuda_visible():
        gpu_ids = [0]  # without --gpu every site trains on the first CUDA device
    machine = machine_now(gpu_ids)
    on_gpu = bool(machine.gpu_free_mb)
    at_once = sites_at_once(run.sites, run.threads, gpu_ids if on_gpu else [], run.env.name)
    check = check_memory(SiteWork.of(settings, on_gpu, trains), at_once, machine, on_gpu)
    print("\n".join(check.lines), flush=True)
    if check.problem and run.given.get("skip_memory_check"):
        print(f"warning: {check.problem} (starting anyway: --skip_memory_check)", file=sys.stderr, flush=True)
        return None
    return check.problem


def cuda_visible() -> bool:
    import torch

    return torch.cuda.is_available()


# ---------------------------------------------------------------------------------------------------------------
# python -m brats_fl.memory: the fit's errors and the table of docs/performance.md
# ---------------------------------------------------------------------------------------------------------------
TABLE_SETTINGS = {
    "demo: SegResNet-8, 32^3 crops, demo volumes": SiteWork(8, (32, 32, 32), (64, 64, 48), DEMO_SHAPE),
    "CPU benchmark: SegResNet-8, 48x48x32 crops": SiteWork(8, (48, 48, 32), (240, 240, 160), BRATS_VOLUME),
    "SegResNet-16, 128x128x96 crops": SiteWork(16, (128, 128, 96), (240, 240, 160), BRATS_VOLUME),
    "paper: SegResNet-16, 224x224x144 crops": SiteWork(16, (224, 224, 144), (240, 240, 160), BRATS_VOLUME),
}
CARDS_GB = (24, 48, 80, 141)


def fit_report(rows: list[dict]) -> list[str]:
    """Each measured point against the model, and the largest relative error."""
    lines = [f"{'kind':<5} {'width':>5} {'size':>13} {'window':>13} {'measured MB':>11} {'model MB':>9} {'error':>7}"]
    worst = 0.0
    for r in rows:
        measured, model = float(r["peak_rss_mb"]), predicted_mb(r)
        worst = max(worst, abs(model - measured) / measured)
        lines.append(
            f"{r['kind']:<5} {r['init_filters']:>5} {r['size']:>13} {r['window'] or '-':>13} {measured:>11.1f} "
            f"{model:>9.1f} {(model - measured) / measured:>+7.1%}"
        )
    lines.append(f"largest relative error: {worst:.1%}")
    return lines


def card_table() -> list[str]:
    """Memory per site (CPU measured-model fp32; GPU computed fp32/AMP) and sites per card (computed)."""
    head = " | ".join(f"per {c} GB card" for c in CARDS_GB)
    lines = [f"| settings | precision | memory per site | {head} |", "| --- | --- | --- |" + " --- |" * len(CARDS_GB)]
    for name, work in TABLE_SETTINGS.items():
        lines.append(f"| {name} | CPU fp32 (model of measured) | {gb(work.host_mb())} |" + " |" * len(CARDS_GB))
        for amp in (False, True):
            on_gpu = SiteWork(work.init_filters, work.roi_size, work.infer_roi_size, work.volume, amp)
            need = on_gpu.gpu_mb()
            per_card = " | ".join(str(int(c * 1024 // need)) for c in CARDS_GB)
            lines.append(f"| {name} | GPU {'AMP' if amp else 'fp32'} (computed) | {gb(need)} | {per_card} |")
    return lines


if __name__ == "__main__":
    import csv

    from brats_fl.settings import REPO_DIR

    with open(REPO_DIR / "figs" / "memory_points_cpu.csv", newline="") as f:
        measured = list(csv.DictReader(f))
    print("\n".join(fit_report(measured)))
    fitted = fit_coefficients(measured)
    print(f"refit: TRAIN_FIT = {fitted[0]}\n       VAL_FIT = {fitted[1]}")
    print("\n".join(card_table()))
