"""How much memory one site needs, estimated before a job starts, and whether the sites that run at once fit.

A site's work is one training step on a --roi_size crop and, at the site that validates (in a thread, while it
trains), the sliding-window validation of one whole volume with an --infer_roi_size window. The peak of each is a
straight line in what sets it, fitted by least squares on the points ``python -m benchmarks.memory_points``
measured (figs/memory_points_cpu.csv, process RSS on the CPU, fp32):

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
from dataclasses import dataclass, replace

from brats_fl.settings import DEMO_SHAPE, TrainingSettings

BRATS_VOLUME = (240, 240, 155)  # every BraTS 2018 volume
DEMO_DATA_FOLDER = "synthetic_brats18"  # job.py's demo data (run_options.resolve_data): DEMO_SHAPE volumes

# Fitted on figs/memory_points_cpu.csv by fit_coefficients (tests/test_memory.py refits them from the CSV).
# MB are MiB (2**20 bytes), as ru_maxrss gives them. Train: 70 bytes per filter per crop voxel (SegResNet's stored
# activations and their gradients), 110 bytes per crop voxel (input, label, loss, first and last layers). Val: 19 bytes
# per filter per window voxel, 90 bytes per voxel of the (padded) volume (the image, the summed logits and their count).
TRAIN_FIT = (722.4136458956333, 6.661343936566018e-05, 0.00010471066024056493)  # base, per filter-voxel, per voxel
VAL_FIT = (563.3124786662929, 1.7850997134147136e-05, 8.62644542591992e-05)  # base, per filter-window voxel, per voxel

# Not measured yet (no GPU was lent to the session that fitted the above): on a GPU the activations are taken to
# need what they need on the CPU, plus the CUDA context; mixed precision stores them in half precision, taken to
# save 40% of them (weights, gradients and Adam's state stay fp32). benchmarks/gpu_check.py measures the paper point.
CUDA_CONTEXT_MB = 600.0
AMP_ACTIVATION_FACTOR = 0.6
HOST_SITE_ON_GPU_MB = 3000.0  # host RSS of a site process that trains on a GPU (CUDA libraries, data): assumed
# Measured by benchmarks/soak.py on the demo (docs/performance.md#memory): job.py (545 MB), the simulator's process that
# runs the server (626-752 MB at its peak) and its two small helpers (100 MB); and what a site's process holds besides
# its work (NVFlare's client, the data pipeline): its RSS in the soak less the model's figure for the demo (~300 MB).
JOB_OVERHEAD_MB = 1400.0
SITE_OVERHEAD_MB = 300.0
FIT_MAX_RELATIVE_ERROR = 0.13  # the model against figs/memory_points_cpu.csv (python -m brats_fl.memory)


# Memory over hundreds of rounds (benchmarks/soak.py, docs/performance.md#memory). Without them every site process and
# the simulator's server grew by 1.2-1.5 MB per round over 46 demo rounds (about 0.8 GB over the paper's 600), most
# likely freed memory that glibc keeps in its per-thread arenas instead of returning it; with them, within 0.4 MB.
# NVFlare 2.9 runs gc.collect() and malloc_trim() (and torch.cuda.empty_cache() on a GPU) after every round at the
# server and the sites when its FedAvg recipe is given these; MALLOC_ARENA_MAX caps the arenas glibc keeps in every
# process job.py starts.
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
    """What sets one site's memory. The site that validates does it in a thread while it trains (brats_fl/
    pipeline.py), so its peak is its training step plus the validation's own tensors."""

    init_filters: int
    roi_size: tuple[int, int, int]
    infer_roi_size: tuple[int, int, int]
    volume: tuple[int, int, int]  # a whole validation volume
    amp: bool = False  # mixed precision (on a GPU only)
    trains: bool = True  # False: the site only validates (job.py --checkpoint)
    every_site_validates: bool = False  # --validate_every_site, or sites with different validation cases

    @classmethod
    def of(cls, settings: TrainingSettings, on_gpu: bool, trains: bool = True) -> SiteWork:
        data = (settings.dataset_base_dir or "").rstrip("/")
        return cls(
            settings.init_filters,
            settings.roi_size,
            settings.infer_roi_size,
            DEMO_SHAPE if data.endswith(DEMO_DATA_FOLDER) else BRATS_VOLUME,
            amp=on_gpu and settings.uses_amp("cuda"),
            trains=trains,
            every_site_validates=settings.validate_at == "every_site",
        )

    def train_mb(self) -> float:
        """Peak RSS of one training step on the CPU (0 when the site only validates)."""
        return linear(TRAIN_FIT, train_features(self.init_filters, self.roi_size)) if self.trains else 0.0

    def val_mb(self) -> float:
        """Peak RSS of the validation of one whole volume on the CPU."""
        return linear(VAL_FIT, val_features(self.init_filters, self.infer_roi_size, self.volume))

    def work_mb(self, validating: bool) -> tuple[float, float]:
        """(the process's base, what its work adds) on the CPU, fp32."""
        if not self.trains:
            return VAL_FIT[0], self.val_mb() - VAL_FIT[0]
        added = self.train_mb() - TRAIN_FIT[0]
        return TRAIN_FIT[0], added + (self.val_mb() - VAL_FIT[0] if validating else 0.0)

    def host_mb(self, validating: bool = False) -> float:
        """Peak RSS of the site's process when it runs on the CPU (fp32)."""
        return SITE_OVERHEAD_MB + sum(self.work_mb(validating))

    def gpu_mb(self, validating: bool = False) -> float:
        """Peak memory on the site's GPU (computed, not measured: see CUDA_CONTEXT_MB and AMP_ACTIVATION_FACTOR)."""
        return CUDA_CONTEXT_MB + self.work_mb(validating)[1] * (AMP_ACTIVATION_FACTOR if self.amp else 1.0)

    def need_mb(self, sites: int, on_gpu: bool, host: bool) -> float:
        """What `sites` sites running at once need: one of them validating (all, when every site validates); on
        the host (host) or on one GPU."""
        validating = sites if self.every_site_validates or not self.trains else min(1, sites)

        def per_site(v: bool) -> float:
            return (HOST_SITE_ON_GPU_MB if on_gpu else self.host_mb(v)) if host else self.gpu_mb(v)

        return validating * per_site(True) + (sites - validating) * per_site(False)


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


def check_memory(work: SiteWork, at_once: AtOnce, machine: Machine, on_gpu: bool) -> MemoryCheck:
    """The estimate against what the machine has: the sites that run at once (one of them validating while it
    trains), plus JOB_OVERHEAD_MB for job.py and the simulator's server."""
    host_need = JOB_OVERHEAD_MB + work.need_mb(at_once.host, on_gpu, host=True)
    lines = [f"Memory estimate (brats_fl/memory.py): {per_site_line(work, on_gpu)}"]
    lines.append(
        f"  this machine: {at_once.host} site(s) at once + the server need about {gb(host_need)} of memory; "
        f"available {gb(machine.host_available_mb)}"
    )
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
        need, free = work.need_mb(n, on_gpu, host=False), machine.gpu_free_mb[g]
        lines.append(f"  GPU {g}: {n} site(s) at once need about {gb(need)}; free {gb(free)}")
        if need > free:
            problems.append(f"GPU {g}: {n} site(s) at once need about {gb(need)}, {gb(free)} free")
    if not problems:
        return MemoryCheck(lines, None)
    return MemoryCheck(lines, f"memory: {'; '.join(problems)}. {ways_out(work, machine, on_gpu)}")


def per_site_line(work: SiteWork, on_gpu: bool) -> str:
    if on_gpu:
        precision = "mixed precision" if work.amp else "fp32"
        return (
            f"each site needs about {gb(work.gpu_mb())} of its GPU ({precision}; computed, not measured), the one "
            f"that validates {gb(work.gpu_mb(True))}, and about {gb(HOST_SITE_ON_GPU_MB)} of host memory"
        )
    what = "validates" if not work.trains else "trains"
    return (
        f"each site that {what} needs about {gb(work.host_mb())} on the CPU (fp32), the one that also validates "
        f"{gb(work.host_mb(True))} (training step {gb(work.train_mb())}, validation of one volume {gb(work.val_mb())})"
    )


def sites_that_fit(work: SiteWork, machine: Machine, on_gpu: bool) -> int:
    """The most sites at once that the host memory, and every GPU checked, have room for (0: not even one)."""
    rooms = [(machine.host_available_mb - JOB_OVERHEAD_MB, True), *((f, False) for f in machine.gpu_free_mb.values())]
    for sites in range(64, 0, -1):
        if all(work.need_mb(sites, on_gpu, host) <= room for room, host in rooms):
            return sites
    return 0


def ways_out(work: SiteWork, machine: Machine, on_gpu: bool) -> str:
    """The ways out, with the figures that say how far each goes."""
    fitting = sites_that_fit(work, machine, on_gpu)
    fewer = f"--threads {fitting}" if fitting >= 1 else "--threads 1, although even one site may not fit"
    crop = replace(work, roi_size=SMALLER_CROP)
    return (
        f"Ways out: fewer sites at once ({fewer}); the sites spread over several GPUs (--gpu 0,1: one site per GPU "
        f"at a time); a smaller crop (--roi_size {' '.join(map(str, SMALLER_CROP))}: about "
        f"{gb(crop.host_mb(True))} per site on the CPU) or --infer_roi_size; mixed precision on a GPU (no --no_amp); "
        "or --skip_memory_check to start anyway"
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
            f"Memory estimate (brats_fl/memory.py): each site needs about {gb(cpu.host_mb(True))} on a CPU (fp32), "
            f"or {gb(gpu.gpu_mb(True))} on a GPU (computed); the sites are other machines: not checked here",
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


def sites_per_card(work: SiteWork, card_gb: float) -> int:
    """The most sites one card holds at once, one of them validating (computed)."""
    return max((n for n in range(1, 257) if work.need_mb(n, True, host=False) <= card_gb * 1024), default=0)


def card_table() -> list[str]:
    """Markdown: memory per site (the validating one) on the CPU (the model of the measured points) and on a GPU
    (computed), and sites per card (computed)."""
    cards = " | ".join(f"{c} GB card" for c in CARDS_GB)
    lines = [f"| settings | CPU fp32 | GPU fp32 | GPU AMP | {cards} |", "| --- " * (4 + len(CARDS_GB)) + "|"]
    for name, work in TABLE_SETTINGS.items():
        fp32, amp = replace(work, amp=False), replace(work, amp=True)
        cards = " | ".join(f"{sites_per_card(fp32, c)} / {sites_per_card(amp, c)}" for c in CARDS_GB)
        lines.append(
            f"| {name} | {gb(work.host_mb(True))} | {gb(fp32.gpu_mb(True))} | {gb(amp.gpu_mb(True))} | {cards} |"
        )
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
